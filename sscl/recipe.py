"""The training recipe, written once: what every pretraining run does, in one process or on each rank.

``Recipe`` is built from the config for one device. It owns the model, the optimiser, the
learning-rate schedule, the momentum queue (moco), the views made on the device and the loss of each
epoch; it trains an epoch over any iterable of batches, evaluates on any iterables of labelled batches,
and holds the ``TrainingState`` a checkpoint saves and a resume restores. The Ray Train worker
(``pipelines.worker``) adds DDP, shards, checkpoints and reports; ``pipelines.train_local`` adds its
local reader and ``result.json``. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from sscl.build import compiled, eval_transform, for_training, model_from_config, momentum_queue
from sscl.config import Config
from sscl.data.augment import TwoViewAugment
from sscl.evaluate import evaluate_encoder
from sscl.losses import get_loss, negative_similarities, queue_negative_similarities
from sscl.train import build_optimizer, lr_at, train_one_epoch

__all__ = ["EpochMetrics", "HISTOGRAM_VALUES", "Recipe", "TrainingState"]

HISTOGRAM_VALUES = 2**16  # real-negative similarities kept for a moco run's histogram
LAYOUT = 2  # TrainingState's file layout; 1 = the plain dict of earlier versions (still read)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's numbers: the names reported to Ray Train and logged to MLflow are these fields
    (``negatives`` flattened as ``neg_<name>``).

    Attributes:
        epoch: 1-based.
        loss: mean training loss over the epoch's steps.
        lr: the last step's learning rate.
        images_per_second: training images per second over all ranks.
        negatives: ``LossDiagnostics`` means over the epoch (rank 0's anchors).
        knn_top1, linear_top1: the frozen encoder's held-out top-1, when evaluated this epoch.
        skipped_images: undecodable images skipped so far (``data.skip_corrupt``), when counted.
    """

    epoch: int
    loss: float
    lr: float
    images_per_second: float
    negatives: dict[str, float] = field(default_factory=dict)
    knn_top1: float | None = None
    linear_top1: float | None = None
    skipped_images: int | None = None

    def flat(self) -> dict[str, float]:
        """``{name: value}`` of every value present, as reported and logged."""
        out: dict[str, float] = {"epoch": self.epoch, "loss": self.loss, "lr": self.lr,
                                 "images_per_second": self.images_per_second}
        out |= {f"neg_{k}": v for k, v in self.negatives.items()}
        out |= {k: getattr(self, k) for k in ("knn_top1", "linear_top1", "skipped_images")
                if getattr(self, k) is not None}
        return out

    @classmethod
    def from_flat(cls, values: Mapping[str, float]) -> EpochMetrics:
        """The inverse of ``flat`` (e.g. a checkpoint's history)."""
        negatives = {k[len("neg_"):]: float(v) for k, v in values.items() if k.startswith("neg_")}
        optional = {k: values[k] for k in ("knn_top1", "linear_top1") if k in values}
        skipped = {"skipped_images": int(values["skipped_images"])} if "skipped_images" in values else {}
        return cls(epoch=int(values["epoch"]), loss=float(values["loss"]), lr=float(values["lr"]),
                   images_per_second=float(values["images_per_second"]), negatives=negatives, **optional, **skipped)

    @property
    def evaluated(self) -> bool:
        return self.knn_top1 is not None

    def line(self, epochs: int) -> str:
        """The epoch's progress line: loss, lr, images/s, and the top-1s and skipped images when present."""
        text = (f"epoch {self.epoch:3d}/{epochs}  loss {self.loss:.4f}  lr {self.lr:.4f}  "
                f"img/s {self.images_per_second:8.1f}")
        for key in ("knn_top1", "linear_top1"):
            if getattr(self, key) is not None:
                text += f"  {key} {getattr(self, key):.4f}"
        return text + (f"  skipped {self.skipped_images}" if self.skipped_images is not None else "")


@dataclass
class TrainingState:
    """What a checkpoint holds and a resume needs.

    Attributes:
        epoch: epochs trained; step: optimiser steps taken (the schedule's position).
        history: every trained epoch's metrics.
        initial: the untrained encoder's evaluation (the yardstick), once made.
        resumes: ``{"epoch": ..., ["queue_sha256": ...]}`` of every resume so far.
        model, optimizer, moco: the state dicts (moco: None for simclr).
    """

    epoch: int = 0
    step: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    initial: dict[str, float] | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    moco: dict[str, Any] | None = None

    FILE = "state.pt"

    def save(self, folder: str | Path) -> None:
        """Writes ``folder/state.pt`` (plain tensors and containers: loads with ``weights_only=True``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["history"] = [m.flat() for m in self.history]
        torch.save({"layout": LAYOUT, **values}, Path(folder) / self.FILE)

    @classmethod
    def load(cls, folder: str | Path, map_location: torch.device | str = "cpu") -> TrainingState:
        """Reads what ``save`` wrote, or a layout-1 checkpoint (its similarity sample is dropped).

        Raises:
            ValueError: naming the file when it is not a checkpoint of this pipeline or was written by a
                newer layout.
        """
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise ValueError(f"{path}: no training state; not a checkpoint of this pipeline")
        values = torch.load(path, map_location=map_location, weights_only=True)
        layout = values.pop("layout", 1)
        if layout > LAYOUT:
            raise ValueError(f"{path}: checkpoint layout {layout} is newer than this version reads ({LAYOUT}); "
                             "upgrade sscl to resume it")
        missing = [k for k in ("epoch", "step", "history", "model", "optimizer") if k not in values]
        if missing:
            raise ValueError(f"{path}: not a checkpoint of this pipeline (missing {', '.join(missing)})")
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known})
        state.history = [EpochMetrics.from_flat(h) for h in state.history]
        return state


class Recipe:
    """One run's training, on one device (one rank of ``world`` under DDP).

    Args:
        cfg: the run's config.
        steps_per_epoch: optimiser steps per epoch (images // global batch).
        device: this rank's training device.
        rank, world: this process's place under DDP (0 and 1 alone).
        prepare: places the model on ``device`` (default ``.to(device)``), e.g. Ray Train's
            ``prepare_model``, which wraps it in DDP.
        views_here: whether the batches hold images (``image``) whose two views are made here on
            ``device`` (``views_in_trainer``), rather than views made upstream (``view1``, ``view2``).
    """

    def __init__(self, cfg: Config, *, steps_per_epoch: int, device: torch.device, rank: int = 0, world: int = 1,
                 prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None, views_here: bool = True) -> None:
        self.cfg, self.device, self.world = cfg, device, world
        self.steps_per_epoch, self.total_steps = steps_per_epoch, steps_per_epoch * cfg.train.epochs
        torch.manual_seed(cfg.train.seed + rank)
        model = model_from_config(cfg)
        if cfg.scaling.sync_batchnorm and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = for_training(model, cfg)
        self.model = prepare(model) if prepare is not None else model.to(device)
        self.module = self.model.module if hasattr(self.model, "module") else self.model  # unwrapped: saved, evaluated
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.name, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.moco = momentum_queue(cfg, self.module, self.total_steps)  # None for simclr; rank 0's weights under DDP
        self.step_model = compiled(self.model, cfg)  # what trains
        self.rank = rank
        self.views = TwoViewAugment(**dataclasses.asdict(cfg.augment), seed=cfg.train.seed) if views_here else None
        self.state = TrainingState()

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.cfg.train.epochs

    def restore(self, state: TrainingState) -> None:
        """Continues from a checkpoint's state: weights, optimiser and the queue as saved, bit for bit."""
        self.module.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        resumed: dict[str, Any] = {"epoch": state.epoch}
        if self.moco is not None:
            self.moco.load_state_dict(state.moco)
            resumed["queue_sha256"] = self.moco.digest()
        self.state = dataclasses.replace(state, resumes=[*state.resumes, resumed])

    def checkpoint(self) -> TrainingState:
        """The state to save now."""
        return dataclasses.replace(self.state, model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                                   moco=self.moco.state_dict() if self.moco is not None else None)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, base_lr=o.lr, warmup_steps=o.warmup_epochs * self.steps_per_epoch,
                     total_steps=self.total_steps, final_lr=o.final_lr)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) ends with an evaluation: every ``train.knn_every`` and the last."""
        return epoch % self.cfg.train.knn_every == 0 or epoch == self.cfg.train.epochs

    def train_epoch(self, batches: Iterable[Mapping[str, Any]], *,
                    on_step: Callable[[int, torch.Tensor], None] | None = None) -> EpochMetrics:
        """Trains the next epoch over ``batches`` (``train_one_epoch``'s) and advances the state's
        epoch and step; the caller adds an evaluation and ``record``s the metrics."""
        cfg = self.cfg
        # Every random draw of an epoch (views, the loss's mixing) comes from (seed, rank, epoch): a resumed
        # run makes the same draws as one that was never interrupted.
        seed = int(np.random.SeedSequence([cfg.train.seed, self.rank, self.state.epoch]).generate_state(1)[0])
        torch.manual_seed(seed)
        if self.views is not None:
            self.views.generator.manual_seed(seed)
        result = train_one_epoch(
            self.step_model, batches, self.loss_of(self.state.epoch), self.optimizer, lr_schedule=self.lr_at,
            start_step=self.state.step, device=self.device, augment=self.views.views if self.views else None,
            amp=cfg.train.amp and self.device.type == "cuda", max_steps=self.steps_per_epoch, on_step=on_step,
            diagnostics=True, channels_last=cfg.train.channels_last, moco=self.moco)
        self.state.epoch, self.state.step = self.state.epoch + 1, result.next_step
        return EpochMetrics(epoch=self.state.epoch, loss=result.loss, lr=result.lr,
                            images_per_second=result.images_per_second * self.world,
                            negatives={k: v for k, v in result.diagnostics.items() if not math.isnan(v)})

    def loss_of(self, epoch: int) -> Callable[..., torch.Tensor]:
        """The loss of ``epoch`` (0-based): moco trains its first ``model.queue_warmup_epochs`` without
        synthetic negatives, while the queue fills with keys of the trained model."""
        loss = self.cfg.loss
        if self.cfg.model.method == "moco" and epoch < self.cfg.model.queue_warmup_epochs and loss.name == "sscl":
            loss = dataclasses.replace(loss, n_synthetic=0)
        return get_loss(loss.name, self.cfg.model.method, **loss.kwargs())

    def record(self, metrics: EpochMetrics) -> None:
        self.state.history.append(metrics)

    def evaluate(self, bank: Iterable[Mapping[str, Any]], test: Iterable[Mapping[str, Any]], *,
                 similarities: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
        """kNN and linear top-1 of the frozen encoder (on every rank under DDP, each with its shards).

        Args:
            bank, test: labelled batches (``image`` uint8 (N, H, W, C), ``label``).
            similarities: also return the histogram's anchor-negative similarities, on two fresh views
                of the bank's first images (``similarities``).

        Returns:
            ``{"knn_top1", "linear_top1"}`` (the same on every rank), and the similarities or None.
        """
        first: dict[str, torch.Tensor] = {}

        def keep_first(batches: Iterable[Mapping[str, Any]]):
            for batch in batches:
                first.setdefault("image", torch.as_tensor(batch["image"]))
                yield batch

        if torch.distributed.is_initialized():
            # BatchNorm running statistics drift apart between DDP ranks (each updates them from its own
            # batches); evaluate every rank with rank 0's, the model that is checkpointed and registered.
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)
        t = self.cfg.train
        metrics = evaluate_encoder(self.module.encoder, keep_first(bank), test, device=self.device, k=t.knn_k,
                                   temperature=t.knn_temperature, linear_epochs=t.linear_epochs, seed=t.seed,
                                   **eval_transform(self.cfg))
        found = self.similarities(first.get("image")) if similarities else None
        return metrics, found

    @torch.no_grad()
    def similarities(self, images: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """Real and synthetic negative similarities of the current model on two fresh views of a few
        ``images`` (uint8 (N, H, W, C); every rank takes the same number, as the loss gathers across
        ranks). With moco, each view's queries against the queue: the real negatives are the queue's
        keys, at most ``HISTOGRAM_VALUES`` of them drawn at random (65,536 keys give 8M similarities).

        Returns:
            ``{"real": (R,), "synthetic": (S,)}`` on the CPU; None when some rank has fewer than two images.
        """
        cfg, device = self.cfg, self.device
        n = torch.tensor([min(len(images), 64) if images is not None else 0], device=device)
        world = 1
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            world = torch.distributed.get_world_size()
        n = int(n.item())
        if n < 2:
            return None
        view1, view2 = TwoViewAugment(**dataclasses.asdict(cfg.augment), seed=cfg.train.seed).views(images[:n].to(device))
        was_training = self.module.training
        self.module.eval()
        z1, z2 = self.module(view1)[1].float(), self.module(view2)[1].float()
        self.module.train(was_training)
        # The loss's own synthetic negatives (none but sscl's), drawn as it draws them.
        mixing = {"n_hard": 1, "n_synthetic": 0, "mode": "mix"} | {
            k: v for k, v in cfg.loss.kwargs().items() if k in ("n_hard", "n_synthetic", "mode")}
        if self.moco is not None:
            generator = torch.Generator(device).manual_seed(cfg.train.seed)
            real, synthetic = queue_negative_similarities(torch.cat([z1, z2]), self.moco.queue, **mixing,
                                                          generator=generator)
            sample = torch.randperm(len(real), generator=generator, device=device)[:HISTOGRAM_VALUES]
            return {"real": real[sample].cpu(), "synthetic": synthetic.cpu()}
        real, synthetic = negative_similarities(z1, z2, **(mixing | {"n_hard": min(mixing["n_hard"], 2 * n * world - 2)}))
        return {"real": real.cpu(), "synthetic": synthetic.cpu()}
