"""End to end on the offline digits: a real local Ray cluster, 2 Train workers, MLflow on sqlite
and a real ``mlflow server`` process on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import evaluate, registry

from sscl.config import load_config
from conftest import QUICKSTART, free_port, quick_overrides

pytestmark = pytest.mark.integration


def quick_cfg(tmp_path, *extra):
    return load_config(QUICKSTART, quick_overrides(tmp_path, *extra))


def test_pretrain_registers_loads_without_pickle_and_resumes(tmp_path, ray_cluster, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts in ./mlruns
    first = main(quick_cfg(tmp_path, "train.epochs=2"))
    assert first["epochs"] == 2 and str(first["version"]) == "1" and first["champion"]

    # Rerunning the same run name with more epochs continues from the checkpoint.
    second = main(quick_cfg(tmp_path, "train.epochs=4"))
    assert second["run_id"] == first["run_id"] and second["epochs"] == 4 and str(second["version"]) == "2"
    # The same command once more: already finished, nothing retrained or registered again.
    again = main(quick_cfg(tmp_path, "train.epochs=4"))
    assert again["run_id"] == first["run_id"] and again["version"] == "2"
    assert again["final_knn_top1"] == pytest.approx(second["final_knn_top1"])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    history = client.get_metric_history(first["run_id"], "knn_top1")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # every epoch once, across the resume
    losses = [m.value for m in sorted(client.get_metric_history(first["run_id"], "loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    run = client.get_run(first["run_id"])
    for key in ("final_knn_top1", "linear_top1", "lr", "images_per_second"):
        assert key in run.data.metrics
    assert run.data.params["loss.name"] == "sscl" and run.data.params["scaling.num_workers"] == "2"
    assert {"config.yaml", "curves.png", "similarity_histogram.png"} <= {a.path for a in client.list_artifacts(first["run_id"])}

    # The optimizer state travelled with the checkpoint: 4 epochs of steps, AdamW's step counts too.
    checkpoints = sorted(p for p in (tmp_path / "ray" / "quickstart").glob("checkpoint_*") if p.is_dir())
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)
    assert state["epoch"] == 4 and state["step"] == 4 * ((1797 - 359) // 64)
    steps = 4 * ((1797 - 359) // 64)
    assert all(int(s["step"]) == steps for s in state["optimizer"]["state"].values())  # AdamW's, across the resume

    champion = client.get_model_version_by_alias("sscl-digits", "champion")
    assert str(champion.version) in ("1", "2")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    for address in ("models:/sscl-digits@champion", "models:/sscl-digits/2"):
        model = mlflow.pytorch.load_model(address)
        assert model(torch.randn(5, 3, 32, 32)).shape == (5, 64)  # ResNet-18 at width 0.125: 512 / 8

    # The evaluation pipeline on the registered (exported) encoder reproduces the recorded score.
    cfg = quick_cfg(tmp_path)
    evaluated = evaluate.main(cfg, "models:/sscl-digits/2")
    assert abs(evaluated["knn_top1"] - second["final_knn_top1"]) <= 0.01
    # Registry lookups.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = registry.list_versions("sscl-digits", uri)
    assert [r["version"] for r in rows] == ["2", "1"] and rows[0]["dataset"] == "digits"
    registry.promote("sscl-digits", "1", "champion", uri)
    assert registry.show("models:/sscl-digits@champion", uri)["version"] == "1"
    with pytest.raises(ValueError, match="not in the registry"):
        registry.show("models:/sscl-digits/99", uri)
    np.save(tmp_path / "batch.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert tuple(registry.embed("models:/sscl-digits@champion", str(tmp_path / "batch.npy"), str(tmp_path / "e.npy"),
                                tracking_uri=uri)) == (3, 64)
    assert np.load(tmp_path / "e.npy").shape == (3, 64)


def test_pretrain_logs_to_a_real_mlflow_server(tmp_path, ray_cluster, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.pretrain import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # Also covers augment.device=gpu: views made inside the training loop (here on the CPU device).
    result = main(quick_cfg(tmp_path, "train.epochs=1", "train.run_name=server-run", "tracking.model_name=server-model",
                            "augment.device=gpu"))
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.data.params["train.run_name"] == "server-run" and "final_knn_top1" in run.data.metrics
    assert client.get_model_version_by_alias("server-model", "champion").version == "1"


def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as err:
        main(quick_cfg(tmp_path, f"tracking.uri={uri}"))
    assert "127.0.0.1" in str(err.value) and "secret" not in str(err.value)
    assert not (tmp_path / "ray").exists()  # no training started
