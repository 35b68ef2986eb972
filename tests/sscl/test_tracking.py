"""MLflow by URI: every function talks to the store it is given, never to a process-wide one."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sscl import model_registry, tracking


@pytest.fixture
def no_process_uri(monkeypatch):
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_runs_go_to_the_store_named_and_leave_no_process_wide_uri(tmp_path, no_process_uri):
    import mlflow

    first, second = f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/second.db"
    run_id = tracking.open_run(first, "exp", run_name="a", params={"tracking.uri": "https://u:secret@host", "x": 1},
                               config_text="x: 1\n")
    tracking.log_to_run(first, run_id, metrics={"m": 0.25}, tags={"t": "v"})
    assert tracking.named_run(first, "exp", "a") == (run_id, "RUNNING")
    assert tracking.named_run(second, "exp", "a") is None  # the other store has no such run
    tags, metrics = tracking.run_record(first, run_id)
    assert tags["t"] == "v" and metrics == {"m": 0.25}
    assert tracking.recorded_config(first, run_id) == ({"tracking.uri": "https://***@host", "x": "1"}, 0)
    assert tracking.client(first).download_artifacts(run_id, "config.yaml", str(tmp_path)) and \
        (tmp_path / "config.yaml").read_text() == "x: 1\n"
    tracking.end_run(first, run_id, "KILLED")
    assert tracking.named_run(first, "exp", "a") == (run_id, "KILLED")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() != first


def test_model_flavour_uri_is_put_back_after_the_block(no_process_uri, monkeypatch):
    import mlflow

    with tracking.model_flavour_uri("sqlite:///inside.db"):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == "sqlite:///inside.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///outside.db")
    with pytest.raises(RuntimeError), tracking.model_flavour_uri("sqlite:///inside.db"):
        raise RuntimeError("the block failed")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///outside.db" == mlflow.get_tracking_uri()


def test_an_encoder_is_registered_promoted_and_loaded_from_the_store_named(tmp_path, no_process_uri, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a command run from another folder
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    run_id = tracking.open_run(uri, "exp", run_name="r", params={}, config_text="")
    history = [{"epoch": 1, "loss": 2.0, "knn_top1": 0.5}]
    version, pending = tracking.log_result(uri, run_id, history=history, metrics={"final_knn_top1": 0.5},
                                           encoder=encoder, image_size=8, model_name="enc")
    assert (version, pending) == ("1", 1)
    tracking.label_version(uri, "enc", version, aliases=["best-x"], tags={"sweep": "x"})
    assert tracking.promote_if_better(uri, "enc", version, knn_top1=0.5, dataset="digits")
    assert not tracking.promote_if_better(uri, "enc", version, knn_top1=0.5, dataset="digits")  # not better
    assert [row["version"] for row in model_registry.list_versions(uri, "enc")] == ["1"]
    described = model_registry.describe_version(uri, "enc", alias="champion")
    assert set(described["aliases"]) == {"best-x", "champion"} and described["dataset"] == "digits"
    assert described["metrics"]["final_knn_top1"] == 0.5 and described["run_id"] == run_id
    assert model_registry.registered_image_size(uri, "models:/enc@champion") == 8
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(model_registry.load_registered(uri, "models:/enc@champion")(images),
                               encoder.eval()(images))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # The artifacts are beside the database, wherever the command ran.
    assert any((tmp_path / "mlruns").rglob("MLmodel")) and not (tmp_path / "elsewhere" / "mlruns").exists()


def test_names_are_checked_by_mlflows_own_rules_before_any_work():
    from mlflow.utils import validation

    used = ("_validate_experiment_name", "_validate_model_name", "_validate_model_alias_name",
            "_validate_model_alias_name_reserved")  # private in MLflow 3.17: check_names depends on them
    assert [name for name in used if not callable(getattr(validation, name, None))] == []
    tracking.check_names(experiment="sscl", model_name="sscl-digits", alias="champion")
    with pytest.raises(ValueError) as err:
        tracking.check_names(experiment="", model_name="a/b", alias="latest")
    text = str(err.value)
    assert "tracking.experiment='': Invalid experiment name" in text and "tracking.model_name='a/b'" in text
    assert "alias='latest': 'latest' alias name (case insensitive) is reserved" in text
