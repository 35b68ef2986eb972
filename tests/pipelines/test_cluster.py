"""The cluster path with real processes: `ray start --head`, `mlflow server` (SQL backend, proxied
artifacts) and `ray job submit` of pretraining and a sweep, run exactly as the README writes it."""

from __future__ import annotations

import pytest

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def readme_sequence() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- cluster-sequence -->")[1].split("<!-- /cluster-sequence -->")[0]
    return block.split("```bash\n")[1].split("```")[0]


def test_readme_cluster_sequence_submits_jobs_to_a_real_head_and_mlflow_server(tmp_path):
    from mlflow import MlflowClient

    state = tmp_path / "cluster"
    shutil.rmtree("/tmp/sscl-cluster", ignore_errors=True)  # the sequence's checkpoint storage
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "SSCL_CLUSTER_DIR": str(state),
            "SSCL_RAY_PORT": str(free_port()), "SSCL_DASHBOARD_PORT": str(free_port()),
            "SSCL_MLFLOW_PORT": str(free_port())}
    # The README's lines verbatim; the trap only tears down if a line fails before the last one.
    script = "set -euo pipefail\ntrap 'python -m pipelines.local_cluster down' EXIT\n" + readme_sequence()
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert output.count("succeeded") >= 2, output[-3000:]

    # The jobs' runs and registered models are in that server's store.
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    experiment = client.get_experiment_by_name("sscl-quickstart")
    (pretrain,) = client.search_runs([experiment.experiment_id], "tags.`sscl.run_name` = 'job-pretrain'")
    assert pretrain.data.tags["sscl.finished_epochs"] == "1" and "final_knn_top1" in pretrain.data.metrics
    (sweep,) = client.search_runs([experiment.experiment_id], "tags.`sscl.run_name` = 'sweep-job-sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    assert len(children) == 2 and sweep.info.status == "FINISHED"
    best = client.get_model_version_by_alias("sscl-digits", "best-job-sweep")
    assert best.tags["sweep_run_id"] == sweep.info.run_id
    assert str(client.get_model_version_by_alias("sscl-digits", "champion").version) in {"1", "2"}
    # Artifacts went through the server into its artifact store, not into the job's working dir.
    assert any((state / "mlartifacts").rglob("trials.csv")) and any((state / "mlartifacts").rglob("MLmodel"))

    # `down` stopped exactly what `up` started.
    assert not (state / "pids.json").exists()
    for marker in (str(state), (state / "ray_temp_dir").read_text()):  # the MLflow store; Ray's session folder
        assert subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split() == []
