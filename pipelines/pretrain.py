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
from sscl.data.augment import TwoViewAugment, normalize_images
from sscl.data.sources import build_dataset, read_split
from sscl.evaluate import knn_top1, linear_probe_top1
from sscl.losses import get_loss, negative_similarities
from sscl.models import build_model
from sscl.train import build_optimizer, lr_at, retain_freed_memory, train_one_epoch

# Worker output goes through a logger: Ray Train forwards print() output to the driver twice.
log = logging.getLogger("sscl.pretrain")
RUN_NAME_TAG = "sscl.run_name"
FINISHED_TAG = "sscl.finished_epochs"  # set once the encoder of that many epochs is registered
STATE_FILE = "state.pt"


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


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: np.ndarray, cfg: Config, device: torch.device | str = "cpu") -> torch.Tensor:
    """Frozen features of uint8 (N, H, W, 3) images under the evaluation transform."""
    try:
        encoder.eval()
    except NotImplementedError:
        pass  # a registered (torch.export) encoder: already frozen in inference mode
    x = normalize_images(images, mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std))
    if x.shape[-1] != cfg.augment.crop_size:
        x = torch.nn.functional.interpolate(x, size=cfg.augment.crop_size, mode="bilinear", antialias=True)
    step = cfg.data.eval_batch_size
    return torch.cat([encoder(x[i : i + step].to(device)).float().cpu() for i in range(0, len(x), step)])


def knn_of(encoder: torch.nn.Module, eval_sets: dict[str, Any], cfg: Config, device="cpu") -> float:
    train_f = encode(encoder, eval_sets["train"].images, cfg, device)
    test_f = encode(encoder, eval_sets["test"].images, cfg, device)
    return knn_top1(train_f, torch.from_numpy(eval_sets["train"].labels), test_f, torch.from_numpy(eval_sets["test"].labels),
                    k=cfg.train.knn_k, temperature=cfg.train.knn_temperature)


# ---------------------------------------------------------------------------- the Ray Train worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: resumes from the latest checkpoint, trains, reports every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    log.setLevel(logging.INFO)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        retain_freed_memory()
    torch.manual_seed(cfg.train.seed + rank)

    model = model_from_config(cfg)
    if cfg.scaling.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]

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
    eval_sets = ray.get(config["eval_sets"]) if rank == 0 else None
    tracker = _RankZeroTracker(config) if rank == 0 else None
    if tracker:
        tracker.sync(history)  # epochs checkpointed before a crash but not logged yet

    if start_epoch >= cfg.train.epochs:  # resumed after the last epoch (e.g. the driver died while finishing)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save(state, Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(history[-1] if history else {"epoch": start_epoch}, checkpoint=checkpoint)
        return
    for epoch in range(start_epoch, cfg.train.epochs):
        batches = shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker)
        bar = _Progress(epoch + 1, cfg.train.epochs, steps_per_epoch) if rank == 0 else None
        result = train_one_epoch(
            model, batches, loss_fn, optimizer, lr_schedule=schedule, start_step=step, device=device,
            augment=augment, amp=cfg.train.amp and device.type == "cuda", max_steps=steps_per_epoch,
            on_step=bar.update if bar else None,
        )
        step = result.next_step
        metrics: dict[str, float] = {"epoch": epoch + 1}
        if rank == 0:
            knn = knn_of(module.encoder, eval_sets, cfg, device)
            metrics |= {"loss": result.loss, "lr": result.lr, "images_per_second": result.images_per_second * world,
                        "knn_top1": knn}
            history.append(dict(metrics))
            log.info(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {result.loss:.4f}  lr {result.lr:.4f}  "
                     f"img/s {metrics['images_per_second']:8.1f}  knn_top1 {knn:.4f}")
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if rank == 0:
                    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                "step": step, "history": history}, Path(folder) / STATE_FILE)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)
            if tracker:
                # Logged once checkpointed: an epoch redone after a crash is never logged twice.
                tracker.sync(history)
        else:
            ray.train.report(metrics)


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
    """Two fresh views per image every epoch, on a CPU actor pool unless made on the device."""
    import ray.data

    pretrain = pretrain.select_columns(["image"]).randomize_block_order()
    if cfg.augment.device == "cpu":
        # Not materialised: Ray Data re-executes the map every epoch, so the views are fresh.
        pretrain = pretrain.map_batches(
            TwoViewAugment, fn_constructor_kwargs=augment_kwargs(cfg), batch_size=256, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.augment.num_actors),
        )
    return pretrain


def prepare(cfg: Config) -> tuple[str, dict[str, Any]]:
    """Checks the tracking server (before any compute) and reads the evaluation splits.

    Returns:
        The resolved tracking URI and ``{"train": Split, "test": Split}`` for kNN and the probe.
    """
    from sscl import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_server(uri)
    return uri, {"train": read_split(cfg.data, "eval_train"), "test": read_split(cfg.data, "eval_test")}


def fit(cfg: Config, *, run_id: str, uri: str, eval_sets: dict[str, Any], callbacks: Sequence[Any] = ()):
    """Runs (or resumes) the Ray Train run ``train.run_name`` under ``train.storage_path``.

    Args:
        run_id: the MLflow run rank 0 logs each epoch into.
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).

    Returns:
        The ``ray.train.Result``; its checkpoint holds the model, optimizer and metric history.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    check_resources(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    check_storage(cfg.train.storage_path)
    # Ray Data's own bars only help on a terminal; in job logs they are thousands of lines.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    pretrain = build_dataset(cfg.data, "pretrain")
    n_pretrain = pretrain.count()  # from the blocks' metadata: nothing is read twice
    if n_pretrain < cfg.data.batch_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}: larger than the {n_pretrain} pretraining images")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "eval_sets": ray.put(eval_sets), "n_pretrain": n_pretrain},  # via the object store
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
        datasets={"train": _augmented(cfg, pretrain)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


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


def load_trained(cfg: Config, checkpoint) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """The model and per-epoch history saved in a Ray Train checkpoint of this pipeline."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model = model_from_config(cfg)
    model.load_state_dict(state["model"])
    return model, state["history"]


def main(cfg: Config) -> dict[str, Any]:
    """Pretrains, evaluates and registers; returns final metrics and the registered version."""
    started = time.perf_counter()
    uri, eval_sets = prepare(cfg)
    run_id = _mlflow_run(cfg, uri)
    finished = _finished_result(cfg, run_id)
    if finished is not None:
        return finished
    init_ray()
    result = fit(cfg, run_id=run_id, uri=uri, eval_sets=eval_sets)
    model, history = load_trained(cfg, result.checkpoint)
    return finish(cfg, model, history, eval_sets, run_id, uri, started)


def finish(cfg: Config, model: torch.nn.Module, history: list[dict[str, float]], eval_sets: dict[str, Any],
           run_id: str, uri: str, started: float, *, aliases: Sequence[str] = (),
           version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Final evaluation, plots, model logging and registration on the driver.

    The new version gets ``aliases`` and ``version_tags`` (a sweep's best: ``best-<sweep>``, its
    params and the sweep's run id), and the champion alias when it beats the current one.
    """
    import mlflow

    from sscl import tracking

    train_f = encode(model.encoder, eval_sets["train"].images, cfg)
    test_f = encode(model.encoder, eval_sets["test"].images, cfg)
    train_y, test_y = torch.from_numpy(eval_sets["train"].labels), torch.from_numpy(eval_sets["test"].labels)
    final = {
        "final_knn_top1": knn_top1(train_f, train_y, test_f, test_y, k=cfg.train.knn_k, temperature=cfg.train.knn_temperature),
        "linear_top1": linear_probe_top1(train_f, train_y, test_f, test_y, epochs=cfg.train.linear_epochs,
                                         seed=cfg.train.seed),
    }
    # Similarities of the final model on two fresh views of a batch of images.
    batch = eval_sets["train"].images[: min(256, len(eval_sets["train"].images))]
    view1, view2 = TwoViewAugment(**augment_kwargs(cfg), seed=cfg.train.seed).views(torch.from_numpy(batch))
    model.eval()
    with torch.no_grad():
        z1, z2 = model(view1)[1], model(view2)[1]
    n_hard = min(cfg.loss.n_hard, 2 * len(batch) - 2)
    n_syn = cfg.loss.n_synthetic if cfg.loss.name == "sscl" else 0
    real, synthetic = negative_similarities(z1, z2, n_hard=n_hard, n_synthetic=n_syn, mode=cfg.loss.mode)

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    tracking.wait_for_tracking_server(uri)  # down mid-run: the metrics wait in ``history``
    pending = log_history(client, run_id, history)  # epochs rank 0 could not log while the server was down
    if pending:
        print(f"logged {pending} epoch(s) of metrics that were pending while MLflow was unreachable")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(final)
        mlflow.log_figure(tracking.plot_curves(history), "curves.png")
        mlflow.log_figure(tracking.plot_similarity_histogram(real.numpy(), synthetic.numpy()), "similarity_histogram.png")
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
    out = {**final, "run_id": run_id, "model_name": cfg.tracking.model_name, "version": version, "champion": champion,
           "seconds": time.perf_counter() - started, "epochs": len(history)}
    labels = ", ".join([*aliases, *(["champion"] if champion else [])])
    print(f"registered {cfg.tracking.model_name} version {version}{f' ({labels})' if labels else ''}: "
          f"kNN top-1 {final['final_knn_top1']:.4f}, linear top-1 {final['linear_top1']:.4f} "
          f"(frozen encoder, {cfg.data.source} test split, {len(history)} epochs, {out['seconds']:.0f} s)")
    print(f"load it: mlflow.pytorch.load_model('models:/{cfg.tracking.model_name}/{version}')")
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
