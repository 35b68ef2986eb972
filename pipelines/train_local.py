"""Pretraining in one plain process (CPU or one GPU), no Ray: the library's loop on the offline
digits data. Useful for quick checks and for GPU machines without Ray.

    python -m pipelines.train_local --epochs 10 --loss sscl
    python -m pipelines.train_local --device cuda --width 1.0 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sscl.data.augment import TwoViewAugment, normalize_images
from sscl.data.digits import load_digits_images, split_indices
from sscl.evaluate import knn_top1, linear_probe_top1
from sscl.losses import LOSSES, get_loss
from sscl.models import ENCODERS, build_model
from sscl.train import OPTIMIZERS, build_optimizer, lr_at, train_one_epoch


@dataclass(frozen=True)
class LocalConfig:
    """Settings of a local run (names equal the keywords of the functions they feed)."""

    loss: str = "sscl"
    temperature: float = 0.5
    beta: float = 1.0
    tau_plus: float = 0.1
    n_hard: int = 32
    n_synthetic: int = 8
    mode: str = "mix"
    encoder: str = "resnet18"
    width: float = 0.25
    optimizer: str = "sgd"
    lr: float = 0.3
    weight_decay: float = 1e-4
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 128
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    out_dir: str = "outputs/local"


def _batches(images: np.ndarray, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):  # drop the last partial batch
        yield {"image": torch.from_numpy(images[np.sort(order[start : start + batch_size])])}


@torch.no_grad()
def _features(model: torch.nn.Module, images: np.ndarray, device: str) -> torch.Tensor:
    model.eval()
    x = normalize_images(images)
    out = torch.cat([model.encoder(x[i : i + 512].to(device)).float().cpu() for i in range(0, len(x), 512)])
    model.train()
    return out


def main(cfg: LocalConfig) -> dict[str, float]:
    """Pretrains on digits, prints a line per epoch, returns final kNN and linear top-1."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    images, labels = load_digits_images()
    train_idx, test_idx = split_indices(len(images), seed=cfg.seed)
    train_x, test_x = images[train_idx], images[test_idx]
    train_y, test_y = torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx])
    if cfg.batch_size > len(train_x):
        raise ValueError(f"batch_size must be <= {len(train_x)} (the training split), got {cfg.batch_size}")

    model = build_model(cfg.encoder, stem="cifar", width=cfg.width).to(cfg.device)
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = get_loss(cfg.loss, temperature=cfg.temperature, beta=cfg.beta, tau_plus=cfg.tau_plus,
                       n_hard=cfg.n_hard, n_synthetic=cfg.n_synthetic, mode=cfg.mode)
    augment = TwoViewAugment(seed=cfg.seed)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch

    def schedule(step: int) -> float:
        return lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_epochs * steps_per_epoch, total_steps=total)

    rng = np.random.default_rng(cfg.seed)
    step, history, start = 0, [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None) as bar:
            result = train_one_epoch(
                model, _batches(train_x, cfg.batch_size, rng), loss_fn, optimizer, lr_schedule=schedule,
                start_step=step, device=cfg.device, augment=augment.views, amp=cfg.amp,
                on_step=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{float(loss):.3f}")),
            )
        step = result.next_step
        knn = knn_top1(_features(model, train_x, cfg.device), train_y, _features(model, test_x, cfg.device), test_y)
        history.append(dict(epoch=epoch, loss=result.loss, lr=result.lr, images_per_second=result.images_per_second, knn_top1=knn))
        print(f"epoch {epoch:3d}  loss {result.loss:.4f}  lr {result.lr:.4f}  "
              f"img/s {result.images_per_second:7.1f}  knn_top1 {knn:.3f}", flush=True)

    train_f, test_f = _features(model, train_x, cfg.device), _features(model, test_x, cfg.device)
    final = dict(knn_top1=knn_top1(train_f, train_y, test_f, test_y),
                 linear_top1=linear_probe_top1(train_f, train_y, test_f, test_y),
                 seconds=time.perf_counter() - start)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "result.json").write_text(json.dumps({"config": asdict(cfg), "history": history, "final": final}, indent=2))
    print(f"final: knn_top1 {final['knn_top1']:.3f}  linear_top1 {final['linear_top1']:.3f}  "
          f"({final['seconds']:.0f} s; frozen encoder, digits test split)  saved to {out}")
    return final


def parse(argv: Sequence[str] | None = None) -> LocalConfig:
    """Command-line flags -> ``LocalConfig`` (one flag per field)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"loss": list(LOSSES), "encoder": list(ENCODERS), "optimizer": list(OPTIMIZERS), "mode": ["mix", "copy"]}
    for name, default in asdict(LocalConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default, choices=choices.get(name))
    return LocalConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    try:
        main(parse())
    except ValueError as err:  # user errors: a message, not a traceback
        raise SystemExit(f"error: {err}") from None
