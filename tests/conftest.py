"""Shared test set-up: deterministic torch on the 2-core machines CI runs on, a local Ray cluster,
a real ``mlflow server`` on 127.0.0.1, and the tiny quickstart settings the pipeline tests use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

QUICKSTART = Path(__file__).parents[1] / "pipelines" / "configs" / "quickstart.yaml"


def quick_overrides(tmp_path, *extra: str) -> list[str]:
    """The quickstart preset shrunk for tests, storing everything under ``tmp_path``."""
    return [f"train.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model.width=0.125",
            "data.batch_size=64", "train.linear_epochs=5", "train.knn_k=20", "optim.warmup_epochs=0", *extra]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # More logical CPUs than cores: 2 Train workers and the augmentation actor must fit at once.
    # The dashboard stays on: Ray Train's placement-group cleaner asks it whether a run's controller
    # is gone, and without it every finished run keeps its workers' CPUs reserved.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, 9)
        pytest.fail("mlflow server did not start")
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


