"""Distributed SSCL pretraining, the driver: Ray Data -> Ray Train (DDP) -> MLflow registry.

    python -m pipelines.pretrain --config pipelines/configs/quickstart.yaml loss.temperature=0.2
    ray job submit --working-dir . -- python -m pipelines.pretrain --config ... scaling.use_gpu=true

Running the same command again with the same ``train.run_name`` resumes from the latest
checkpoint (and continues the same MLflow run) instead of starting over. The workers' loop is in
``pipelines.worker``, the datasets in ``pipelines.datasets``, the cluster checks in ``pipelines.ray_checks``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pipelines import console
from sscl.build import model_from_config
from pipelines.config_cli import config_yaml
from pipelines.errors import Interrupted, guarded
from pipelines.datasets import bad_images_actor, build_datasets, data_config, named_data_errors
from pipelines.ray_checks import (alive_resources, check_resources, check_storage, check_storage_path, init_ray,
                                  stop_local_ray, storage_path)
from pipelines.worker import SIMILARITIES_FILE, train_loop_per_worker
from sscl import tracking
from sscl.config import RESUMABLE_KEYS, Config, flatten, resume_changes, to_dict
from sscl.data.sources import check_roots
from sscl.recipe import TrainingState


def prepare(cfg: Config) -> str:
    """Checks names, the tracking store and the checkpoint storage before any compute; returns the
    resolved tracking URI."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_names(experiment=cfg.tracking.experiment,
                         model_name=cfg.tracking.model_name if cfg.tracking.register else None)
    tracking.check_tracking_server(uri)
    check_storage_path(cfg.train.storage_path)
    return uri


def open_run(cfg: Config, uri: str, *, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """The MLflow run ``run_name`` in ``tracking.experiment`` (see ``tracking.open_run``)."""
    return tracking.open_run(uri, cfg.tracking.experiment, run_name=run_name, params=params,
                             config_text=config_yaml(cfg), tags=tags)


def _finished_result(cfg: Config, uri: str, run_id: str) -> dict[str, Any] | None:
    """The recorded result when this run name already finished ``train.epochs`` epochs."""
    tags, metrics = tracking.run_record(uri, run_id)
    if tags.get(tracking.FINISHED_TAG) != str(cfg.train.epochs):
        return None
    result = {"run_id": run_id, "epochs": cfg.train.epochs, "model_name": cfg.tracking.model_name,
              "version": tags.get(tracking.VERSION_TAG), "champion": None,
              **{k: metrics[k] for k in ("final_knn_top1", "linear_top1") if k in metrics}}
    print(f"run {cfg.train.run_name!r} already finished {cfg.train.epochs} epochs (registered version "
          f"{result['version']}); set a new train.run_name, or a larger train.epochs to continue it")
    return result


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
        DataError: naming an undecodable file met while streaming (``data.skip_corrupt=false``), or what made
            evaluation meaningless (one class); the run is stopped at once, not retried.
    """
    import ray
    import ray.data
    import ray.train

    check_resources(cfg, alive_resources())
    check_storage(cfg.train.storage_path)
    console.quiet_ray_data()
    progress = ray.remote(console.ProgressLines).options(num_cpus=0).remote()
    if datasets is None:
        bad_images = bad_images_actor()
        datasets, n_pretrain = build_datasets(cfg, bad_images)
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "n_pretrain": n_pretrain, "bad_images": bad_images, "progress": progress},
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
        dataset_config=data_config(),
    )
    watcher = _stop_on_data_error(trainer, bad_images)
    with named_data_errors(bad_images):  # the data's errors are not retried
        with console.library_output() as shown, watcher:  # the run's own lines go to the console
            with console.Printer(progress, show=lambda line: print(line, file=shown, flush=True)):
                return trainer.fit()


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """A TorchTrainer whose run can be stopped from the driver: on Ctrl-C or SIGTERM (raised here as
        ``KeyboardInterrupt`` once the workers are stopped, where Ray's handler exits 0 or 1 without a
        word), and on a data error (``stop``), which retrying from a checkpoint would only meet again."""

        controller = None

        def _register_sigint_handler(self, controller):  # Ray Train 2.60's hook, called in the main thread
            self.controller = controller

            def interrupt(signum, frame):
                self.stop()
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, interrupt)

        def stop(self) -> None:
            import ray

            if self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the controller exits while answering
                    pass

    return Trainer


def _stop_on_data_error(trainer: Any, bad_images: Any) -> console.Every:
    """While open, stops ``trainer`` as soon as a decoding task or worker reports a data error."""
    import ray

    def check() -> bool:
        try:
            failed = ray.get(bad_images.first_error.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the watch must never stop a run
            return False
        if failed:
            trainer.stop()
        return bool(failed)

    return console.Every(check, every_s=2.0, name="sscl-data-errors")


def load_trained(cfg: Config, checkpoint) -> tuple[torch.nn.Module, TrainingState, dict | None]:
    """The model, training state and (in a run's last checkpoint) the histogram's similarity sample
    saved in a checkpoint of this pipeline."""
    with checkpoint.as_directory() as folder:
        state = TrainingState.load(folder)
        sample = Path(folder) / SIMILARITIES_FILE
        similarities = torch.load(sample, weights_only=True) if sample.is_file() else None
    model = model_from_config(cfg)
    model.load_state_dict(state.model)
    return model, state, similarities


def main(cfg: Config, *, command: str = "") -> dict[str, Any]:
    """Pretrains, evaluates on the workers and registers; returns final metrics and the registered version.

    ``command`` is the command line that started the run, shown as the way to resume it when interrupted.
    """
    started = time.perf_counter()
    check_roots(cfg.data)  # a mistyped path fails here, before Ray or MLflow start
    uri = prepare(cfg)
    changes = check_resume(cfg, uri)  # a rerun with other values fails here, before any compute
    init_ray(dashboard=False)  # one Train run: no dashboard needed (ray_checks.init_ray)
    check_resources(cfg, alive_resources())  # scaling the cluster cannot hold fails here, before a run is created
    bad_images = bad_images_actor()
    datasets, n_pretrain = build_datasets(cfg, bad_images)  # bad paths fail here, too
    run_id = open_run(cfg, uri, run_name=cfg.train.run_name, params=flatten(cfg))
    print(settings_line(cfg, n_pretrain, uri))
    finished = _finished_result(cfg, uri, run_id)
    if finished is not None:
        return finished
    if changes:
        tracking.record_resume_changes(uri, run_id, changes, epoch=tracking.recorded_config(uri, run_id)[1])
    tracking.mark_running(uri, run_id)  # a resumed run that ended FAILED or KILLED
    with ended_as_failed_or_killed(uri, run_id, resume=command):
        result = fit(cfg, run_id=run_id, uri=uri, datasets=datasets, n_pretrain=n_pretrain, bad_images=bad_images)
        model, state, similarities = load_trained(cfg, result.checkpoint)
        return finish(cfg, model, state, run_id, uri, started, similarities=similarities)


def check_resume(cfg: Config, uri: str) -> dict[str, tuple[str, str]]:
    """A rerun under an existing ``train.run_name`` must train what that run trained: returns the
    changes it may make (``RESUMABLE_KEYS``), which are recorded in the run once it resumes.

    Raises:
        ValueError: listing every key whose value differs from the run's, and the ways out.
    """
    found = tracking.named_run(uri, cfg.tracking.experiment, cfg.train.run_name)
    if found is None:
        return {}
    recorded, epochs = tracking.recorded_config(uri, found[0])
    allowed, refused = resume_changes(recorded, cfg, trained_epochs=epochs)
    if refused:
        listed = "\n".join(f"  {key}: {old} (recorded) -> {new}" for key, (old, new) in refused.items())
        raise ValueError(
            f"train.run_name={cfg.train.run_name!r} names a run (MLflow {found[0]}, {epochs} epoch(s) trained) that was "
            f"started with other values; rerunning it resumes it, so these must stay as recorded:\n{listed}\n"
            f"Give the recorded values to resume it, or a new train.run_name to start another run. A resume may change "
            f"only {', '.join(RESUMABLE_KEYS)} (train.epochs only upwards)")
    if allowed:
        print(f"resuming run {cfg.train.run_name!r} with " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in
                                                                           allowed.items()) + " (recorded in its params)")
    return allowed


@contextlib.contextmanager
def ended_as_failed_or_killed(uri: str, run_id: str, *, resume: str) -> Iterator[None]:
    """Inside, whatever ends the run early marks its MLflow run FAILED (an error) or KILLED (Ctrl-C,
    SIGTERM; then ``Interrupted`` says how to resume). Outside Ray Train's own handler, SIGTERM is
    raised as ``KeyboardInterrupt`` too."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        _end_quietly(uri, run_id, "KILLED")
        raise Interrupted(f"run interrupted; MLflow run {run_id} marked KILLED; its checkpoints are kept",
                          resume=resume) from None
    except BaseException:
        _end_quietly(uri, run_id, "FAILED")
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _end_quietly(uri: str, run_id: str, status: str) -> None:
    try:
        tracking.end_run(uri, run_id, status)
    except Exception:  # noqa: BLE001 - the error that ended the run is what the user needs to see
        pass


def settings_line(cfg: Config, n_pretrain: int, uri: str) -> str:
    """The run's key settings, printed once at the start."""
    loss, model, scaling = cfg.loss, cfg.model, cfg.scaling
    hyper = "".join(f" {key} {value:g}" if isinstance(value, float) else f" {key} {value}"
                    for key, value in loss.kwargs().items())  # the keys this loss takes
    device = "GPU" if scaling.use_gpu else "CPU"
    splits = f", BatchNorm in {model.bn_splits} parts" if model.bn_splits > 1 else ""
    moco = f"moco (queue {model.queue_size}, momentum {model.momentum:g}{splits}), " if model.method == "moco" else ""
    logs = f"; logs: {os.path.relpath(console.log_file)}" if console.log_file else ""
    return (f"run {cfg.train.run_name!r}: {cfg.data.source} ({n_pretrain} images), {model.encoder} x{model.width:g}, "
            f"{moco}loss {loss.name}{hyper}, batch {cfg.data.batch_size}, {cfg.train.epochs} epochs, "
            f"{scaling.num_workers} {device} worker(s); MLflow {tracking.redact_uri(uri)}{logs}")


def finish(cfg: Config, model: torch.nn.Module, state: TrainingState, run_id: str, uri: str, started: float, *,
           similarities: dict | None = None, aliases: Sequence[str] = (),
           version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Logs the final metrics (computed by the workers at the last evaluated epoch), plots and the
    encoder; registers it when ``tracking.register``.

    The new version gets ``aliases`` and ``version_tags`` (a sweep's best: ``best-<sweep>``, its
    params and the sweep's run id), and the champion alias when it beats the current one.
    """
    evaluated = [m for m in state.history if m.evaluated]
    if not evaluated:
        raise RuntimeError(f"run {cfg.train.run_name!r} has no evaluated epoch in its checkpoint")
    final = {"final_knn_top1": evaluated[-1].knn_top1, "linear_top1": evaluated[-1].linear_top1}
    initial = {f"initial_{k}": v for k, v in (state.initial or {}).items()}  # the untrained encoder
    name = cfg.tracking.model_name
    with console.library_output():
        version, pending = tracking.log_result(uri, run_id, history=[m.flat() for m in state.history],
                                               metrics={**final, **initial},
                                               encoder=model.encoder, image_size=cfg.augment.crop_size,
                                               model_name=name if cfg.tracking.register else None,
                                               similarities=similarities)
    if pending:
        print(f"logged {pending} epoch(s) of metrics that were pending while MLflow was unreachable")
    champion = False
    if version is not None:
        tracking.label_version(uri, name, version, aliases=aliases, tags=version_tags)
        champion = tracking.promote_if_better(uri, name, version, knn_top1=final["final_knn_top1"],
                                              dataset=cfg.data.source)
    out = {**final, **initial, "run_id": run_id, "model_name": name, "version": version, "champion": champion,
           "seconds": time.perf_counter() - started, "epochs": len(state.history),
           "skipped_images": state.history[-1].skipped_images or 0}
    _print_result(cfg, out, [*aliases, *(["champion"] if champion else [])], uri)
    return out


def _print_result(cfg: Config, out: dict[str, Any], labels: Sequence[str], uri: str) -> None:
    untrained = (f" (untrained: {out['initial_knn_top1']:.4f}, {out['initial_linear_top1']:.4f})"
                 if "initial_knn_top1" in out else "")
    scores = (f"kNN top-1 {out['final_knn_top1']:.4f}, linear top-1 {out['linear_top1']:.4f}{untrained} "
              f"(frozen encoder, {cfg.data.source} evaluation set, {out['epochs']} epochs, {out['seconds']:.0f} s)")
    if out["skipped_images"]:
        print(f"skipped {out['skipped_images']} undecodable image(s) (data.skip_corrupt=true); see the "
              "skipped_images metric")
    if out["version"] is not None:
        named = f" ({', '.join(labels)})" if labels else ""
        print(f"registered {out['model_name']} version {out['version']}{named}: {scores}")
        print(f"load it: mlflow.pytorch.load_model('models:/{out['model_name']}/{out['version']}')")
    else:
        print(f"trained (not registered: tracking.register=false): {scores}")
    shown = tracking.redact_uri(uri)
    print(f"browse:  {shown}" if uri.startswith(("http://", "https://")) else f"browse:  mlflow ui --backend-store-uri {shown}")

def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv, prog="python -m pipelines.pretrain", description=__doc__)
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "pipelines.pretrain", *argv])
    try:
        return guarded("python -m pipelines.pretrain", lambda: main(cfg, command=command))
    finally:
        stop_local_ray()


if __name__ == "__main__":
    cli()
