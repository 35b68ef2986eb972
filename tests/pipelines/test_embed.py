"""The batch-embedding job end to end: the quickstart's registered encoder (``trained``, on a real
``mlflow server``) embeds folders of generated JPEGs and the digits through Ray Data on the local
cluster, as a user's command joining it. Every image once, the one-process features, a flat driver,
a killed job rerun, lineage in MLflow, and stored features evaluated as the pipeline evaluates."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines import embed, evaluate, registry
from pipelines.bench.ingest import write_jpeg_folder
from sscl.config import load_config
from sscl.data.decode import DataError
from sscl.data.features import read_features
from conftest import QUICKSTART, run_overrides, wait_for_dead_drivers_reaped

pytestmark = pytest.mark.integration
MODEL = "models:/sscl-digits@champion"
# Runs the command and reports the driver's peak resident memory on stderr's last line.
WITH_PEAK = ("import json, resource, sys\nfrom pipelines.embed import cli\ntry:\n    cli(sys.argv[1:])\nfinally:\n"
             "    print(json.dumps({'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), "
             "file=sys.stderr)")
# Features of the same images, batched differently: float32 sums in another order.
FEATURE_ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed-images")
    small = write_jpeg_folder(tmp / "small", 300, side=40, seed=1)
    (small / "class_3" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    return {"large": write_jpeg_folder(tmp / "large", 3000, side=40), "small": small}


def folder_args(trained, root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--config", str(QUICKSTART), "--out", str(out), f"tracking.uri={trained.uri}",
            "data.source=imagefolder", f"data.root={root}", "data.image_size=32", "data.eval_batch_size=256", *extra]


def command_env(cluster) -> dict[str, str]:
    env = {**os.environ, "RAY_ADDRESS": cluster.address_info["address"]}  # the job joins the test's cluster
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_embed(trained, cluster, args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    out = subprocess.run([sys.executable, "-c", WITH_PEAK, *args], cwd=cwd, env=command_env(cluster),
                         capture_output=True, text=True, timeout=600)
    peak = json.loads(out.stderr.strip().splitlines()[-1])["peak_rss_mib"]
    return out, peak


def lineage_run(console: str) -> str:
    return re.search(r"^lineage: run ([0-9a-f]+) ", console, re.M)[1]


@pytest.fixture(scope="module")
def large(trained, ray_cluster, folders, tmp_path_factory):
    """The 3,000-image folder embedded by two encoder actors."""
    tmp = tmp_path_factory.mktemp("embed-large")
    out, peak = run_embed(trained, ray_cluster, folder_args(trained, folders["large"], tmp / "features",
                                                            "embed.actors=2"), tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"console": out.stdout, "stderr": out.stderr, "peak": peak, "out": tmp / "features"}


def test_every_image_is_embedded_once_with_the_one_process_features(trained, large, folders):
    from pipelines.evaluate import load_encoder
    from sscl import model_registry
    from sscl.build import encode
    from sscl.data.decode import decode_image

    stored = read_features(str(large["out"]))
    root = folders["large"]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert len(stored.keys) == 3000 and list(stored.keys) == files  # each key once (read back in key order)
    assert list(stored.labels) == [int(k.split("/")[0].split("_")[1]) for k in files]  # class_<k>, sorted k < 10
    assert stored.features.dtype == np.float32 and stored.features.shape == (3000, 64)
    encoder = load_encoder(MODEL, trained.uri, resolve=False)
    cfg = load_config(QUICKSTART, ["data.image_size=32"])
    images = np.stack([decode_image((root / k).read_bytes(), 32, k) for k in files])
    expected = encode(encoder, images, cfg, image_size=model_registry.registered_image_size(trained.uri, MODEL))
    np.testing.assert_allclose(stored.features, expected.numpy(), atol=FEATURE_ATOL, rtol=0)
    # The console: the job's own lines only.
    lines = large["console"].splitlines()
    assert lines[0].startswith(f"embedding 3000 images (imagefolder pretrain) with {MODEL} (version ")
    assert lines[0].endswith(f"on 2 actor(s), batch 256 -> {large['out']}")
    assert re.fullmatch(rf"embedded 3000 images, 64 features each, in [\d.]+ s \(\d+ images/s\) -> {large['out']}",
                        lines[-2])
    progress = r"  [\d,]+/3,000 images  \d+ images/s|  0/3,000 images \(the encoder actors are starting\)"
    assert [line for line in lines[1:-2] if not re.fullmatch(progress, line)] == []
    assert large["stderr"].strip().splitlines()[:-1] == [], large["stderr"][-3000:]  # but the peak-memory line


def test_the_drivers_memory_stays_flat_and_corrupt_images_are_skipped_and_counted(trained, ray_cluster, large,
                                                                                   folders, tmp_path):
    out, peak = run_embed(trained, ray_cluster, folder_args(trained, folders["small"], tmp_path / "features",
                                                            "embed.actors=2", "data.skip_corrupt=true"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # Collected in the driver, 2,700 more images' features and keys would cost little; their pixels ~13 MiB,
    # a materialised dataset's blocks more: the bound is the streaming test's.
    assert large["peak"] - peak < 100, (peak, large["peak"])
    assert "skipped 1 undecodable image(s) (data.skip_corrupt=true)" in out.stdout
    stored = read_features(str(tmp_path / "features"))
    assert len(stored.keys) == 300 and "class_3/broken.jpg" not in set(stored.keys)
    assert stored.manifest["skipped_images"] == 1


def test_a_corrupt_image_fails_the_job_naming_it_and_marks_its_run_failed(trained, ray_cluster, folders, tmp_path):
    import mlflow

    out, _ = run_embed(trained, ray_cluster, folder_args(trained, folders["small"], tmp_path / "features",
                                                         "embed.actors=1"), tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "broken.jpg" in out.stderr and "data.skip_corrupt=true" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(DataError, match="did not finish"):
        read_features(str(tmp_path / "features"))
    started = json.loads((tmp_path / "features" / "_STARTED").read_text())
    assert mlflow.MlflowClient(trained.uri).get_run(started["run_id"]).info.status == "FAILED"


def test_the_job_is_recorded_in_the_models_experiment_and_tagged_on_its_version(trained, large, folders):
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    run_id = lineage_run(large["console"])
    version = registry.show(MODEL, trained.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_run(version["run_id"]).info.experiment_id
    assert run.data.tags["sscl.embedding_of"] == f"sscl-digits/{version['version']}"
    params = run.data.params
    assert (params["model"], params["model.name"], params["model.version"], params["model.run_id"]) == (
        MODEL, "sscl-digits", version["version"], version["run_id"])
    assert (params["data.source"], params["data.root"], params["out"]) == ("imagefolder", str(folders["large"]),
                                                                          str(large["out"]))
    metrics = run.data.metrics
    assert metrics["images"] == 3000 and metrics["feature_dim"] == 64 and metrics["skipped_images"] == 0
    assert metrics["images_per_second"] == pytest.approx(3000 / metrics["seconds"])
    listed = {row["run_id"]: row for row in version["embeddings"]}
    assert listed[run_id]["out"] == str(large["out"]) and listed[run_id]["images"] == 3000
    tagged = client.get_model_version("sscl-digits", version["version"]).tags["latest_embedding_run"]
    assert tagged in listed and listed[tagged]["status"] == "FINISHED"


def test_a_killed_job_leaves_an_incomplete_output_that_the_rerun_replaces_completely(trained, ray_cluster, folders,
                                                                                      tmp_path):
    import mlflow

    args = folder_args(trained, folders["large"], tmp_path / "features", "embed.actors=1", "data.eval_batch_size=32")
    job = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *args], cwd=tmp_path, env=command_env(ray_cluster),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "features").glob("*.parquet")):  # mid-way: some files written
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it was killed"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert not (tmp_path / "features" / "_SUCCESS").exists()
    with pytest.raises(DataError, match="did not finish"):
        read_features(str(tmp_path / "features"))
    killed = json.loads((tmp_path / "features" / "_STARTED").read_text())["run_id"]
    wait_for_dead_drivers_reaped()

    rerun, _ = run_embed(trained, ray_cluster, folder_args(trained, folders["large"], tmp_path / "features",
                                                           "embed.actors=2"), tmp_path)  # no --overwrite needed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"cleared {tmp_path / 'features'}: it held the partial output of an embedding job that did not finish" \
        in rerun.stdout
    stored = read_features(str(tmp_path / "features"))
    assert len(stored.keys) == len(set(stored.keys)) == 3000
    assert set(stored.keys) == {p.relative_to(folders["large"]).as_posix() for p in folders["large"].rglob("*.jpg")}
    client = mlflow.MlflowClient(trained.uri)
    assert client.get_run(killed).info.status == "KILLED"  # its driver could not say so; the rerun did
    assert client.get_run(lineage_run(rerun.stdout)).info.status == "FINISHED"
    # A complete output is replaced only when asked.
    again, _ = run_embed(trained, ray_cluster, folder_args(trained, folders["large"], tmp_path / "features"), tmp_path)
    assert again.returncode == 2 and "pass --overwrite to replace it" in again.stderr
    assert read_features(str(tmp_path / "features")).manifest == stored.manifest


def test_stored_features_evaluate_as_the_pipeline_evaluates_the_model(trained, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = "models:/sscl-digits/2"
    cfg = load_config(QUICKSTART, run_overrides(trained.tmp, trained.uri))
    for split in ("eval_train", "eval_test"):
        embed.main(cfg, embed.Embedding(), model_uri=model, out=str(tmp_path / split), split=split)
    stored = evaluate.of_features(cfg, str(tmp_path / "eval_train"), str(tmp_path / "eval_test"))
    assert (stored["bank_images"], stored["test_images"]) == (1438, 359)
    pipeline = evaluate.main(cfg, model)  # Ray Data -> one task encoding both sets
    # The same images and encoder, batched at other boundaries: float32 noise may move one test image.
    assert abs(stored["knn_top1"] - pipeline["knn_top1"]) <= 1 / 359 + 1e-9
    assert abs(stored["linear_top1"] - pipeline["linear_top1"]) <= 1 / 359 + 1e-9
    digits = read_features(str(tmp_path / "eval_test"))
    assert all(k.startswith("digits:") for k in digits.keys) and len(set(digits.keys)) == 359
    with pytest.raises(DataError, match="embed both with the same model version"):
        embed.main(cfg, embed.Embedding(), model_uri="models:/sscl-digits/1", out=str(tmp_path / "v1"),
                   split="eval_test")
        evaluate.of_features(cfg, str(tmp_path / "eval_train"), str(tmp_path / "v1"))
