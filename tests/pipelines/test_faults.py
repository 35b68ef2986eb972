"""Faults survived, with real processes: a Train worker SIGKILLed mid-epoch, the driver SIGKILLed
mid-run, the MLflow server gone mid-run or at the start, and a scaling the cluster cannot hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient  # here: imported first in a test's thread, it can deadlock the main thread's import

from conftest import QUICKSTART, free_port, quick_overrides, wait_for_dead_drivers_reaped
from sscl.config import load_config

pytestmark = pytest.mark.integration


def wait_for(condition, timeout_s: float = 600, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.5)


def logged_steps(uri: str, run_name: str, metric: str = "knn_top1") -> list[int]:
    """Steps of ``metric`` in the run named ``run_name`` (empty while it does not exist)."""
    client = MlflowClient(uri)
    try:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`sscl.run_name` = '{run_name}'")
    except Exception:  # noqa: BLE001 - no database yet / server restarting
        return []
    return sorted(m.step for r in runs for m in client.get_metric_history(r.info.run_id, metric))


def final_state(tmp_path: Path, run_name: str) -> dict:
    checkpoints = sorted(p for p in (tmp_path / "ray" / run_name).glob("checkpoint_*") if p.is_dir())
    return torch.load(checkpoints[-1] / "state.pt", weights_only=True)


def checkpointed_epoch(run_dir: Path) -> int:
    epochs = [0]
    for folder in run_dir.glob("checkpoint_*"):
        try:
            epochs.append(torch.load(folder / "state.pt", weights_only=True)["epoch"])
        except (OSError, RuntimeError, EOFError):
            pass  # being written
    return max(epochs)


def first_epoch_loss(uri: str, run_name: str) -> float:
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`sscl.run_name` = '{run_name}'")
    return next(m.value for m in client.get_metric_history(run.info.run_id, "loss") if m.step == 1)


def test_worker_killed_mid_epoch_restarts_from_the_latest_checkpoint(tmp_path, ray_cluster, monkeypatch):
    from ray.util.state import list_actors

    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, "train.epochs=3", "train.run_name=worker-kill",
                                                  "train.max_failures=2", "tracking.register=false"))
    killed: list[int] = []

    def kill_a_worker_during_epoch_2() -> None:
        wait_for(lambda: logged_steps(uri, "worker-kill") == [1], what="epoch 1 to be checkpointed and logged")
        # Into epoch 2, and past the controller's next poll: Ray Train has registered epoch 1's checkpoint.
        time.sleep(4)
        workers = list_actors(address=f"http://{ray_cluster.dashboard_url}",  # this test's cluster
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        pid = workers[-1].pid
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_during_epoch_2, daemon=True)
    killer.start()
    result = main(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert result["epochs"] == 3
    assert logged_steps(uri, "worker-kill") == [1, 2, 3]  # every epoch once
    assert logged_steps(uri, "worker-kill", "epoch") == [1, 2, 3]
    # Epoch 1 was not trained again: the final checkpoint's record of it is the one logged before the kill.
    state = final_state(tmp_path, "worker-kill")
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["history"][0]["loss"] == pytest.approx(first_epoch_loss(uri, "worker-kill"), rel=1e-12)


def test_moco_worker_killed_mid_epoch_resumes_with_the_checkpointed_queue(tmp_path, ray_cluster, monkeypatch):
    from ray.util.state import list_actors

    from sscl.build import model_from_config
    from pipelines.pretrain import main
    from sscl.moco import queue_digest
    from sscl.model_registry import load_registered

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, "train.epochs=3", "train.run_name=moco-kill",
                                                  "train.max_failures=2", "model.method=moco", "model.queue_size=512",
                                                  "model.queue_warmup_epochs=1", "tracking.model_name=moco-digits",
                                                  "model.bn_splits=2"))  # split BatchNorm under DDP, resumed, exported
    checkpointed: dict[int, str] = {}  # epoch -> digest of the queue in its checkpoint, read before the kill

    def kill_a_worker_during_epoch_2() -> None:
        wait_for(lambda: logged_steps(uri, "moco-kill") == [1], what="epoch 1 to be checkpointed and logged")
        time.sleep(4)
        for saved in (tmp_path / "ray" / "moco-kill").glob("checkpoint_*/state.pt"):
            try:
                state = torch.load(saved, weights_only=True)
            except (OSError, RuntimeError, EOFError):
                continue  # being written: not the checkpoint the workers resume from
            checkpointed[state["epoch"]] = queue_digest(state["moco"])
        workers = list_actors(address=f"http://{ray_cluster.dashboard_url}",
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(workers[-1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_during_epoch_2, daemon=True)
    killer.start()
    result = main(cfg)
    killer.join(timeout=5)
    assert checkpointed, "no worker was killed"
    assert result["epochs"] == 3 and logged_steps(uri, "moco-kill") == [1, 2, 3]  # every epoch once, kNN each
    state = final_state(tmp_path, "moco-kill")
    (resumed,) = state["resumes"]
    # The restarted workers trained on from the queue of the checkpoint they resumed from, bit for bit.
    assert resumed["queue_sha256"] == checkpointed[resumed["epoch"]]
    assert state["moco"]["queue"].shape == (512, 128) and state["moco"]["pointer"] == (3 * 22 * 128) % 512
    # The registered encoder is the query encoder of the last checkpoint, loaded by alias.
    model = model_from_config(cfg)
    model.load_state_dict(state["model"])
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval().encoder(images)
        torch.testing.assert_close(load_registered(uri, "models:/moco-digits@champion")(images), expected)


def test_driver_killed_mid_run_rerun_resumes_and_finishes(tmp_path, ray_cluster, monkeypatch):
    import ray

    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = quick_overrides(tmp_path, "train.epochs=3", "train.run_name=driver-kill", "tracking.register=false")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the job joins this cluster
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "pipelines.pretrain", "--config", str(QUICKSTART), *overrides],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_for(lambda: logged_steps(uri, "driver-kill") == [1] or driver.poll() is not None, what="epoch 1")
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    time.sleep(4)  # into epoch 2, once Ray Train has recorded epoch 1's checkpoint
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    wait_for_dead_drivers_reaped()

    result = main(load_config(QUICKSTART, overrides))  # the same command again
    assert result["epochs"] == 3
    assert logged_steps(uri, "driver-kill") == [1, 2, 3]
    state = final_state(tmp_path, "driver-kill")
    assert state["history"][0]["loss"] == pytest.approx(first_epoch_loss(uri, "driver-kill"), rel=1e-12)


def test_tracking_server_down_mid_run_training_goes_on_and_metrics_are_logged_later(
        tmp_path, ray_cluster, restartable_mlflow_server, monkeypatch):
    from pipelines.pretrain import main

    server = restartable_mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, "train.epochs=4", "train.run_name=server-down",
                                                  "tracking.register=false"))
    events: list[str] = []

    def outage() -> None:
        wait_for(lambda: logged_steps(server.uri, "server-down") == [1], what="epoch 1 logged")
        server.stop()
        events.append("stopped")
        # Training goes on without the server: epoch 2 gets checkpointed while it is down.
        wait_for(lambda: checkpointed_epoch(tmp_path / "ray" / "server-down") >= 2,
                 what="epoch 2 checkpointed while the server is down")
        events.append("trained while down")
        server.start()
        events.append("restarted")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = main(cfg)
    thread.join(timeout=120)
    assert events == ["stopped", "trained while down", "restarted"]
    assert result["epochs"] == 4
    # Nothing lost, nothing twice: the epochs trained while the server was down were logged later.
    assert logged_steps(server.uri, "server-down") == [1, 2, 3, 4]
    assert logged_steps(server.uri, "server-down", "loss") == [1, 2, 3, 4]


def test_tracking_server_unreachable_at_start_fails_fast_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--config", str(QUICKSTART),
                          *quick_overrides(tmp_path, f"tracking.uri={uri}")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert out.returncode == 2 and "unreachable" in out.stderr and "127.0.0.1" in out.stderr
    assert "secret" not in out.stderr + out.stdout
    assert elapsed < 30, f"took {elapsed:.0f} s"  # a bound the issue sets, not a performance figure
    assert not (tmp_path / "ray").exists()  # no training compute started


def test_unsatisfiable_scaling_fails_at_once_saying_what_exists(tmp_path, ray_cluster, monkeypatch):
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        main(load_config(QUICKSTART, quick_overrides(tmp_path, "scaling.num_workers=8", "scaling.cpus_per_worker=1")))
    assert "scaling.num_workers=8" in str(err.value) and "the cluster has 4 CPUs and 0 GPUs" in str(err.value)
    with pytest.raises(ValueError, match=r"\+ 1 GPU.*0 GPUs"):
        main(load_config(QUICKSTART, quick_overrides(tmp_path, "scaling.use_gpu=true")))
    assert not list((tmp_path / "ray").glob("*/checkpoint_*"))
