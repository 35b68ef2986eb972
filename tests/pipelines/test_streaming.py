"""The pipeline streams from storage: the driver's memory does not grow with the data, corrupt files
mid-stream are named or skipped and counted, evaluation on 2 workers equals one process, and the
ImageNet presets run on a tiny folder of their layout. Real local Ray, real files, MLflow on sqlite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bench.ingest import write_jpeg_folder
from sscl.build import model_from_config
from sscl.config import load_config
from sscl.data.decode import DataError
from conftest import QUICKSTART, quick_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def folder_overrides(tmp_path, root, *extra):
    return quick_overrides(tmp_path, "data.source=imagefolder", f"data.root={root}", "data.image_size=32",
                           "train.epochs=1", "data.batch_size=32", "tracking.register=false", *extra)


def driver_peak_mib(tmp_path, root, address) -> float:
    overrides = folder_overrides(tmp_path, root, f"train.run_name=memory-{root.name}", "train.knn_max_images=300",
                                 "data.test_fraction=0.05", "data.batch_size=128")
    env = {**os.environ, "RAY_ADDRESS": address}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "driver-memory", "--config", str(QUICKSTART),
                          *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 1
    return result["peak_rss_mib"]


def test_driver_memory_does_not_grow_with_the_data(tmp_path, ray_cluster):
    small = write_jpeg_folder(tmp_path / "small", 300, side=48)
    large = write_jpeg_folder(tmp_path / "large", 3000, side=48)
    small_peak = driver_peak_mib(tmp_path, small, ray_cluster.address_info["address"])
    large_peak = driver_peak_mib(tmp_path, large, ray_cluster.address_info["address"])
    # Decoded in the driver, 2,700 more images cost ~430 MiB (160 KiB each, measured before streaming).
    assert large_peak - small_peak < 100, (small_peak, large_peak)


def broken_folder(tmp_path):
    root = write_jpeg_folder(tmp_path / "images", 200, side=32, n_classes=4)
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not the rest of a JPEG")
    return root


def test_corrupt_image_mid_stream_fails_the_run_naming_it(tmp_path, ray_cluster, monkeypatch):
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = broken_folder(tmp_path)
    # With retries allowed: a data error stops the run at once (every retry would meet the same file).
    cfg = load_config(QUICKSTART, folder_overrides(tmp_path, root, "train.max_failures=2", "train.run_name=corrupt"))
    with pytest.raises(DataError, match=r"broken\.jpg.*data\.skip_corrupt=true"):
        main(cfg)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("sscl-quickstart").experiment_id])
    assert run.info.status == "FAILED"


def test_a_small_folder_on_two_workers_with_fewer_evaluation_images_than_workers(tmp_path, ray_cluster, monkeypatch):
    """Tens of images, class folders named with "_", a separate evaluation tree of one image."""
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = write_jpeg_folder(tmp_path / "train", 40, side=32, n_classes=2)
    for name in ("class_0", "class_1"):
        (root / name).rename(root / f"_{name}")
    (tmp_path / "val" / "_class_0").mkdir(parents=True)
    (tmp_path / "val" / "_class_0" / "only.jpg").write_bytes((root / "_class_0" / "0.jpg").read_bytes())
    val = tmp_path / "val"
    result = main(load_config(QUICKSTART, folder_overrides(
        tmp_path, root, f"data.eval_root={val}", "data.batch_size=8", "loss.n_hard=8", "train.knn_k=5",
        "train.epochs=2", "tracking.register=true", "train.run_name=small")))
    assert result["epochs"] == 2 and result["version"] == "1"
    assert result["final_knn_top1"] in (0.0, 1.0) and result["linear_top1"] in (0.0, 1.0)  # one image, scored once


def test_skip_corrupt_skips_and_logs_the_count(tmp_path, ray_cluster, monkeypatch):
    import mlflow

    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = broken_folder(tmp_path)
    result = main(load_config(QUICKSTART, folder_overrides(tmp_path, root, "data.skip_corrupt=true",
                                                             "train.run_name=skipping")))
    assert result["skipped_images"] == 1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.value for m in client.get_metric_history(result["run_id"], "skipped_images")] == [1.0]


def test_decoding_on_the_device_with_two_workers_reads_pngs_and_skips_a_corrupt_jpeg(tmp_path, ray_cluster,
                                                                                     monkeypatch):
    """placement.decode=device: the training stream carries the encoded bytes; both workers decode their
    batches (JPEGs batched, PNGs by the task path's decoder) and skip the same file by the same name."""
    from PIL import Image

    from pipelines.datasets import build_datasets
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = broken_folder(tmp_path)
    for jpeg in sorted((root / "class_0").glob("*.jpg"))[:10]:
        Image.open(jpeg).save(jpeg.with_suffix(".png"))
        jpeg.unlink()
    cfg = load_config(QUICKSTART, folder_overrides(tmp_path, root, "placement.decode=device", "placement.views=trainer",
                                                   "data.skip_corrupt=true", "train.run_name=on-device"))
    assert build_datasets(cfg)[0]["train"].schema().names == ["bytes", "where"]
    result = main(cfg)
    assert result["epochs"] == 1 and result["skipped_images"] == 1


def test_evaluation_on_two_workers_equals_one_process_on_the_same_features(tmp_path, ray_cluster, monkeypatch):
    from sscl.build import eval_transform
    from pipelines.pretrain import load_trained, main
    from sscl.data.sources import build_dataset
    from sscl.evaluate import extract_features, knn_top1, linear_probe_top1

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Also covers placement.views=trainer: views made inside the training loop (here on the CPU device).
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, "train.epochs=1", "tracking.register=false",
                                                  "train.run_name=eval-equal", "placement.views=trainer"))
    assert cfg.scaling.num_workers == 2
    result = main(cfg)
    from ray.train import Checkpoint

    checkpoints = sorted(p for p in (tmp_path / "ray" / "eval-equal").glob("checkpoint_*") if p.is_dir())
    model, _, _ = load_trained(cfg, Checkpoint.from_directory(str(checkpoints[-1])))

    def features(split):
        rows = build_dataset(cfg.data, split).dataset.take_all()
        batches = [{"image": np.stack([r["image"] for r in rows[i : i + cfg.data.eval_batch_size]]),
                    "label": np.array([r["label"] for r in rows[i : i + cfg.data.eval_batch_size]])}
                   for i in range(0, len(rows), cfg.data.eval_batch_size)]
        return extract_features(model.encoder, batches, **eval_transform(cfg))

    (train_f, train_y), (test_f, test_y) = features("eval_train"), features("eval_test")
    assert len(train_y) + len(test_y) == 1797
    assert result["final_knn_top1"] == knn_top1(train_f, train_y, test_f, test_y, k=cfg.train.knn_k,
                                                 temperature=cfg.train.knn_temperature)
    assert result["linear_top1"] == linear_probe_top1(train_f, train_y, test_f, test_y, epochs=cfg.train.linear_epochs,
                                                      seed=cfg.train.seed)


def test_imagenet_preset_on_a_tiny_train_val_tree(tmp_path, ray_cluster, monkeypatch):
    from pipelines.pretrain import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_jpeg_folder(tmp_path / "imagenet" / "train", 120, side=40, n_classes=3)
    write_jpeg_folder(tmp_path / "imagenet" / "val", 30, side=40, n_classes=3, seed=1)
    overrides = [f"data.root={tmp_path}/imagenet/train", f"data.eval_root={tmp_path}/imagenet/val",
                 "data.image_size=40", "augment.crop_size=32", "data.batch_size=32", "data.eval_batch_size=64",
                 "model.width=0.125", "model.hidden_dim=64", "loss.n_hard=16", "loss.n_synthetic=4", "train.epochs=1",
                 "optim.warmup_epochs=0", "train.knn_every=1", "train.knn_k=10", "train.linear_epochs=5",
                 "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5",
                 "scaling.sync_batchnorm=false", f"train.storage_path={tmp_path}/ray",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.register=false"]
    cfg = load_config(ROOT / "pipelines" / "configs" / "imagenet.yaml", overrides)
    assert cfg.optim.name == "lars" and cfg.augment.blur_p > 0 and cfg.data.eval_root
    result = main(cfg)
    assert result["epochs"] == 1 and 0 <= result["final_knn_top1"] <= 1
    # ImageNet-100 differs in sizes only (ResNet-18, its batch, loss and schedule values): its config
    # loads on the same tree and its encoder takes the crops; it runs the same pipeline as above.
    small = load_config(ROOT / "pipelines" / "configs" / "imagenet100.yaml", overrides)
    assert small.optim.name == "lars" and small.model.encoder == "resnet18" and small.model.stem == "imagenet"
    features, z = model_from_config(small)(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 64) and z.shape == (2, 128)  # ResNet-18 at width 0.125: 512 / 8
