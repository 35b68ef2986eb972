"""``benchmark ingest``: the pipeline's streaming ingest (Ray Data: list, read + decode + views in
tasks) against torchvision's ImageFolder + DataLoader on the same JPEG folder, first epoch and steady
state, then the pipeline driver's peak memory at two dataset sizes.

Ray is imported when the benchmark runs, not at import: ``write_jpeg_folder`` serves tests without it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipelines.bench.harness import BENCHMARK
from sscl.outputs import claim_folder


def write_jpeg_folder(root: Path, n_images: int, *, side: int | tuple[int, int] = 64, n_classes: int = 10,
                      seed: int = 0) -> Path:
    """``root/class_<k>/<i>.jpg``: smooth random images (JPEG-compressible like photos), ``n_images`` in
    all, ``side`` pixels square or (width, height)."""
    from PIL import Image

    width, height = (side, side) if isinstance(side, int) else side
    rng = np.random.default_rng(seed)
    across, down = np.linspace(0, 1, width, dtype=np.float32), np.linspace(0, 1, height, dtype=np.float32)
    for i in range(n_images):
        folder = root / f"class_{i % n_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-128, 128, 3), rng.uniform(-128, 128, 3)
        img = a + b * down[:, None, None] + c * across[None, :, None] + rng.normal(0, 8, (height, width, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


# --setting: generated image (width, height), decoded side, crop, blur probability, where the views are made
INGEST_SETTINGS = {
    "64px": ((64, 64), 64, 32, 0.0, "ray_data"),
    # ImageNet's typical photo, as the ImageNet preset takes it: the CPUs read, decode and resize to
    # 256 px; the two 224-px views are made on the training device (not timed here).
    "imagenet": ((500, 375), 256, 224, 0.5, "trainer"),
}


def _ingest_config(root: Path, *extra: str, image_size: int = 64, crop: int = 32, blur_p: float = 0.0,
                   where: str = "ray_data"):
    from sscl.config import load_config

    return load_config(None, ["data.source=imagefolder", f"data.root={root}", f"data.image_size={image_size}",
                              f"placement.views={where}", f"augment.crop_size={crop}", f"augment.blur_p={blur_p}",
                              "data.batch_size=256", *extra])


def _stream_epoch(cfg) -> tuple[float, float, int]:
    """Time to the first batch, images/s and images of one epoch through the pipeline's own stages:
    listing, read + decode + two-view augmentation in Ray tasks, torch batches."""
    from pipelines.datasets import train_stream
    from sscl.data.sources import build_dataset

    start = time.perf_counter()
    dataset = train_stream(cfg, build_dataset(cfg.data, "pretrain", seed=0).dataset)
    first, images = None, 0
    for batch in dataset.iter_torch_batches(batch_size=cfg.data.batch_size):
        first = first or time.perf_counter() - start
        images += len(next(iter(batch.values())))
    return first, images / (time.perf_counter() - start), images


def _torchvision_epoch(root: Path, image_size: int, crop_size: int, blur_p: float, views: bool = True
                       ) -> tuple[float, float, int]:
    """The baseline's epoch: with ``views``, two per-image v2 views; without, decoded and resized only."""
    import torchvision
    from torchvision.transforms import v2

    from pipelines.bench.benchmark import torchvision_two_view_transform  # here: that module imports this one

    transform = torchvision_two_view_transform(crop_size, blur_p)

    to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])
    dataset = torchvision.datasets.ImageFolder(str(root), transform=(lambda img: (
        transform(to_tensor(img.convert("RGB"))), transform(to_tensor(img.convert("RGB"))))) if views else (
        lambda img: to_tensor(img.convert("RGB"))))
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=2, shuffle=True)
    first, images = None, 0
    for images_or_views, _ in loader:
        first = first or time.perf_counter() - start
        images += len(images_or_views[0] if views else images_or_views)
    return first, images / (time.perf_counter() - start), images


def driver_peak_rss(argv: Sequence[str]) -> dict[str, float]:
    """Runs ``pipelines.pretrain`` with ``argv`` in this process and returns this process's peak RSS
    (MiB): the driver's own memory, not the Ray workers'."""
    import resource

    from pipelines.pretrain import main as pretrain
    from pipelines.config_cli import parse_config

    result = pretrain(parse_config(list(argv), prog="driver-memory"))
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "epochs": result["epochs"], "knn_top1": result["final_knn_top1"]}


def _driver_rss_subprocess(root: Path, work: Path) -> float:
    overrides = [f"data.root={root}", "data.source=imagefolder", "data.image_size=32", "augment.crop_size=32",
                 "data.test_fraction=0.05", "train.knn_max_images=1000", "train.epochs=1", "model.width=0.125",
                 "data.batch_size=256", "optim.warmup_epochs=0", "train.linear_epochs=5", "train.knn_k=20",
                 f"train.storage_path={work}/ray", f"tracking.uri=sqlite:///{work}/mlflow.db",
                 "tracking.register=false", f"train.run_name=memory-{root.name}", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=0.5"]
    out = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "driver-memory", *overrides],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def bench_ingest(n_images: int = 4000, memory_sizes: Sequence[int] = (5000, 50000), workdir: str = "", *,
                 root: str = "", setting: str = "64px", epochs: int = 3, json_path: str = "") -> dict[str, float]:
    """Streaming ingest (Ray Data: read + decode + two-view augment) vs torchvision ImageFolder +
    DataLoader(num_workers=2) with per-image v2 transforms, on the same JPEG folder: the first epoch
    and the steady state (the median of the later epochs), and Ray's start on its own line; then
    the pipeline driver's peak RSS for a one-epoch run at each of ``memory_sizes`` images.

    Args:
        root: an existing image folder (``<class>/<image>``) instead of ``n_images`` generated JPEGs.
        setting: ``INGEST_SETTINGS``'s generated image size, decoded side, crop and blur.
        json_path: also write the figures there as JSON.
    """
    import ray

    from pipelines.datasets import use_data_settings
    from pipelines.ray_checks import init_ray, wait_warm
    from sscl.data.formats import list_folder

    (width, height), image_size, crop, blur_p, where = INGEST_SETTINGS[setting]
    views = where == "ray_data"
    work = Path(workdir or tempfile.mkdtemp(prefix="sscl-ingest-"))
    made = [*([] if root else [f"jpegs-{setting}-{n_images}"]), *(f"jpegs-{size}" for size in memory_sizes),
            "ray", "mlflow.db", "mlruns"]
    claim_folder(work, "--workdir", BENCHMARK, may_hold=made)  # the JPEG folders it made earlier are reused
    if root:
        folder = Path(root)
        n_images = len(list_folder(root).paths)
    else:
        folder = work / f"jpegs-{setting}-{n_images}"
        if not folder.exists():
            write_jpeg_folder(folder, n_images, side=(width, height))
    cfg = _ingest_config(folder, image_size=image_size, crop=crop, blur_p=blur_p, where=where)
    start = time.perf_counter()
    init_ray(dashboard=False)
    ray_start = time.perf_counter() - start
    use_data_settings()
    wait_warm()
    warm = time.perf_counter() - start - ray_start
    stream = [_stream_epoch(cfg) for _ in range(epochs)]
    ray.shutdown()
    loader = [_torchvision_epoch(folder, image_size, crop, blur_p, views) for _ in range(epochs)]
    steady = {name: (statistics.median(e[0] for e in runs[1:]), statistics.median(e[1] for e in runs[1:]))
              for name, runs in (("stream", stream), ("loader", loader))}
    row = {"images": n_images, "pipeline_epoch_images": stream[0][2], "dataloader_epoch_images": loader[0][2],
           "setting": setting, "cores": os.cpu_count(),
           "pipeline_img_s": stream[0][1], "pipeline_first_batch_s": stream[0][0],
           "pipeline_steady_img_s": steady["stream"][1], "pipeline_steady_first_batch_s": steady["stream"][0],
           "dataloader_img_s": loader[0][1], "dataloader_first_batch_s": loader[0][0],
           "dataloader_steady_img_s": steady["loader"][1], "ray_start_s": ray_start, "workers_warm_s": warm}
    row["first_epoch_ratio"] = row["pipeline_img_s"] / row["dataloader_img_s"]
    row["steady_ratio"] = row["pipeline_steady_img_s"] / row["dataloader_steady_img_s"]
    made = f"two {crop}-px views" if views else f"{image_size}-px images (views on the training device)"
    print(f"ingest of {n_images} {'images in ' + root if root else f'generated {width}x{height} JPEGs'} -> {made}, "
          f"{epochs} epochs, {os.cpu_count()} cores")
    print(f"Ray start {ray_start:.2f} s (local cluster, no dashboard), then task workers warm after {warm:.2f} s more")
    print(f"{'pipeline':<44} {'epoch':<8} {'first batch s':>13} {'img/s':>8} {'img/s/core':>10}")
    names = (("Ray Data: read + decode + TwoViewAugment", "torchvision ImageFolder + DataLoader(2) + v2") if views
             else ("Ray Data: read + decode + resize", "torchvision ImageFolder + DataLoader(2) + resize"))
    for name, first, steady_row in ((names[0], stream[0], steady["stream"]), (names[1], loader[0], steady["loader"])):
        for epoch, (t_first, img_s) in (("first", first[:2]), ("steady", steady_row)):
            print(f"{name:<44} {epoch:<8} {t_first:>13.2f} {img_s:>8.0f} {img_s / (os.cpu_count() or 1):>10.0f}")
    print(f"{'ratio (Ray Data / torchvision)':<44} {'first':<8} {'':>13} {row['first_epoch_ratio']:>8.2f}")
    print(f"{'ratio (Ray Data / torchvision)':<44} {'steady':<8} {'':>13} {row['steady_ratio']:>8.2f}")
    peaks = []
    for size in memory_sizes:
        sized = folder if size == n_images else work / f"jpegs-{size}"
        if not sized.exists():
            write_jpeg_folder(sized, size)
        peaks.append(_driver_rss_subprocess(sized, work))
        row[f"driver_peak_rss_mib_{size}"] = peaks[-1]
    if peaks:
        print("driver peak RSS, one pretraining epoch: " + ", ".join(
            f"{size} images {peak:.0f} MiB" for size, peak in zip(memory_sizes, peaks)) +
              f"; growth {peaks[-1] - peaks[0]:+.0f} MiB")
    if json_path:
        Path(json_path).write_text(json.dumps(row, indent=1) + "\n")
    return row
