"""Distributed SSCL pretraining: Ray Data -> Ray Train (DDP) -> evaluation -> MLflow registry.

    python -m pipelines.pretrain --config pipelines/configs/quickstart.yaml loss.temperature=0.2
    ray job submit --working-dir . -- python -m pipelines.pretrain --config ... scaling.use_gpu=true

Running the same command again with the same ``train.run_name`` resumes from the latest
checkpoint (and continues the same MLflow run) instead of starting over.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipelines.config_cli import config_yaml
from sscl.config import Config, flatten, from_dict, to_dict
from sscl.data.augment import TwoViewAugment
from sscl.data.sources import BadImages, CorruptDataError, build_dataset
from sscl.evaluate import evaluate_encoder, extract_features
from sscl.losses import get_loss, negative_similarities
from sscl.models import build_model
from sscl.train import build_optimizer, lr_at, train_one_epoch

# Worker output goes through a logger: Ray Train forwards print() output to the driver twice.
log = logging.getLogger("sscl.pretrain")
RUN_NAME_TAG = "sscl.run_name"
FINISHED_TAG = "sscl.finished_epochs"  # set once the encoder of that many epochs is registered
STATE_FILE = "state.pt"
EVAL_DATASETS = ("eval_train", "eval_test")


# ---------------------------------------------------------------------------- shared helpers


def augment_kwargs(cfg: Config) -> dict[str, Any]:
    """``TwoViewAugment`` keywords from the ``augment`` section (same field names)."""
    a = cfg.augment
    return dict(crop_size=a.crop_size, crop_scale=tuple(a.crop_scale), flip_p=a.flip_p, jitter_p=a.jitter_p,
                brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
                grayscale_p=a.grayscale_p, blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma), mean=tuple(a.mean),
                std=tuple(a.std))


def model_from_config(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    return build_model(m.encoder, stem=m.stem, width=m.width, hidden_dim=m.hidden_dim, out_dim=m.out_dim,
                       head_batchnorm=m.head_batchnorm)


def loss_from_config(cfg: Config):
    loss = cfg.loss
    return get_loss(loss.name, temperature=loss.temperature, beta=loss.beta, tau_plus=loss.tau_plus,
                    n_hard=loss.n_hard, n_synthetic=loss.n_synthetic, mode=loss.mode)


def encode(encoder: torch.nn.Module, images: np.ndarray, cfg: Config, device: torch.device | str = "cpu") -> torch.Tensor:
    """Frozen features (N, F) on the CPU of uint8 (N, H, W, 3) images held in memory (e.g. a user's
    ``.npy`` batch), under the evaluation transform."""
    step = cfg.data.eval_batch_size
    batches = ({"image": images[i : i + step], "label": np.zeros(len(images[i : i + step]), dtype=np.int64)}
               for i in range(0, len(images), step))
    features, _ = extract_features(encoder, batches, device=device, **eval_transform(cfg))
    return features.cpu()


def eval_transform(cfg: Config) -> dict[str, Any]:
    """``extract_features`` keywords: the training crop size and normalisation."""
    return dict(image_size=cfg.augment.crop_size, mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std))


def evaluate_on_workers(model: torch.nn.Module, cfg: Config, device: torch.device) -> tuple[dict[str, float], dict]:
    """kNN and linear top-1 of the encoder, every rank encoding its shard of the evaluation sets on
    its own device (call on every rank); also anchor-negative similarities for the histogram.

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
    return metrics, _similarities(module, first["image"], cfg, device)


@torch.no_grad()
def _similarities(module: torch.nn.Module, images: torch.Tensor, cfg: Config, device: torch.device) -> dict:
    """Real and synthetic negative similarities of the current model on two fresh views of a few
    evaluation images (every rank takes the same number, as the loss gathers across ranks)."""
    n = torch.tensor([min(len(images), 64)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        world = torch.distributed.get_world_size()
    else:
        world = 1
    n = int(n.item())
    view1, view2 = TwoViewAugment(**augment_kwargs(cfg), seed=cfg.train.seed).views(images[:n].to(device))
    was_training = module.training
    module.eval()
    z1, z2 = module(view1)[1].float(), module(view2)[1].float()
    module.train(was_training)
    n_syn = cfg.loss.n_synthetic if cfg.loss.name == "sscl" else 0
    real, synthetic = negative_similarities(z1, z2, n_hard=min(cfg.loss.n_hard, 2 * n * world - 2), n_synthetic=n_syn,
                                            mode=cfg.loss.mode)
    return {"real": real.cpu(), "synthetic": synthetic.cpu()}


# ---------------------------------------------------------------------------- the Ray Train worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: resumes from the latest checkpoint, trains, evaluates on its shard of the
    evaluation sets, reports every epoch."""
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
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "similarities": None, "initial": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = {"similarities": None, "initial": None, **torch.load(Path(folder) / STATE_FILE,
                                                                         map_location=device, weights_only=True)}
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    per_worker = cfg.data.batch_size // world
    steps_per_epoch = config["n_pretrain"] // cfg.data.batch_size
    total_steps = steps_per_epoch * cfg.train.epochs

    def schedule(s: int) -> float:
        return lr_at(s, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
                     total_steps=total_steps, final_lr=cfg.optim.final_lr)

    on_gpu = cfg.augment.device == "gpu"
    augment = TwoViewAugment(**augment_kwargs(cfg), seed=cfg.train.seed * 1000 + rank).views if on_gpu else None
    loss_fn = loss_from_config(cfg)
    shard = ray.train.get_dataset_shard("train")
    tracker = _RankZeroTracker(config) if rank == 0 else None
    if tracker:
        tracker.sync(state["history"])  # epochs checkpointed before a crash but not logged yet

    def save(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save({**state, "model": module.state_dict(), "optimizer": optimizer.state_dict()},
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
        state["initial"], _ = evaluate_on_workers(model, cfg, device)
        if rank == 0:
            log.info("before training: " + "  ".join(f"{k} {v:.4f}" for k, v in state["initial"].items()))
    for epoch in range(state["epoch"], cfg.train.epochs):
        batches = shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker)
        bar = _Progress(epoch + 1, cfg.train.epochs, steps_per_epoch) if rank == 0 else None
        result = train_one_epoch(
            model, batches, loss_fn, optimizer, lr_schedule=schedule, start_step=state["step"], device=device,
            augment=augment, amp=cfg.train.amp and device.type == "cuda", max_steps=steps_per_epoch,
            on_step=bar.update if bar else None,
        )
        last = epoch + 1 == cfg.train.epochs
        metrics: dict[str, float] = {"epoch": epoch + 1, "loss": result.loss, "lr": result.lr,
                                     "images_per_second": result.images_per_second * world}
        if (epoch + 1) % cfg.train.knn_every == 0 or last:
            evaluated, state["similarities"] = evaluate_on_workers(model, cfg, device)
            metrics |= evaluated
        if cfg.data.skip_corrupt and rank == 0:
            metrics["skipped_images"] = ray.get(config["bad_images"].count.remote())
        state["epoch"], state["step"] = epoch + 1, result.next_step
        if rank == 0:
            state["history"].append(dict(metrics))
            log.info(_epoch_line(metrics, cfg.train.epochs))
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            save(metrics)
        else:
            ray.train.report(metrics)


def _epoch_line(metrics: dict[str, float], epochs: int) -> str:
    line = (f"epoch {int(metrics['epoch']):3d}/{epochs}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.4f}  "
            f"img/s {metrics['images_per_second']:8.1f}")
    for key in ("knn_top1", "linear_top1", "skipped_images"):
        if key in metrics:
            line += f"  {key} {metrics[key]:.4f}" if key != "skipped_images" else f"  skipped {int(metrics[key])}"
    return line


class _Progress:
    """A text progress bar printed at each quarter of an epoch: worker output reaches the driver
    (terminal or job log) line by line, where a redrawn bar would not."""

    def __init__(self, epoch: int, epochs: int, steps: int, marks: int = 4) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.at = {max(1, round(steps * k / marks)) for k in range(1, marks)}
        self.start = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if step in self.at:
            done = step / self.steps
            bar = "#" * round(20 * done)
            log.info(f"epoch {self.epoch:3d}/{self.epochs} [{bar:<20}] {step}/{self.steps} steps  loss {loss:.4f}  "
                     f"{time.perf_counter() - self.start:.0f} s")


class _RankZeroTracker:
    """Per-epoch metrics into the driver's MLflow run (rank 0 only), each epoch exactly once.

    ``sync(history)`` logs the checkpointed epochs the run does not have yet. If the tracking server
    is unreachable, training goes on: the epochs stay pending, a warning says how many, and the next
    sync (or the driver at the end) logs them.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import mlflow

        # Fail fast per call instead of MLflow's default of minutes of retries: a later sync retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id = config["mlflow_run_id"]
        mlflow.set_tracking_uri(config["tracking_uri"])
        self.client = mlflow.MlflowClient()

    def sync(self, history: list[dict[str, float]]) -> None:
        try:
            log_history(self.client, self.run_id, history)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            log.warning(f"MLflow unreachable ({type(err).__name__}: {str(err)[:200]}); "
                        f"epoch metrics kept in the checkpoint and retried at the next checkpoint")


def log_history(client, run_id: str, history: list[dict[str, float]]) -> int:
    """Logs each epoch of ``history`` that ``run_id`` lacks (by ``epoch`` step); returns how many."""
    from mlflow.entities import Metric

    have = {m.step for m in client.get_metric_history(run_id, "epoch")}
    missing = [h for h in history if int(h["epoch"]) not in have]
    now = int(time.time() * 1000)
    for h in missing:
        # "epoch" last: its presence marks the epoch as logged in full.
        items = sorted(h.items(), key=lambda kv: kv[0] == "epoch")
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(h["epoch"])) for k, v in items])
    return len(missing)


# ---------------------------------------------------------------------------- the driver


def _finished_result(cfg: Config, run_id: str) -> dict[str, Any] | None:
    """The recorded result when this run name already finished ``train.epochs`` epochs."""
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    if run.data.tags.get(FINISHED_TAG) != str(cfg.train.epochs):
        return None
    result = {"run_id": run_id, "epochs": cfg.train.epochs, "model_name": cfg.tracking.model_name,
              "version": run.data.tags.get("sscl.registered_version"), "champion": None,
              **{k: run.data.metrics[k] for k in ("final_knn_top1", "linear_top1") if k in run.data.metrics}}
    print(f"run {cfg.train.run_name!r} already finished {cfg.train.epochs} epochs (registered version "
          f"{result['version']}); set a new train.run_name, or a larger train.epochs to continue it")
    return result


def open_run(cfg: Config, uri: str, *, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """The MLflow run named ``run_name`` in ``tracking.experiment``, created (with ``params``, ``tags``
    and the redacted config as ``config.yaml``) if it does not exist yet.

    One run per name, like Ray Train's checkpoints: a resumed or extended training appends to the run
    it continues.
    """
    import mlflow

    from sscl.tracking import log_params

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    previous = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if previous:
        return previous[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    with mlflow.start_run(run_id=run.info.run_id):
        log_params(params)
        mlflow.log_text(config_yaml(cfg), "config.yaml")
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _mlflow_run(cfg: Config, uri: str) -> str:
    """The run of ``train.run_name``, with every config key but the sweep's (``tune.*``) as params."""
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")}
    return open_run(cfg, uri, run_name=cfg.train.run_name, params=params)


def storage_path(path: str) -> str | None:
    """Ray Train needs absolute local paths; URIs (s3://, gs://) pass through."""
    if not path or "://" in path:
        return path or None
    return str(Path(path).expanduser().resolve())


def init_ray() -> None:
    """Joins the cluster in ``RAY_ADDRESS`` (a job or ``ray start``), else starts a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # A new local cluster (not one `ray start` left running: set RAY_ADDRESS=auto to join that).
        # On small machines, more logical CPUs than cores keep the Train workers and the Ray Data
        # actors from waiting on each other.
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1))


def _augmented(cfg: Config, pretrain):
    """Two fresh views per image every epoch, made in the Ray Data tasks that decode the images
    unless made on the training device.

    No global shuffle (an all-to-all barrier that would read the whole dataset before the first
    batch): the files are read in a new seeded order each epoch and the workers shuffle locally.
    """
    import ray.data

    pretrain = pretrain.select_columns(["image"])
    if cfg.augment.device == "cpu":
        # Plain tasks, fused with decoding, scale with the cluster's free CPUs; a fixed actor pool
        # caps decoding at its size (on 2 cores both give ~800 img/s: `benchmark ingest`).
        # Not materialised: Ray Data re-executes the map every epoch, so the views are fresh.
        tasks = ray.data.TaskPoolStrategy(size=cfg.augment.max_tasks) if cfg.augment.max_tasks else None
        pretrain = pretrain.map_batches(two_views, fn_kwargs={"augment": augment_kwargs(cfg)}, batch_size=256,
                                        batch_format="numpy", compute=tasks)
    return pretrain


def two_views(batch: dict[str, np.ndarray], *, augment: dict[str, Any]) -> dict[str, np.ndarray]:
    """A Ray Data task's step: ``TwoViewAugment`` (cheap to build) on a batch of decoded images."""
    return TwoViewAugment(**augment)(batch)


def build_datasets(cfg: Config, bad_images: Any = None) -> tuple[dict[str, Any], int]:
    """The lazy training and evaluation datasets (listing only: nothing is decoded here).

    Returns:
        ``{"train", "eval_train", "eval_test"}`` Ray Datasets and the number of pretraining images.

    Raises:
        FileNotFoundError, ConnectionError, ValueError: naming the path or key, before any worker starts.
    """
    pretrain = build_dataset(cfg.data, "pretrain", seed=cfg.train.seed, bad_images=bad_images)
    if pretrain.num_images < cfg.data.batch_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}: larger than the {pretrain.num_images} pretraining "
                         "images")
    datasets = {
        "train": _augmented(cfg, pretrain.dataset),
        "eval_train": build_dataset(cfg.data, "eval_train", max_images=cfg.train.knn_max_images,
                                    bad_images=bad_images).dataset,
        "eval_test": build_dataset(cfg.data, "eval_test", bad_images=bad_images).dataset,
    }
    return datasets, pretrain.num_images


def _data_config():
    """Ray Train's dataset sharding: the training set split equally (every DDP worker takes the
    same number of steps), the evaluation sets split exactly (every image evaluated once)."""
    import ray.train

    class ExactEvalSplit(ray.train.DataConfig):
        # Ray Train configures one dataset per call, when the workers first ask for its shard.
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            exact = {k: v for k, v in datasets.items() if k in EVAL_DATASETS}
            output = super().configure({k: v for k, v in datasets.items() if k not in exact}, world_size,
                                       worker_handles, worker_node_ids, **kwargs)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in exact.items():
                ds = ds.copy(ds)
                ds.set_name(name)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            return output

    return ExactEvalSplit()


def bad_images_actor():
    """A ``BadImages`` actor: the decoding tasks report undecodable images to it."""
    import ray

    return ray.remote(BadImages).options(num_cpus=0).remote()


def prepare(cfg: Config) -> str:
    """Checks the tracking server before any compute; returns the resolved tracking URI."""
    from sscl import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_server(uri)
    return uri


def fit(cfg: Config, *, run_id: str, uri: str, datasets: dict[str, Any] | None = None, n_pretrain: int = 0,
        bad_images: Any = None, callbacks: Sequence[Any] = ()):
    """Runs (or resumes) the Ray Train run ``train.run_name`` under ``train.storage_path``.

    Args:
        run_id: the MLflow run rank 0 logs each epoch into.
        datasets, n_pretrain, bad_images: from ``build_datasets`` / ``bad_images_actor`` (built here if not given).
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).

    Returns:
        The ``ray.train.Result``; its checkpoint holds the model, optimizer and metric history.

    Raises:
        CorruptDataError: naming an undecodable file met while streaming (``data.skip_corrupt=false``).
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    check_resources(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    check_storage(cfg.train.storage_path)
    # Ray Data's own bars only help on a terminal; in job logs they are thousands of lines.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if datasets is None:
        bad_images = bad_images_actor()
        datasets, n_pretrain = build_datasets(cfg, bad_images)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "n_pretrain": n_pretrain, "bad_images": bad_images},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name, storage_path=storage_path(cfg.train.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # controller_failure_limit: a worker group that cannot start (resources gone) fails the
            # run after a few attempts (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) instead of for ever.
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=2),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    try:
        return trainer.fit()
    except Exception:  # re-raised unchanged unless a decoding task said it met an undecodable image
        message = ray.get(bad_images.first_error.remote(), timeout=30)
        if message:
            raise CorruptDataError(message) from None
        raise


def check_resources(cfg: Config, nodes: Sequence[dict[str, float]]) -> None:
    """Fails at once when ``scaling`` asks for more than the cluster's alive ``nodes`` hold.

    Raises:
        ValueError: naming the scaling keys, what they ask for and what the cluster has.
    """
    s = cfg.scaling
    gpus = 1.0 if s.use_gpu else 0.0
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    # Workers are placed whole: count how many fit node by node.
    fit = sum(min(math.floor(n.get("CPU", 0.0) / s.cpus_per_worker + 1e-9),
                  math.floor(n.get("GPU", 0.0) / gpus) if gpus else 10**9) for n in nodes)
    if fit < s.num_workers:
        ask = f"{s.cpus_per_worker:g} CPU{' + 1 GPU' if gpus else ''}"
        raise ValueError(
            f"scaling.num_workers={s.num_workers} x ({ask}) (scaling.cpus_per_worker, scaling.use_gpu) does not fit: "
            f"the cluster has {total_cpu:g} CPUs and {total_gpu:g} GPUs on {len(nodes)} node(s), room for {fit} "
            "worker(s); lower scaling.num_workers / scaling.cpus_per_worker or add nodes"
        )


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def check_storage(path: str) -> None:
    """On a multi-node cluster, a local ``train.storage_path`` must be visible from every node.

    A marker file written here is looked for by a task pinned to each alive node. URIs (s3://,
    gs://, ...) pass; so does anything on one node.

    Raises:
        ValueError: naming the nodes that cannot see the path, and what to use instead.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2 or "://" in (path or ""):
        return
    root = Path(storage_path(path) or Path("~/ray_results").expanduser())
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".sscl-shared-{os.getpid()}-{time.time_ns()}"
    marker.write_text("written by the driver: is this storage shared by every node?")
    try:
        probe = ray.remote(num_cpus=0)(_path_exists)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(marker)) for n in nodes], timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ValueError(
            f"train.storage_path={path or '~/ray_results'!r} is local to this node: node(s) {', '.join(blind)} of this "
            f"{len(nodes)}-node cluster cannot see it. Use storage every node shares: an NFS mount at the same path "
            "on all nodes, or object storage (s3://bucket/path, gs://bucket/path)"
        )


def load_trained(cfg: Config, checkpoint) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and training state (``history``, ``similarities``) saved in a checkpoint of this pipeline."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model = model_from_config(cfg)
    model.load_state_dict(state.pop("model"))
    return model, state


def main(cfg: Config) -> dict[str, Any]:
    """Pretrains, evaluates on the workers and registers; returns final metrics and the registered version."""
    started = time.perf_counter()
    uri = prepare(cfg)
    init_ray()
    bad_images = bad_images_actor()
    datasets, n_pretrain = build_datasets(cfg, bad_images)  # bad paths fail here, before a run is created
    run_id = _mlflow_run(cfg, uri)
    finished = _finished_result(cfg, run_id)
    if finished is not None:
        return finished
    result = fit(cfg, run_id=run_id, uri=uri, datasets=datasets, n_pretrain=n_pretrain, bad_images=bad_images)
    model, state = load_trained(cfg, result.checkpoint)
    return finish(cfg, model, state, run_id, uri, started)


def finish(cfg: Config, model: torch.nn.Module, state: dict[str, Any], run_id: str, uri: str, started: float, *,
           aliases: Sequence[str] = (), version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Logs the final metrics (computed by the workers at the last evaluated epoch), plots and the
    encoder; registers it when ``tracking.register``.

    The new version gets ``aliases`` and ``version_tags`` (a sweep's best: ``best-<sweep>``, its
    params and the sweep's run id), and the champion alias when it beats the current one.
    """
    import mlflow

    from sscl import tracking

    history = state["history"]
    evaluated = [h for h in history if "knn_top1" in h]
    if not evaluated:
        raise RuntimeError(f"run {cfg.train.run_name!r} has no evaluated epoch in its checkpoint")
    final = {"final_knn_top1": evaluated[-1]["knn_top1"], "linear_top1": evaluated[-1]["linear_top1"]}
    initial = {f"initial_{k}": v for k, v in (state.get("initial") or {}).items()}  # the untrained encoder
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    tracking.wait_for_tracking_server(uri)  # down mid-run: the metrics wait in ``history``
    pending = log_history(client, run_id, history)  # epochs rank 0 could not log while the server was down
    if pending:
        print(f"logged {pending} epoch(s) of metrics that were pending while MLflow was unreachable")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({**final, **initial})
        mlflow.log_figure(tracking.plot_curves(history), "curves.png")
        if state.get("similarities"):
            sims = state["similarities"]
            mlflow.log_figure(tracking.plot_similarity_histogram(sims["real"].numpy(), sims["synthetic"].numpy()),
                              "similarity_histogram.png")
        info = tracking.log_encoder(model.encoder, image_size=cfg.augment.crop_size,
                                    model_name=cfg.tracking.model_name if cfg.tracking.register else None)
    version = getattr(info, "registered_model_version", None)
    client.set_tag(run_id, FINISHED_TAG, str(len(history)))
    client.set_tag(run_id, "sscl.registered_version", str(version))
    champion = False
    if version is not None:
        for alias in aliases:
            client.set_registered_model_alias(cfg.tracking.model_name, alias, str(version))
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(cfg.tracking.model_name, str(version), key, value)
        champion = tracking.promote_if_better(cfg.tracking.model_name, version, knn_top1=final["final_knn_top1"],
                                              dataset=cfg.data.source)
    out = {**final, **initial, "run_id": run_id, "model_name": cfg.tracking.model_name, "version": version, "champion": champion,
           "seconds": time.perf_counter() - started, "epochs": len(history),
           "skipped_images": int(history[-1].get("skipped_images", 0))}
    labels = ", ".join([*aliases, *(["champion"] if champion else [])])
    untrained = (f" (untrained: {initial['initial_knn_top1']:.4f}, {initial['initial_linear_top1']:.4f})"
                 if initial else "")
    scores = (f"kNN top-1 {final['final_knn_top1']:.4f}, linear top-1 {final['linear_top1']:.4f}{untrained} "
              f"(frozen encoder, {cfg.data.source} evaluation set, {len(history)} epochs, {out['seconds']:.0f} s)")
    if out["skipped_images"]:
        print(f"skipped {out['skipped_images']} undecodable image(s) (data.skip_corrupt=true); see the "
              "skipped_images metric")
    if version is not None:
        print(f"registered {cfg.tracking.model_name} version {version}{f' ({labels})' if labels else ''}: {scores}")
        print(f"load it: mlflow.pytorch.load_model('models:/{cfg.tracking.model_name}/{version}')")
    else:
        print(f"trained (not registered: tracking.register=false): {scores}")
    print(f"browse:  mlflow ui --backend-store-uri {tracking.redact_uri(uri)}")
    return out


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config

    cfg = parse_config(argv, prog="python -m pipelines.pretrain", description=__doc__)
    try:
        return main(cfg)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
