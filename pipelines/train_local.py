"""Pretraining in one plain process on one device, without Ray or MLflow: the same presets, keys and
data sources as ``pipelines.pretrain``, read in this process (``sscl.data.local.local_split``).
Useful on a GPU box that has only PyTorch, and for quick checks.

    python -m pipelines.train_local --config pipelines/configs/cifar10.yaml data.root=~/data --device cuda
    python -m pipelines.train_local --config pipelines/configs/quickstart.yaml train.epochs=3

Writes ``model.pt`` (the model's state dict) and ``result.json`` (config, per-epoch history, final
metrics) to ``--out-dir`` (default ``outputs/local/<train.run_name>``): a new or empty folder, or
one this command wrote (replaced with ``--overwrite``); a folder holding other files is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines import console
from pipelines.errors import guarded
from sscl.config import Config, to_dict
from sscl.data.local import local_split
from sscl.evaluate import check_bank
from sscl.outputs import check_apart, claim_folder, data_paths, replace_file
from sscl.recipe import Recipe


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: naming the device when it is not available here.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name!r}: no such GPU here ({torch.cuda.device_count()} visible); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


COMMAND = "python -m pipelines.train_local"
OUTPUTS = ("model.pt", "result.json")


def main(cfg: Config, *, device: str = "auto", workers: int = 0, out_dir: str | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Pretrains on ``cfg.data`` on one device, evaluates with the pipeline's protocol (kNN and
    linear probe on frozen features) before training and every ``train.knn_every`` epochs.

    Returns:
        The final metrics (``knn_top1``, ``linear_top1``), the untrained encoder's (``initial_*``),
        epochs, seconds and the output folder.

    Raises:
        ValueError, FileNotFoundError, ConnectionError: naming the key, path or device, before training.
        FileExistsError: when ``out_dir`` holds files this command did not write, or its earlier output
            without ``overwrite``.
    """
    started = time.perf_counter()
    target = resolve_device(device)
    data, train = cfg.data, cfg.train
    out = Path(out_dir or Path("outputs") / "local" / train.run_name)
    check_apart(str(out), "--out-dir", data_paths(data))
    claim_folder(out, "--out-dir", COMMAND, may_hold=OUTPUTS, overwrite=overwrite)
    pretrain = local_split(data, "pretrain")
    bank = local_split(data, "eval_train", max_images=train.knn_max_images)
    test = local_split(data, "eval_test")
    if pretrain.num_images < data.batch_size:
        raise ValueError(f"data.batch_size={data.batch_size}: larger than the {pretrain.num_images} pretraining images")
    check_bank(train.knn_k, bank.num_images)

    recipe = Recipe(cfg, steps_per_epoch=pretrain.num_images // data.batch_size, device=target)

    def evaluate() -> dict[str, float]:
        size = data.eval_batch_size
        return recipe.evaluate(bank.batches(size, workers=workers), test.batches(size, workers=workers))[0]

    print(f"{data.source} ({pretrain.num_images} images) on {target}, {cfg.model.encoder} x{cfg.model.width:g}, "
          f"{cfg.model.method} with loss {cfg.loss.name}, batch {data.batch_size}, {train.epochs} epochs")
    console.print_notes(pretrain, bank, test)
    initial = evaluate()
    print("before training: " + "  ".join(f"{k} {v:.4f}" for k, v in initial.items()))
    while not recipe.done:
        epoch = recipe.state.epoch + 1
        batches = pretrain.batches(data.batch_size, seed=train.seed + epoch, workers=workers, drop_last=True)
        with _bar(epoch, train.epochs, recipe.steps_per_epoch) as bar:
            metrics = recipe.train_epoch(batches, on_step=lambda i, loss: bar.update(1))
        if recipe.evaluates_after(epoch):
            metrics = dataclasses.replace(metrics, **evaluate())
        recipe.record(metrics)
        print(metrics.line(train.epochs), flush=True)

    history = [m.flat() for m in recipe.state.history]
    final = next(m for m in reversed(recipe.state.history) if m.evaluated)
    replace_file(out / "model.pt", lambda path: torch.save(recipe.module.state_dict(), path))
    summary = {"knn_top1": final.knn_top1, "linear_top1": final.linear_top1,
               **{f"initial_{k}": v for k, v in initial.items()}, "epochs": train.epochs,
               "seconds": time.perf_counter() - started, "out_dir": str(out)}
    result = json.dumps({"config": to_dict(cfg), "history": history, "final": summary}, indent=2, default=str)
    replace_file(out / "result.json", lambda path: path.write_text(result))
    print(f"trained: kNN top-1 {summary['knn_top1']:.4f}, linear top-1 {summary['linear_top1']:.4f} (untrained: "
          f"{initial['knn_top1']:.4f}, {initial['linear_top1']:.4f}) (frozen encoder, {data.source} evaluation set, "
          f"{train.epochs} epochs, {summary['seconds']:.0f} s); saved to {out}")
    return summary


def _bar(epoch: int, epochs: int, steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=None)


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config_and_flags

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
        parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)),
                            help="processes reading and decoding the data (0: the training process)")
        parser.add_argument("--out-dir", default=None, help="default: outputs/local/<train.run_name>")
        parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command there")

    cfg, args = parse_config_and_flags(argv, prog="python -m pipelines.train_local", description=__doc__,
                                       add_flags=flags)
    if args.workers < 0:
        print(f"python -m pipelines.train_local: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        raise SystemExit(2)
    return guarded("python -m pipelines.train_local",
                   lambda: main(cfg, device=args.device, workers=args.workers, out_dir=args.out_dir,
                                overwrite=args.overwrite))


if __name__ == "__main__":
    cli()
