"""One Ray Train worker of a pretraining run: resume, train, evaluate on its shard, checkpoint, report."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sscl.build import decodes_on_device, views_in_trainer
from sscl.config import Config, from_dict
from sscl.data.decode import DataError
from sscl.recipe import EpochMetrics, Recipe, TrainingState
from sscl.tracking import EpochLogger

# Worker output goes through a logger: Ray Train forwards print() output to the driver twice.
log = logging.getLogger("sscl.pretrain")
SIMILARITIES_FILE = "similarities.pt"  # in the last checkpoint only: the histogram's sample


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
    recipe = Recipe(cfg, steps_per_epoch=config["n_pretrain"] // cfg.data.batch_size, device=device, rank=rank,
                    world=world, prepare=ray.train.torch.prepare_model, views_here=views_in_trainer(cfg))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            recipe.restore(TrainingState.load(folder, map_location=device))
    state = recipe.state
    shard = ray.train.get_dataset_shard("train")
    tracker = EpochLogger(config["tracking_uri"], config["mlflow_run_id"], log.warning) if rank == 0 else None
    board = config.get("progress")  # the driver prints what rank 0 posts there (pipelines.console)
    say = (lambda line: board.post.remote(line)) if board is not None else log.info
    if tracker:
        tracker.sync(_flat(state.history))  # epochs checkpointed before a crash but not logged yet
    if checkpoint and rank == 0 and not recipe.done:
        queue = " and key queue" if recipe.moco is not None else ""
        say(f"resumed after epoch {state.epoch}: model, optimiser{queue} restored")

    def evaluate(similarities: bool = False):
        def batches(name: str):
            return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=cfg.data.eval_batch_size)

        return recipe.evaluate(batches("eval_train"), batches("eval_test"), similarities=similarities)

    def save(metrics: dict[str, float], similarities: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                recipe.checkpoint().save(folder)
                if similarities is not None:  # the last epoch's, for the driver's histogram
                    torch.save(similarities, Path(folder) / SIMILARITIES_FILE)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)
        if tracker:
            # Logged once checkpointed: an epoch redone after a crash is never logged twice.
            tracker.sync(_flat(recipe.state.history))

    if recipe.done:  # resumed after the last epoch (e.g. the driver died while finishing)
        first = next(iter(ray.train.get_dataset_shard("eval_train").iter_torch_batches(batch_size=64)), None)
        similarities = recipe.similarities(first["image"] if first is not None else None)  # every rank takes part
        save(state.history[-1].flat() if state.history else {"epoch": state.epoch}, similarities)
        return
    if state.epoch == 0:
        # The same protocol on the untrained encoder: the yardstick for what pretraining bought.
        state.initial, _ = evaluate()
        if rank == 0:
            say("before training: " + "  ".join(f"{k} {v:.4f}" for k, v in state.initial.items()))
    while not recipe.done:
        batches = _epoch_batches(shard, cfg, cfg.data.batch_size // world, device, world, config.get("bad_images"))
        bar = _Progress(state.epoch + 1, cfg.train.epochs, recipe.steps_per_epoch, say) if rank == 0 else None
        metrics = recipe.train_epoch(batches, on_step=bar.update if bar else None)
        similarities = None
        if recipe.evaluates_after(metrics.epoch):
            evaluated, similarities = evaluate(similarities=recipe.done)
            metrics = dataclasses.replace(metrics, **evaluated)
        if cfg.data.skip_corrupt and rank == 0:
            metrics = dataclasses.replace(metrics, skipped_images=ray.get(config["bad_images"].count.remote()))
        recipe.record(metrics)
        if rank == 0:
            say(metrics.line(cfg.train.epochs))
        if metrics.epoch % cfg.train.checkpoint_every == 0 or recipe.done:
            save(metrics.flat(), similarities)
        else:
            ray.train.report(metrics.flat())


def _flat(history: list[EpochMetrics]) -> list[dict[str, float]]:
    return [m.flat() for m in history]


def _epoch_batches(shard: Any, cfg: Config, per_worker: int, device: torch.device, world: int, bad_images: Any):
    """One epoch of this worker's training batches: from Ray Data as made there, or, with
    ``placement.decode=device``, encoded images decoded here on ``device`` (``sscl.data.device_decode``)."""
    shuffle = dict(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
                   prefetch_batches=cfg.data.prefetch_batches)
    if not decodes_on_device(cfg):
        return shard.iter_torch_batches(**shuffle, pin_memory=device.type == "cuda")
    return _decoded_here(shard.iter_batches(**shuffle, batch_format="numpy"), cfg, per_worker, device, world,
                         bad_images)


def _decoded_here(batches, cfg: Config, per_worker: int, device: torch.device, world: int, bad_images: Any):
    from sscl.data.device_decode import decode_batch
    from sscl.data.decode import Decoder

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
