"""Sweeps end to end on the offline digits: a real local Ray cluster, one TorchTrainer per trial,
ASHA, MLflow parent/child runs on sqlite, the best encoder registered; an interrupted sweep resumes."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import QUICKSTART, quick_overrides, wait_for_dead_drivers_reaped
from sscl.config import apply_overrides, load_config
from sscl.search_space import load_space

pytestmark = pytest.mark.integration


def sweep_args(tmp_path, name: str, *extra: str) -> list[str]:
    return quick_overrides(tmp_path, f"tune.name={name}", "train.epochs=2", "scaling.num_workers=1",
                           "tune.max_concurrent_trials=1", "tracking.model_name=sweep-encoder", *extra)


def child_runs(client, parent_id: str):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    """A three-trial grid under ASHA, then the same command again."""
    from pipelines import tune

    tmp = tmp_path_factory.mktemp("sweep")
    # One SGD learning rate that learns and two that barely move the encoder: in order, with one trial
    # at a time, ASHA (grace 1 epoch, keep the top half) stops the weak ones after their first epoch.
    (tmp / "space.yaml").write_text("optim.lr: {grid: [0.3, 0.0001, 0.0001]}\nloss.name: sscl\n")
    args = sweep_args(tmp, "lr", "tune.num_samples=1", "tune.reduction_factor=2", "optim.name=sgd")
    cfg, settings = tune.load(QUICKSTART, args)
    space = load_space(tmp / "space.yaml", cfg)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(tmp)
        out = tune.main(cfg, space, sweep=settings, preset=str(QUICKSTART), overrides=args)
        again = tune.main(cfg, space, sweep=settings, preset=str(QUICKSTART), overrides=args)
    return SimpleNamespace(tmp=tmp, cfg=cfg, settings=settings, out=out, again=again, printed=printed.getvalue(),
                           uri=f"sqlite:///{tmp}/mlflow.db")


@pytest.fixture
def client(sweep, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(sweep.tmp)
    mlflow.set_tracking_uri(sweep.uri)
    return mlflow.MlflowClient()


def test_asha_stops_the_weak_trials_after_their_grace_epoch(sweep):
    rows = sweep.out["trials"]
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"finished", "stopped early"}
    assert sum(r["status"] == "stopped early" for r in rows) >= 1
    assert all(r["epochs"] == (2 if r["status"] == "finished" else 1) for r in rows)
    best = sweep.out["best"]
    assert best["values"] == {"optim.lr": 0.3, "loss.name": "sscl"} and best["status"] == "finished"


def test_parent_run_holds_the_trial_table_plot_and_space(sweep, client):
    import mlflow

    parent = client.get_run(sweep.out["run_id"])
    assert parent.data.tags["sscl.sweep"] == "lr" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(sweep.out["run_id"])}
    assert {"trials.csv", "sweep.png", "search_space.yaml", "config.yaml"} <= artifacts
    table = mlflow.artifacts.load_text(f"runs:/{sweep.out['run_id']}/trials.csv").splitlines()
    assert table[0].startswith("trial,status,epochs,optim.lr,loss.name,loss,knn_top1") and len(table) == 4


def test_each_trial_is_a_child_run_with_its_values_epochs_and_status(sweep, client):
    rows = sweep.out["trials"]
    children = child_runs(client, sweep.out["run_id"])
    assert len(children) == 3
    for child in children:
        row = next(r for r in rows if r["run_id"] == child.info.run_id)
        assert float(child.data.params["optim.lr"]) == row["values"]["optim.lr"]
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "knn_top1"))
        assert steps == list(range(1, row["epochs"] + 1))  # every epoch it ran, once
        assert child.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")


def test_the_best_encoder_is_registered_with_its_alias_params_and_sweep(sweep, client, monkeypatch):
    import mlflow

    best = sweep.out["best"]
    version = client.get_model_version_by_alias("sweep-encoder", "best-lr")
    assert str(version.version) == str(best["version"])
    assert version.tags["sweep_run_id"] == sweep.out["run_id"] and version.tags["param.optim.lr"] == "0.3"
    assert version.run_id == best["run_id"]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    encoder = mlflow.pytorch.load_model("models:/sweep-encoder@best-lr")
    assert encoder(torch.randn(4, 3, 32, 32)).shape == (4, 64)


def test_the_printed_command_reproduces_the_best_trial(sweep):
    out, cfg = sweep.out, sweep.cfg
    assert "Trial status:" in sweep.printed and "stopped early" in sweep.printed  # the live table, then the final one
    assert out["command"] in sweep.printed
    words = shlex.split(out["command"])
    assert words[:5] == ["python", "-m", "pipelines.pretrain", "--config", str(QUICKSTART)]
    rebuilt = load_config(words[4], words[5:])
    assert rebuilt.optim.lr == 0.3 and rebuilt.train.run_name == "lr-best"
    trained = apply_overrides(rebuilt, {"train.run_name": cfg.train.run_name})
    assert trained == apply_overrides(cfg, out["best"]["values"])
    assert not any(word.startswith("tune.") for word in words)  # a sweep's settings are not a training's


def test_the_same_command_again_reruns_and_registers_nothing(sweep, client):
    again, out = sweep.again, sweep.out
    assert again["run_id"] == out["run_id"] and str(again["best"]["version"]) == str(out["best"]["version"])
    assert len(client.search_model_versions("name='sweep-encoder'")) == 1
    assert len(child_runs(client, out["run_id"])) == 3


def test_a_different_space_under_the_same_sweep_name_is_refused(sweep, client):
    from pipelines import tune

    (sweep.tmp / "other.yaml").write_text("optim.lr: {grid: [0.1]}\n")
    with pytest.raises(ValueError, match="tune.name='lr' already names a sweep .*\n  the search space"):
        tune.main(sweep.cfg, load_space(sweep.tmp / "other.yaml", sweep.cfg), sweep=sweep.settings)
    changed = apply_overrides(sweep.cfg, {"loss.temperature": 0.7})
    with pytest.raises(ValueError, match=r"\n  loss.temperature: 0.2 \(recorded\) -> 0.7\n"):
        tune.main(changed, load_space(sweep.tmp / "space.yaml", changed), sweep=sweep.settings)
    fewer = replace(sweep.settings, reduction_factor=3.0)  # the sweep's own settings are compared too
    with pytest.raises(ValueError, match=r"\n  tune.reduction_factor: 2.0 \(recorded\) -> 3.0\n"):
        tune.main(sweep.cfg, load_space(sweep.tmp / "space.yaml", sweep.cfg), sweep=fewer)


def test_interrupted_sweep_resumes(tmp_path, ray_cluster, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from pipelines import tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("optim.lr: {choice: [0.2, 0.3]}\n")
    args = sweep_args(tmp_path, "resume", "tune.num_samples=2", "tune.scheduler=fifo")
    cmd = [sys.executable, "-m", "pipelines.tune", "--config", str(QUICKSTART), "--space", str(tmp_path / "space.yaml"),
           *args]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins this test's cluster
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def epochs_logged() -> int:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="tags.`sscl.sweep` = 'resume'")
        except Exception:  # noqa: BLE001 - the database may not exist yet
            return 0
        return sum(len(client.get_metric_history(r.info.run_id, "epoch")) for r in runs)

    # Interrupt the driver once the first trial is done and the second has checkpointed an epoch.
    deadline = time.monotonic() + 600
    while epochs_logged() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for_dead_drivers_reaped()

    cfg, settings = tune.load(QUICKSTART, args)
    out = tune.main(cfg, load_space(tmp_path / "space.yaml", cfg), sweep=settings, preset=str(QUICKSTART),
                    overrides=args)
    assert len(out["trials"]) == 2 and all(r["status"] == "finished" for r in out["trials"])
    children = child_runs(client, out["run_id"])
    assert len(children) == 2  # the same two trials, continued: none started over as a new trial
    for child in children:
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "knn_top1")) == [1, 2]
    assert str(client.get_model_version_by_alias("sweep-encoder", "best-resume").version) == "1"


def test_a_failing_trial_is_retried_then_reported_and_the_sweep_goes_on(tmp_path, ray_cluster, monkeypatch):
    from mlflow import MlflowClient

    from pipelines import tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # Each searched value is valid on its own, but a batch of 20 leaves room for only 38 hard negatives:
    # that trial fails in its driver (every attempt), the other one trains. (With n_hard fixed rather than
    # searched, the space itself would be refused before any trial.)
    (tmp_path / "space.yaml").write_text("data.batch_size: {grid: [20, 64]}\nloss.n_hard: {grid: [64]}\n")
    args = sweep_args(tmp_path, "failing", "tune.num_samples=1", "train.epochs=1", "tune.max_failures=1")
    cfg, settings = tune.load(QUICKSTART, args)
    out = tune.main(cfg, load_space(tmp_path / "space.yaml", cfg), sweep=settings)
    by_batch = {r["values"]["data.batch_size"]: r for r in out["trials"]}
    assert by_batch[20]["status"] == "failed" and "loss.n_hard=64" in by_batch[20]["error"]
    assert by_batch[64]["status"] == "finished" and out["best"]["values"]["data.batch_size"] == 64
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(out["run_id"])
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_finished"] == 1
