"""End to end on the offline digits: a real local Ray cluster, 2 Train workers and a real ``mlflow
server`` process on 127.0.0.1 (sqlite behind it, artifacts proxied)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import evaluate, registry

from sscl.config import load_config
from sscl.model_registry import EMBEDDING_OF
from conftest import QUICKSTART, free_port, quick_overrides, run_overrides

pytestmark = pytest.mark.integration


def quick_cfg(tmp_path, *extra):
    return load_config(QUICKSTART, quick_overrides(tmp_path, *extra))


@pytest.fixture
def client(trained, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it, in earlier tests too
    mlflow.set_tracking_uri(trained.uri)
    return mlflow.MlflowClient(trained.uri)


def test_console_shows_settings_progress_and_result_without_ray_internals(trained):
    # Also the raylet's notices (on 2 cores: "N PYTHON worker processes have been started") are logged only.
    ours = (trained.console.stdout + trained.console.stderr).splitlines()
    assert ours[0].startswith("run 'quickstart': digits (1438 images), resnet18 x0.125, loss sscl temperature 0.2 "
                              "beta 1 tau_plus 0.1 n_hard 32 n_synthetic 8 mode mix, batch 64")
    assert "logs: logs/pretrain-" in ours[0] and any((trained.tmp / "logs").glob("pretrain-*.log"))
    assert ours[1].startswith("before training: knn_top1")
    assert [line.split("  loss")[0] for line in ours if line.startswith("epoch") and "steps" not in line] == [
        "epoch   1/2", "epoch   2/2"]
    assert ours[-3].startswith("registered sscl-digits version 1 (champion): kNN top-1"), ours[-6:]
    assert ours[-2] == "load it: mlflow.pytorch.load_model('models:/sscl-digits/1')"
    assert ours[-1] == f"browse:  {trained.uri}"  # the server's own UI
    known = ("run ", "before training", "epoch ", "registered ", "load it", "browse")
    assert [line for line in ours if not line.startswith(known)] == []


def test_rerun_with_more_epochs_continues_the_same_run_and_registers_once_more(trained, client):
    runs = client.search_runs([client.get_experiment_by_name("sscl-quickstart").experiment_id])
    (first,) = [r for r in runs if EMBEDDING_OF not in r.data.tags]  # the embedding jobs' runs are its neighbours
    assert trained.second["run_id"] == first.info.run_id and trained.second["epochs"] == 4
    assert str(trained.second["version"]) == "2"
    # The same command once more: already finished, nothing retrained or registered again.
    assert trained.again["run_id"] == first.info.run_id and trained.again["version"] == "2"
    assert trained.again["final_knn_top1"] == pytest.approx(trained.second["final_knn_top1"])
    # The run's params say what trained: the first value, and the resume's change with the epoch it came at.
    run = client.get_run(first.info.run_id)
    assert run.data.params["train.epochs"] == "2" and run.data.params["resume_1.train.epochs"] == "4"
    assert run.data.tags["sscl.resume_1"] == "after epoch 2: train.epochs 2 -> 4" and run.info.status == "FINISHED"


def test_rerun_with_other_values_is_refused_naming_each_key_before_ray_starts(trained, client, monkeypatch):
    import ray

    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for changed, named in ((["loss.temperature=0.5", "model.width=0.25"],
                            ["loss.temperature: 0.2 (recorded) -> 0.5", "model.width: 0.125 (recorded) -> 0.25"]),
                           (["train.epochs=3"], ["train.epochs: 4 (recorded) -> 3"])):
        with pytest.raises(ValueError) as err:
            main(load_config(QUICKSTART, run_overrides(trained.tmp, trained.uri, "train.epochs=4", *changed)))
        assert all(line in str(err.value) for line in named), str(err.value)
        assert "or a new train.run_name" in str(err.value)
    assert client.get_run(trained.second["run_id"]).info.status == "FINISHED"  # nothing was opened or trained
    assert ray.is_initialized()  # the module's cluster; the check itself needs none


def test_every_epoch_is_logged_once_across_the_resume(trained, client):
    run_id = trained.second["run_id"]
    for key in ("knn_top1", "loss", "neg_floor_fraction", "neg_hardest_real", "neg_synthetic_mean"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4], key
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    floor = [m.value for m in client.get_metric_history(run_id, "neg_floor_fraction")]
    assert all(0 <= f <= 1 for f in floor)


def test_run_records_params_final_metrics_and_plots(trained, client):
    run = client.get_run(trained.second["run_id"])
    for key in ("final_knn_top1", "linear_top1", "initial_knn_top1", "lr", "images_per_second"):
        assert key in run.data.metrics
    assert run.data.params["loss.name"] == "sscl" and run.data.params["scaling.num_workers"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "similarity_histogram.png"} <= artifacts


def test_optimizer_state_travels_with_the_checkpoint(trained):
    checkpoints = sorted(p for p in (trained.tmp / "ray" / "quickstart").glob("checkpoint_*") if p.is_dir())
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)
    steps = 4 * ((1797 - 359) // 64)
    assert state["epoch"] == 4 and state["step"] == steps
    assert all(int(s["step"]) == steps for s in state["optimizer"]["state"].values())  # AdamW's, across the resume


def test_registered_encoders_load_by_alias_and_version_without_pickle(trained, client, monkeypatch):
    import mlflow

    assert str(client.get_model_version_by_alias("sscl-digits", "champion").version) in ("1", "2")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    for address in ("models:/sscl-digits@champion", "models:/sscl-digits/2"):
        model = mlflow.pytorch.load_model(address)
        assert model(torch.randn(5, 3, 32, 32)).shape == (5, 64)  # ResNet-18 at width 0.125: 512 / 8


def test_evaluating_the_registered_encoder_reproduces_the_recorded_score(trained, client):
    evaluated = evaluate.main(load_config(QUICKSTART, run_overrides(trained.tmp, trained.uri)), "models:/sscl-digits/2")
    assert abs(evaluated["knn_top1"] - trained.second["final_knn_top1"]) <= 0.01


def test_registry_lists_shows_promotes_and_embeds(trained, client, tmp_path):
    uri = trained.uri
    rows = registry.list_versions("sscl-digits", uri)
    assert [r["version"] for r in rows] == ["2", "1"] and rows[0]["dataset"] == "digits"
    holder = registry.show("models:/sscl-digits@champion", uri)["version"]
    registry.promote("sscl-digits", "1", "champion", uri)
    assert registry.show("models:/sscl-digits@champion", uri)["version"] == "1"
    registry.promote("sscl-digits", holder, "champion", uri)
    with pytest.raises(ValueError, match="not in the registry"):
        registry.show("models:/sscl-digits/99", uri)
    np.save(tmp_path / "batch.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert tuple(registry.embed("models:/sscl-digits@champion", str(tmp_path / "batch.npy"), str(tmp_path / "e.npy"),
                                tracking_uri=uri)) == (3, 64)
    assert np.load(tmp_path / "e.npy").shape == (3, 64)
    # Another size is resized to the one the encoder was exported for (torch.export's guards refuse others).
    np.save(tmp_path / "large.npy", np.zeros((3, 48, 48, 3), dtype=np.uint8))
    registry.embed("models:/sscl-digits@champion", str(tmp_path / "large.npy"), str(tmp_path / "l.npy"), tracking_uri=uri)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), np.load(tmp_path / "e.npy"), atol=1e-5)  # all zeros
    with pytest.raises(ValueError, match="--alias: alias='latest': 'latest' alias name"):
        registry.promote("sscl-digits", "1", "latest", uri)


def test_the_runs_artifacts_went_through_the_server_into_its_store(trained, client):
    run = client.get_run(trained.second["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the job needs no access to the store
    stored = trained.store / "artifacts"
    assert any(stored.rglob("MLmodel")) and any(stored.rglob("curves.png"))
    assert not (trained.tmp / "mlruns").exists()


def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as err:
        main(quick_cfg(tmp_path, f"tracking.uri={uri}"))
    assert "127.0.0.1" in str(err.value) and "secret" not in str(err.value)
    assert not (tmp_path / "ray").exists()  # no training started


def test_tracking_checks_send_credentials_and_know_an_mlflow_server(server, tmp_path):
    import http.server
    import threading

    from sscl import tracking

    tracking.check_tracking_server(f"http://someone:p%40ss@127.0.0.1:{server.port}")  # user info: basic auth, not a failure

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            refused = "Authorization" not in self.headers and self.server.server_port == ports["auth"]
            self.send_response(401 if refused else 200)
            self.end_headers()
            self.wfile.write(b"<html>a web page</html>")

        def log_message(self, *args):
            pass

    answering = {name: http.server.HTTPServer(("127.0.0.1", 0), Answer) for name in ("web", "auth")}
    ports = {name: web.server_port for name, web in answering.items()}
    for web in answering.values():
        threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="answers HTTP but is not an MLflow tracking server"):
            tracking.check_tracking_server(f"http://127.0.0.1:{ports['web']}")
        with pytest.raises(ConnectionError, match=r"answered 401 on /version \(the credentials were refused\)"):
            tracking.check_tracking_server(f"http://127.0.0.1:{ports['auth']}")
    finally:
        for web in answering.values():
            web.shutdown()
    with pytest.raises(ValueError, match="is a folder"):
        tracking.check_tracking_server(f"sqlite:///{tmp_path}")
    with pytest.raises(ValueError, match="no plain file store"):
        tracking.check_tracking_server(f"file://{tmp_path}/mlruns")
