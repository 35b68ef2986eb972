"""Shared test set-up: deterministic torch on the 2-core machines CI runs on, a local Ray cluster,
a real ``mlflow server`` on 127.0.0.1, and the tiny quickstart settings the pipeline tests use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(2)

QUICKSTART = Path(__file__).parents[1] / "pipelines" / "configs" / "quickstart.yaml"


def quick_overrides(tmp_path, *extra: str) -> list[str]:
    """The quickstart preset shrunk for tests, storing everything under ``tmp_path``."""
    return [f"train.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model.width=0.125",
            "data.batch_size=64", "train.linear_epochs=5", "train.knn_k=20", "optim.warmup_epochs=0", *extra]


def pytest_collection_modifyitems(items):
    """Every test not marked ``integration`` (Ray, MLflow servers, subprocess pipelines) is a ``unit`` test."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


class SharedRay:
    """One local Ray cluster for the whole test run, started by the first test that asks for it: each
    module starting and stopping its own cost about 8 s, and the task workers it had warmed."""

    context = None

    def start(self):
        import ray

        if self.context is None or not ray.is_initialized():
            # More logical CPUs than cores: 2 Train workers and the augmentation actor must fit at once.
            # The dashboard stays on: Ray Train's placement-group cleaner asks it whether a run's
            # controller is gone, and without it every finished run keeps its workers' CPUs reserved.
            self.context = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=free_port(),
                                    log_to_driver=False)
        return self.context

    def stop(self) -> None:
        """For tests that start a cluster of their own (one process joins one cluster at a time)."""
        import ray

        if self.context is not None:
            ray.shutdown()
            self.context = None


shared_ray = SharedRay()


@pytest.fixture(scope="module")
def ray_cluster():
    """The run's shared local cluster (4 logical CPUs, dashboard on); it outlives the module."""
    return shared_ray.start()


@pytest.fixture
def own_ray():
    """For a test that starts its own cluster: the shared one is stopped first (the next test asking
    for ``ray_cluster`` starts it again)."""
    shared_ray.stop()


def pytest_sessionfinish(session, exitstatus):
    shared_ray.stop()


def wait_for_dead_drivers_reaped(timeout_s: float = 120) -> None:
    """Waits until no actor of another job (a driver this test killed) is alive but detached ones:
    Ray reaps a dead driver's Train controller, workers and trial actors within seconds."""
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context()
    address = f"http://{shared_ray.start().dashboard_url}"
    deadline = time.monotonic() + timeout_s
    while True:
        left = [f"{a.class_name} (job {a.job_id})" for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                                      detail=True, limit=10_000)
                if a.job_id != here.get_job_id() and not a.is_detached]
        if not left:
            return
        assert time.monotonic() < deadline, f"still alive after {timeout_s:.0f} s: {', '.join(left)}"
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts) that a test can stop
    and start again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: the server's workers were slow to exit
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def restartable_mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real ``mlflow server`` for the run's trained model (``trained``) and its users."""
    running = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    running.start()
    yield running
    running.stop()


def run_overrides(tmp, server: str, *extra: str) -> list[str]:
    return quick_overrides(tmp, f"tracking.uri={server}", *extra)


@pytest.fixture(scope="session")
def trained(server, tmp_path_factory):
    """The quickstart, trained once for the test run and registered on ``server`` as ``sscl-digits``
    (champion: version 2): two epochs through the command line, as a user runs it; then the same run
    name extended to four epochs; then the same command once more."""
    from pipelines.pretrain import main
    from sscl.config import load_config

    cluster = shared_ray.start()
    tmp = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "RAY_ADDRESS": cluster.address_info["address"]}  # the job joins this cluster
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "pipelines.pretrain", "--config", str(QUICKSTART),
               *run_overrides(tmp, server.uri, "train.epochs=2")]
    console = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert console.returncode == 0, console.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(tmp)
        second = main(load_config(QUICKSTART, run_overrides(tmp, server.uri, "train.epochs=4")))
        again = main(load_config(QUICKSTART, run_overrides(tmp, server.uri, "train.epochs=4")))
    return SimpleNamespace(tmp=tmp, uri=server.uri, store=server.folder, console=console, second=second, again=again)
