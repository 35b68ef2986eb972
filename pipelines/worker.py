"""One Ray Train worker of a pretraining run: resume, train, evaluate on its shard, checkpoint, report."""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipelines.console import epoch_line
from pipelines.build import (augment_kwargs, compiled, eval_transform, for_training, loss_from_config, model_from_config,
                             momentum_queue, decodes_on_device, views_in_trainer)
from sscl.config import Config, from_dict
from sscl.data.sources import DataError
from sscl.data.augment import TwoViewAugment
from sscl.evaluate import evaluate_encoder
from sscl.losses import negative_similarities, queue_negative_similarities
from sscl.moco import MomentumQueue
from sscl.tracking import EpochLogger
from sscl.train import build_optimizer, lr_at, train_one_epoch

# Worker output goes through a logger: Ray Train forwards print() output to the driver twice.
log = logging.getLogger("sscl.pretrain")
STATE_FILE = "state.pt"
HISTOGRAM_VALUES = 2**16  # real-negative similarities kept for a moco run's histogram (in every checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: resumes from the latest checkpoint, trains, evaluates on its shard of the
    evaluation sets, reports every epoch. A data error is told to the driver, which stops the run
    (retrying from a checkpoint would meet it again)."""
    import ray

    try:
        _train(config)
    except DataError as err:  # raised here, or in a Ray Data task (Ray's wrapper is a DataError too)
        if config.get("bad_images") is not None:
            ray.get(config["bad_images"].fail.remote(str(getattr(err, "cause", None) or err)), timeout=30)
        raise


def _train(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    log.setLevel(logging.INFO)
    for name in ("ray.train", "ray.data"):  # their per-report INFO lines would drown the progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    model = model_from_config(cfg)
    if cfg.scaling.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(for_training(model, cfg))
    module = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    per_worker = cfg.data.batch_size // world
    steps_per_epoch = config["n_pretrain"] // cfg.data.batch_size
    total_steps = steps_per_epoch * cfg.train.epochs
    moco = momentum_queue(cfg, module, total_steps)  # None for simclr; after prepare_model: rank 0's weights
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "similarities": None, "initial": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = {"similarities": None, "initial": None, **torch.load(Path(folder) / STATE_FILE,
                                                                         map_location=device, weights_only=True)}
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        resumed = {"epoch": state["epoch"]}
        if moco is not None:
            moco.load_state_dict(state["moco"])  # the queue as checkpointed, bit for bit
            resumed["queue_sha256"] = moco.digest()
        state["resumes"] = [*state.get("resumes", []), resumed]  # kept in later checkpoints

    step_model = compiled(model, cfg)  # what trains; evaluation and checkpoints use ``module``

    def schedule(s: int) -> float:
        return lr_at(s, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
                     total_steps=total_steps, final_lr=cfg.optim.final_lr)

    in_trainer = views_in_trainer(cfg)
    augment = TwoViewAugment(**augment_kwargs(cfg), seed=cfg.train.seed * 1000 + rank).views if in_trainer else None
    shard = ray.train.get_dataset_shard("train")
    tracker = EpochLogger(config["tracking_uri"], config["mlflow_run_id"], log.warning) if rank == 0 else None
    board = config.get("progress")  # the driver prints what rank 0 posts there (pipelines.console)
    say = (lambda line: board.post.remote(line)) if board is not None else log.info
    if tracker:
        tracker.sync(state["history"])  # epochs checkpointed before a crash but not logged yet
    if checkpoint and rank == 0 and state["epoch"] < cfg.train.epochs:
        say(f"resumed after epoch {state['epoch']}: model, optimiser" + (" and key queue" if moco else "") + " restored")

    def save(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                moco_state = {"moco": moco.state_dict()} if moco is not None else {}
                torch.save({**state, "model": module.state_dict(), "optimizer": optimizer.state_dict(), **moco_state},
                           Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        if tracker:
            # Logged once checkpointed: an epoch redone after a crash is never logged twice.
            tracker.sync(state["history"])

    if state["epoch"] >= cfg.train.epochs:  # resumed after the last epoch (e.g. the driver died while finishing)
        save(state["history"][-1] if state["history"] else {"epoch": state["epoch"]})
        return
    if state["epoch"] == 0:
        # The same protocol on the untrained encoder: the yardstick for what pretraining bought.
        state["initial"], _ = evaluate_on_workers(model, cfg, device, moco)
        if rank == 0:
            say("before training: " + "  ".join(f"{k} {v:.4f}" for k, v in state["initial"].items()))
    for epoch in range(state["epoch"], cfg.train.epochs):
        batches = _epoch_batches(shard, cfg, per_worker, device, world, config.get("bad_images"))
        bar = _Progress(epoch + 1, cfg.train.epochs, steps_per_epoch, say) if rank == 0 else None
        result = train_one_epoch(
            step_model, batches, loss_from_config(cfg, epoch), optimizer, lr_schedule=schedule, start_step=state["step"],
            device=device, augment=augment, amp=cfg.train.amp and device.type == "cuda", max_steps=steps_per_epoch,
            on_step=bar.update if bar else None, diagnostics=True, channels_last=cfg.train.channels_last, moco=moco,
        )
        last = epoch + 1 == cfg.train.epochs
        metrics: dict[str, float] = {"epoch": epoch + 1, "loss": result.loss, "lr": result.lr,
                                     "images_per_second": result.images_per_second * world,
                                     # How the negatives behaved (rank 0's anchors): see LossDiagnostics.
                                     **{f"neg_{k}": v for k, v in result.diagnostics.items() if not math.isnan(v)}}
        if (epoch + 1) % cfg.train.knn_every == 0 or last:
            evaluated, state["similarities"] = evaluate_on_workers(model, cfg, device, moco)
            metrics |= evaluated
        if cfg.data.skip_corrupt and rank == 0:
            metrics["skipped_images"] = ray.get(config["bad_images"].count.remote())
        state["epoch"], state["step"] = epoch + 1, result.next_step
        if rank == 0:
            state["history"].append(dict(metrics))
            say(epoch_line(metrics, cfg.train.epochs))
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            save(metrics)
        else:
            ray.train.report(metrics)


def _epoch_batches(shard: Any, cfg: Config, per_worker: int, device: torch.device, world: int, bad_images: Any):
    """One epoch of this worker's training batches: from Ray Data as made there, or, with
    ``data.decode=device``, encoded images decoded here on ``device`` (``sscl.data.device_decode``)."""
    shuffle = dict(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
                   prefetch_batches=cfg.data.prefetch_batches)
    if not decodes_on_device(cfg):
        return shard.iter_torch_batches(**shuffle, pin_memory=device.type == "cuda")
    return _decoded_here(shard.iter_batches(**shuffle, batch_format="numpy"), cfg, per_worker, device, world,
                         bad_images)


def _decoded_here(batches, cfg: Config, per_worker: int, device: torch.device, world: int, bad_images: Any):
    from sscl.data.device_decode import decode_batch
    from sscl.data.sources import Decoder

    decoder = Decoder(cfg.data.image_size, cfg.data.skip_corrupt, bad_images)

    def full_batches():
        carry = None
        for batch in batches:
            images, _ = decode_batch(batch["bytes"], batch["where"], size=cfg.data.image_size, device=device,
                                     decoder=decoder)
            carry = images if carry is None else torch.cat([carry, images])
            if len(carry) >= per_worker:  # short only after a skipped image: filled from the next batch
                yield {"image": carry[:per_worker]}
                carry = carry[per_worker:]

    if not cfg.data.skip_corrupt or world == 1:
        yield from full_batches()
        return
    # Skipped images can leave one worker a batch short at the end of the epoch, and the loss gathers
    # a batch from every worker: before each step they agree that each has one, or all stop.
    for batch in _while_all_have(full_batches(), device):
        yield batch


def _while_all_have(batches, device: torch.device):
    for batch in itertools.chain(batches, [None]):  # lazily: one batch decoded at a time
        have = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        if not have.item():
            return
        yield batch


def evaluate_on_workers(model: torch.nn.Module, cfg: Config, device: torch.device, moco: MomentumQueue | None = None
                        ) -> tuple[dict[str, float], dict]:
    """kNN and linear top-1 of the encoder, every rank encoding its shard of the evaluation sets on
    its own device (call on every rank); also anchor-negative similarities for the histogram (with
    ``moco``: the queries' similarities to its queue).

    Returns:
        The metrics (the same on every rank) and ``{"real": ..., "synthetic": ...}`` similarities (CPU tensors).
    """
    import ray.train

    first: dict[str, Any] = {}

    def keep_first(batches):
        for batch in batches:
            first.setdefault("image", batch["image"])
            yield batch

    def batches(name: str):
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=cfg.data.eval_batch_size)

    module = model.module if hasattr(model, "module") else model
    if torch.distributed.is_initialized():
        # BatchNorm running statistics drift apart between DDP ranks (each updates them from its own
        # batches); evaluate every rank with rank 0's, the model that is checkpointed and registered.
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
    metrics = evaluate_encoder(module.encoder, keep_first(batches("eval_train")), batches("eval_test"), device=device,
                               k=cfg.train.knn_k, temperature=cfg.train.knn_temperature,
                               linear_epochs=cfg.train.linear_epochs, seed=cfg.train.seed, **eval_transform(cfg))
    return metrics, _similarities(module, first.get("image"), cfg, device, moco)


@torch.no_grad()
def _similarities(module: torch.nn.Module, images: torch.Tensor | None, cfg: Config, device: torch.device,
                  moco: MomentumQueue | None = None) -> dict | None:
    """Real and synthetic negative similarities of the current model on two fresh views of a few
    evaluation images (every rank takes the same number, as the loss gathers across ranks). With
    ``moco``, each view's queries against the queue: the real negatives are the queue's keys, at most
    ``HISTOGRAM_VALUES`` of them drawn at random (a queue of 65,536 keys gives 8M similarities).
    None when some rank's shard of the kNN bank is empty (fewer images than ranks)."""
    n = torch.tensor([min(len(images), 64) if images is not None else 0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        world = torch.distributed.get_world_size()
    else:
        world = 1
    n = int(n.item())
    if n < 2:
        return None
    view1, view2 = TwoViewAugment(**augment_kwargs(cfg), seed=cfg.train.seed).views(images[:n].to(device))
    was_training = module.training
    module.eval()
    z1, z2 = module(view1)[1].float(), module(view2)[1].float()
    module.train(was_training)
    n_syn = cfg.loss.n_synthetic if cfg.loss.name == "sscl" else 0
    if moco is not None:
        generator = torch.Generator(device).manual_seed(cfg.train.seed)
        real, synthetic = queue_negative_similarities(torch.cat([z1, z2]), moco.queue, n_hard=cfg.loss.n_hard,
                                                      n_synthetic=n_syn, mode=cfg.loss.mode, generator=generator)
        sample = torch.randperm(len(real), generator=generator, device=device)[:HISTOGRAM_VALUES]
        return {"real": real[sample].cpu(), "synthetic": synthetic.cpu()}
    real, synthetic = negative_similarities(z1, z2, n_hard=min(cfg.loss.n_hard, 2 * n * world - 2), n_synthetic=n_syn,
                                            mode=cfg.loss.mode)
    return {"real": real.cpu(), "synthetic": synthetic.cpu()}


class _Progress:
    """A text progress bar printed at each quarter of an epoch: worker output reaches the driver
    (terminal or job log) line by line, where a redrawn bar would not."""

    def __init__(self, epoch: int, epochs: int, steps: int, say: Callable[[str], Any], marks: int = 4) -> None:
        self.epoch, self.epochs, self.steps, self.say = epoch, epochs, steps, say
        self.at = {max(1, round(steps * k / marks)) for k in range(1, marks)}
        self.start = time.perf_counter()

    def update(self, step: int, loss: torch.Tensor) -> None:
        if step in self.at:
            done = step / self.steps
            bar = "#" * round(20 * done)
            self.say(f"epoch {self.epoch:3d}/{self.epochs} [{bar:<20}] {step}/{self.steps} steps  loss {float(loss):.4f}  "
                     f"{time.perf_counter() - self.start:.0f} s")
