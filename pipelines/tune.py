"""Hyperparameter sweeps on Ray Tune: one TorchTrainer per trial, ASHA early stopping, MLflow lineage.

    python -m pipelines.tune --config pipelines/configs/quickstart.yaml --space tune_spaces/sscl_priors.yaml \\
        tune.name=priors tune.num_samples=8

Each trial runs a driver function that starts its own Ray Train run (``trial-<trial id>``), whose
per-epoch ``knn_top1`` Tune's ASHA scheduler compares. Rerunning the same command with the same
``tune.name`` continues the sweep where it stopped. MLflow gets one parent run per sweep, a child
run per trial, a table and a plot of all trials on the parent, and the best trial's encoder
registered with the alias ``best-<tune.name>``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipelines import pretrain
from pipelines.errors import guarded
from pipelines.datasets import build_datasets
from pipelines.ray_checks import init_ray, storage_path
from sscl import tracking, tracking_plots
from sscl.config import (Config, ConfigError, apply_overrides, flatten, from_dict, load_config, load_section,
                         setting, to_dict)
from sscl.data.sources import check_roots
from sscl.search_space import SearchSpace, load_space, trial_values

log = logging.getLogger("sscl.tune")
SWEEP_TAG = "sscl.sweep"
FINGERPRINT_TAG = "sscl.sweep_fingerprint"
BEST_VERSION_TAG = "sscl.best_version"
# Settings a rerun may change without making it a different sweep.
RESUMABLE_KEYS = ("tune.max_concurrent_trials", "tune.max_failures", "tune.driver_cpus", "train.max_failures",
                  "tracking.uri")


@dataclass(frozen=True)
class Sweep:
    """The sweep's own settings: a preset's ``tune:`` block and ``tune.*`` overrides. They belong to
    no trial's training config (``sscl.config.TOOL_SECTIONS``)."""

    name: str = setting("sweep", "sweep name: rerunning with the same name continues that sweep")
    num_samples: int = setting(4, "trials drawn from the space (grid spaces: repeats of the whole grid)",
                               ge=1, le=100_000)
    max_concurrent_trials: int = setting(0, "trials at once; 0 = as many as the cluster's CPUs/GPUs hold",
                                         ge=0, le=100_000)
    search: str = setting("auto", "random (random + grid) | optuna (needs the optuna extra) | auto (optuna if "
                          "installed and the space has no grid, else random)", choices=("auto", "random", "optuna"))
    metric: str = setting("knn_top1", "per-epoch metric the sweep optimises (knn_top1: max, loss: min)",
                          choices=("knn_top1", "loss"))
    scheduler: str = setting("asha", "asha (early stopping) | fifo (every trial runs all epochs)",
                             choices=("asha", "fifo"))
    grace_period: int = setting(1, "ASHA: epochs every trial runs before it can be stopped", ge=1, le=100_000)
    reduction_factor: float = setting(2.0, "ASHA: keep the top 1/reduction_factor of trials at each rung",
                                      gt=1, le=1000)
    max_failures: int = setting(1, "retries of a failed trial (resumed from its checkpoint) before it is reported "
                                "failed", ge=0, le=1000)
    driver_cpus: float = setting(0.25, "CPUs reserved for each trial's driver (its Train workers reserve their own)",
                                 gt=0, le=4096)


def check_sweep(sweep: Sweep, cfg: Config) -> None:
    """Constraints between the sweep's settings and the trials' config.

    Raises:
        ConfigError: naming each broken one.
    """
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9_-]+", sweep.name):
        problems.append(f"tune.name={sweep.name!r}: use letters, digits, '-' and '_' (it names folders and a "
                        "registry alias)")
    if sweep.grace_period > cfg.train.epochs:
        problems.append(f"tune.grace_period={sweep.grace_period}: must be <= train.epochs={cfg.train.epochs}")
    if problems:
        raise ConfigError(problems)


def load(preset: str | Path | None, overrides: Sequence[str]) -> tuple[Config, Sweep]:
    """The trials' config and the sweep's settings from one preset and one list of overrides
    (``tune.*`` keys are the sweep's, the others the trials').

    Raises:
        ConfigError, FileNotFoundError: as ``sscl.config.load_config``.
    """
    cfg = load_config(preset, [o for o in overrides if not o.startswith("tune.")])
    sweep = load_section(Sweep, "tune", preset, [o for o in overrides if o.startswith("tune.")])
    check_sweep(sweep, cfg)
    return cfg, sweep


# ---------------------------------------------------------------------------- the trial driver


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep_name: str, parent_run_id: str, uri: str,
              trials_path: str) -> None:
    """One Tune trial: its own Ray Train run, which reports every epoch to Tune.

    The Train run is named after the trial id, so a retried or restored trial resumes its own
    checkpoints; its MLflow run is a child of the sweep's run. Its datasets are built here, lazily:
    the trial's Train workers stream them from storage like a single run's.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    values = trial_values(config["params"])
    cfg = trial_config(from_dict(base), values, trial_id, trials_path)
    run_id = pretrain.open_run(
        cfg, uri, run_name=child_run_name(sweep_name, trial_id), params=values,
        tags={"mlflow.parentRunId": parent_run_id, SWEEP_TAG: sweep_name, "sscl.trial_id": trial_id},
    )
    pretrain.fit(cfg, run_id=run_id, uri=uri, callbacks=[TuneReportCallback()])
    tracking.end_run(uri, run_id)


def trial_config(base: Config, values: dict[str, Any], trial_id: str, trials_path: str) -> Config:
    """The pretraining config of one trial: the sweep's config, the sampled values, its own Train run."""
    return apply_overrides(base, {**values, "train.run_name": f"trial-{trial_id}", "train.storage_path": trials_path})


def child_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# ---------------------------------------------------------------------------- sweep set-up


def recorded_params(cfg: Config, sweep: Sweep) -> dict[str, Any]:
    """The sweep run's params: the training config's keys and the sweep's own (``tune.*``)."""
    return {**flatten(cfg), **{f"tune.{k}": v for k, v in dataclasses.asdict(sweep).items()}}


def _fingerprint(cfg: Config, sweep: Sweep, space: SearchSpace) -> str:
    """Identifies what a sweep searches: a rerun under the same name must match it."""
    settings = {k: v for k, v in recorded_params(cfg, sweep).items() if k not in RESUMABLE_KEYS}
    text = json.dumps({"space": space.to_dict(), "config": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sweep_run(cfg: Config, sweep: Sweep, space: SearchSpace, uri: str) -> str:
    """The sweep's parent MLflow run; a rerun with a different config or space is refused."""
    fingerprint = _fingerprint(cfg, sweep, space)
    run_id = pretrain.open_run(cfg, uri, run_name=f"sweep-{sweep.name}", params=recorded_params(cfg, sweep),
                               tags={SWEEP_TAG: sweep.name, FINGERPRINT_TAG: fingerprint})
    recorded = tracking.run_record(uri, run_id)[0].get(FINGERPRINT_TAG)
    if recorded != fingerprint:
        params = tracking.recorded_config(uri, run_id)[0]
        now = {k: tracking.redact_uri(str(v)) if k == "tracking.uri" else str(v)
               for k, v in recorded_params(cfg, sweep).items()}
        changed = [f"  {k}: {params[k]} (recorded) -> {v}" for k, v in now.items()
                   if k in params and params[k] != v and k not in RESUMABLE_KEYS]
        what = "\n".join(changed) if changed else "  the search space (recorded as search_space.yaml in that run)"
        raise ValueError(f"tune.name={sweep.name!r} already names a sweep (MLflow run {run_id}) that searched with "
                         f"other settings; rerunning it continues it, so these must stay as recorded:\n{what}\n"
                         f"Give the recorded values to continue it, or a new tune.name to start another sweep")
    tracking.log_to_run(uri, run_id, texts={"search_space.yaml": yaml.safe_dump(space.to_dict(), sort_keys=False)})
    return run_id


def concurrent_trials(cfg: Config, sweep: Sweep, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many trials as ``cluster`` (Ray resources) holds at once.

    Raises:
        ValueError: when not even one trial fits, naming what a trial needs.
    """
    cpus = sweep.driver_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # Ray Data: at least 1 CPU for its read, decode and augmentation tasks.
    cpus += max(1, cfg.placement.max_tasks)
    fits = math.floor(cluster.get("CPU", 0) / cpus + 1e-9)
    need = f"{cpus:g} CPUs"
    if cfg.scaling.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / cfg.scaling.num_workers))
        need += f" and {cfg.scaling.num_workers} GPUs"
    if fits < 1:
        raise ValueError(f"one trial needs {need} (tune.driver_cpus + scaling.num_workers x scaling.cpus_per_worker "
                         f"+ placement.max_tasks or 1 for Ray Data tasks) but the cluster has {cluster.get('CPU', 0):g} CPUs and "
                         f"{cluster.get('GPU', 0):g} GPUs")
    return sweep.max_concurrent_trials or fits


def _search_alg(cfg: Config, sweep: Sweep, space: SearchSpace, max_concurrent: int):
    """Tune's random + grid generator (seeded) or an Optuna searcher, at most ``max_concurrent`` trials
    at a time (the generator ignores Tune's ``TuneConfig.max_concurrent_trials``)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    choice = sweep.search
    gridded = space.has_grid or space.has_bundles
    if choice == "auto":
        try:
            import optuna  # noqa: F401

            choice = "random" if gridded else "optuna"
        except ImportError:
            choice = "random"
    if choice == "random":
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=max_concurrent)
    if gridded:
        raise ValueError("tune.search=optuna: the space has grid or bundle entries, which Optuna cannot sample; "
                         "use tune.search=random")
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ValueError("tune.search=optuna needs the optuna extra: pip install -e '.[optuna]'") from None
    return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=max_concurrent)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    samplers = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                "quniform": lambda a: tune.quniform(*a), "choice": lambda a: tune.choice(list(a)),
                "grid": lambda a: tune.grid_search(list(a)), "fixed": lambda a: a[0]}
    return {"params": {p.key: samplers[p.kind](p.args) for p in space.params}}


# ---------------------------------------------------------------------------- the sweep


def main(cfg: Config, space: SearchSpace, *, sweep: Sweep | None = None, preset: str | None = None,
         overrides: Sequence[str] = (), command: str = "") -> dict[str, Any]:
    """Runs (or continues) the sweep ``tune.name``; registers the best trial's encoder.

    Args:
        cfg: the trials' starting config (a preset plus overrides).
        sweep: the sweep's own settings (the ``tune`` section; default ``Sweep()``).
        space: the validated search space.
        preset, overrides: how ``cfg`` was given, to print the best trial as a ready command.
        command: the command line that started the sweep, shown as the way to continue it when interrupted.

    Returns:
        ``best`` (trial id, values, metric, registered version), ``trials`` (one row per trial),
        ``run_id`` (the sweep's MLflow run) and ``command`` (the best trial as a pretrain command).
    """
    started = time.perf_counter()
    sweep = sweep or Sweep()
    check_sweep(sweep, cfg)
    if sweep.metric == "knn_top1" and cfg.train.knn_every != 1:
        raise ValueError(f"train.knn_every={cfg.train.knn_every}: a sweep on knn_top1 compares trials every epoch; "
                         "set train.knn_every=1 or tune.metric=loss")
    # A trial ASHA stops is blocked inside its TorchTrainer.fit(), so Tune's graceful stop cannot end
    # it; by default Tune waits 600 s before killing it, and its Train run keeps training meanwhile.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "3")
    check_roots(cfg.data)  # a mistyped path fails here, before Ray or MLflow start
    uri = pretrain.prepare(cfg)
    init_ray()
    build_datasets(cfg)  # bad paths fail here, once, before any trial starts
    parent = _sweep_run(cfg, sweep, space, uri)
    with pretrain.ended_as_failed_or_killed(uri, parent, resume=command):
        return _sweep(cfg, sweep, space, uri, parent, started, preset=preset, overrides=overrides)


def _sweep(cfg: Config, sweep: Sweep, space: SearchSpace, uri: str, parent: str, started: float, *, preset: str | None,
           overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep itself, once its parent run is open (see ``main``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    done = tracking.run_record(uri, parent)[0].get(BEST_VERSION_TAG)
    storage = storage_path(cfg.train.storage_path) or str(Path("~/ray_results").expanduser())
    experiment = f"{storage.rstrip('/')}/{sweep.name}"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), sweep_name=sweep.name, parent_run_id=parent, uri=uri,
                             trials_path=f"{experiment}-trials"),
        {"CPU": sweep.driver_cpus},
    )
    if tune.Tuner.can_restore(experiment):
        print(f"continuing sweep {sweep.name!r} from {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        mode = "max" if sweep.metric == "knn_top1" else "min"
        at_once = concurrent_trials(cfg, sweep, ray.cluster_resources())
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=sweep.grace_period,
                                   reduction_factor=sweep.reduction_factor)
                     if sweep.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=mode, num_samples=sweep.num_samples,
                                        scheduler=scheduler, search_alg=_search_alg(cfg, sweep, space, at_once)),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            ),
        )
    grid = tuner.fit()
    rows = _rows(cfg, sweep.metric, grid, space)
    _close_child_runs(cfg, sweep.name, rows, uri)
    finished = [r for r in rows if r["status"] != "failed" and r.get(sweep.metric) is not None]
    if not finished:
        raise RuntimeError(f"sweep {sweep.name!r}: every trial failed; first error: {rows[0]['error'] if rows else '-'}")
    best = (max if sweep.metric == "knn_top1" else min)(finished, key=lambda r: r[sweep.metric])
    command = best_command(cfg, sweep.name, best["values"], preset, overrides)
    _log_summary(uri, parent, rows, space, sweep.metric, best)
    print(trials_table(rows, space.searched_keys, sweep.metric))
    if done is None:
        version = _register_best(cfg, sweep.name, best, uri, parent, started)
        tracking.log_to_run(uri, parent, tags={BEST_VERSION_TAG: str(version)})
        tracking.end_run(uri, parent)
    else:
        version = done
        print(f"sweep {sweep.name!r} had already finished; its best encoder is version {version}")
    print(f"best trial {best['trial_id']}: {sweep.metric} {best[sweep.metric]:.4f}; train it in full with:\n"
          f"  {command}")
    return {"best": {**best, "version": version}, "trials": rows, "run_id": parent, "command": command}


def _rows(cfg: Config, metric: str, grid, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: id, status, sampled values, last metrics, where its checkpoint is."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        values = trial_values((result.config or {}).get("params", {}))
        epoch = int(metrics.get("epoch", 0) or 0)
        if result.error is not None:
            status = "failed"
        else:
            status = "finished" if epoch >= cfg.train.epochs else "stopped early"
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        history = result.metrics_dataframe
        best_so_far = None
        if history is not None and metric in history:
            series = history[metric].dropna()
            best_so_far = float(series.max() if metric == "knn_top1" else series.min()) if len(series) else None
        rows.append({
            "trial_id": trial_id, "status": status, "epochs": epoch, "values": values,
            "loss": metrics.get("loss"), "knn_top1": metrics.get("knn_top1"), f"best_{metric}": best_so_far,
            "checkpoint_path": metrics.get("checkpoint_path"), "error": str(result.error) if result.error else "",
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _trial_id_from_path(path: str | None) -> str:
    """A trial that never reported has no metrics; its folder is ``run_trial_<trial id>_<index>_...``
    (ids: ``ab12c_00003`` from the random/grid generator, ``ab12cd34`` from a searcher)."""
    found = re.match(r"run_trial_([0-9a-f]+(?:_\d{5})?)_\d+", Path(path or "").name)
    return found.group(1) if found else "?"


def _close_child_runs(cfg: Config, sweep_name: str, rows: list[dict[str, Any]], uri: str) -> None:
    """Trials ASHA stopped or that failed end their MLflow runs as KILLED or FAILED, with a tag saying why."""
    for row in rows:
        found = tracking.named_run(uri, cfg.tracking.experiment, child_run_name(sweep_name, row["trial_id"]))
        if found is None:
            continue
        row["run_id"], recorded = found
        tracking.log_to_run(uri, row["run_id"], tags={"sscl.trial_status": row["status"]})
        status = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[row["status"]]
        if recorded != status:
            tracking.end_run(uri, row["run_id"], status)


def _register_best(cfg: Config, sweep_name: str, best: dict[str, Any], uri: str, parent: str, started: float
                   ) -> str | None:
    """The best trial's last checkpoint (evaluated by its workers) registered as ``best-<tune.name>``."""
    from ray.train import Checkpoint

    trial_cfg = apply_overrides(cfg, best["values"])
    model, state, similarities = pretrain.load_trained(trial_cfg, Checkpoint(best["checkpoint_path"]))
    tags = {"sweep_run_id": parent, "sweep": sweep_name, "trial_id": best["trial_id"],
            **{f"param.{k}": str(v) for k, v in best["values"].items()}}
    out = pretrain.finish(trial_cfg, model, state, best["run_id"], uri, started, similarities=similarities,
                          aliases=[f"best-{sweep_name}"], version_tags=tags)
    return out["version"]


# ---------------------------------------------------------------------------- reporting


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _table_rows(rows: list[dict[str, Any]], keys: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "status", "epochs", *keys, "loss", "knn_top1", f"best_{metric}"]
    body = [[r["trial_id"], r["status"], str(r["epochs"]), *(_format(r["values"].get(k)) for k in keys),
             _format(r["loss"]), _format(r["knn_top1"]), _format(r[f"best_{metric}"])] for r in rows]
    return header, body


def trials_table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    """The final trial table as aligned text."""
    header, body = _table_rows(rows, keys, metric)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body])


def trials_csv(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    header, body = _table_rows(rows, keys, metric)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*header, "run_id", "error"])
    for row, cells in zip(rows, body):
        writer.writerow([*cells, row.get("run_id", ""), row["error"]])
    return out.getvalue()


def _log_summary(uri: str, parent: str, rows: list[dict[str, Any]], space: SearchSpace, metric: str,
                 best: dict[str, Any]) -> None:
    keys = space.searched_keys
    counts = {f"trials_{s.replace(' ', '_')}": sum(r["status"] == s for r in rows)
              for s in ("finished", "stopped early", "failed")}
    tracking.log_to_run(uri, parent, texts={"trials.csv": trials_csv(rows, keys, metric)},
                        figures={"sweep.png": tracking_plots.plot_sweep(rows, keys, metric)},
                        metrics={f"best_{metric}": best[metric], **counts},
                        tags={"sscl.best_trial": best["trial_id"], **{f"best.{k}": v for k, v in best["values"].items()}})


def best_command(cfg: Config, sweep_name: str, values: dict[str, Any], preset: str | None, overrides: Sequence[str]
                 ) -> str:
    """The best trial as a ``pipelines.pretrain`` command line (same preset and overrides)."""
    if preset is None:  # no preset: every key that differs from the defaults
        defaults = flatten(Config())
        kept = [f"{k}={_format_value(v)}" for k, v in flatten(cfg).items()
                if defaults[k] != v and k not in values and k != "train.run_name"]
    else:
        kept = [o for o in overrides if not o.startswith("tune.") and o.split("=", 1)[0] not in values
                and not o.startswith("train.run_name=")]
    kept = [f"tracking.uri={tracking.redact_uri(o.split('=', 1)[1])}" if o.startswith("tracking.uri=") else o for o in kept]
    chosen = [f"{k}={_format_value(v)}" for k, v in values.items()]
    parts = ["python", "-m", "pipelines.pretrain", *(["--config", preset] if preset else []), *kept, *chosen,
             f"train.run_name={sweep_name}-best"]
    return shlex.join(parts)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    return json.dumps(value) if not isinstance(value, str) else value


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config_and_flags

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--space", required=True, help="YAML search space, e.g. tune_spaces/sscl_priors.yaml")

    cfg, args = parse_config_and_flags(argv, prog="python -m pipelines.tune", description=__doc__, add_flags=flags,
                                       tool=("tune", Sweep))
    try:
        check_sweep(args.tool, cfg)
        space = load_space(args.space, cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"python -m pipelines.tune: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "pipelines.tune", *(sys.argv[1:] if argv is None
                                                                                      else argv)])
    return guarded("python -m pipelines.tune", lambda: main(cfg, space, sweep=args.tool, preset=args.config,
                                                            overrides=args.overrides, command=command))


if __name__ == "__main__":
    cli()
