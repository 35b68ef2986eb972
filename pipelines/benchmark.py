"""Side-by-side benchmarks: every figure is a ratio of two timings taken in the same run.

    python -m pipelines.benchmark loss       # sscl_loss fwd+bwd vs nt_xent and lightly's NTXentLoss; moco_loss vs InfoNCE
    python -m pipelines.benchmark augment    # batched TwoViewAugment vs per-image torchvision v2
    python -m pipelines.benchmark train      # SSCL training step vs SimCLR step, ResNet-18
    python -m pipelines.benchmark train --device cuda
    python -m pipelines.benchmark ingest     # Ray Data streaming vs torchvision ImageFolder; driver memory
    python -m pipelines.benchmark ingest --images 16000 --memory-sizes none --json ingest.json
    python -m pipelines.benchmark ingest --setting imagenet --images 2000 --memory-sizes none
    python -m pipelines.benchmark ingest --root DIR   # your own image folder
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, repeats: int, sync=lambda: None) -> dict[str, float]:
    # Alternating the candidates in rounds spreads machine noise evenly over both.
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_median_seconds(fn, repeats=repeats, sync=sync))
    return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- loss

LOSS_SETTINGS = [(256, 128, 32, 8), (256, 128, 64, 32), (512, 128, 64, 256)]  # (B, D, n_hard, K)


def _unit_views(b: int, d: int, device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    z1 = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_(True)
    z2 = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_(True)
    return z1, z2


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z1: torch.Tensor, z2: torch.Tensor
             ) -> Callable[[], None]:
    def run() -> None:
        loss_fn(z1, z2).backward()
        z1.grad = z2.grad = None

    return run


def bench_loss(device: str = "cpu", rounds: int = 5, repeats: int = 10) -> list[dict[str, float]]:
    """Forward+backward time of ``sscl_loss`` (mix) and ``hcl_loss`` relative to ``nt_xent``."""
    from sscl.losses import hcl_loss, nt_xent, sscl_loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    print(f"loss forward+backward on {device}, {torch.get_num_threads()} threads (median of {rounds} rounds)")
    print(f"{'B':>5} {'D':>5} {'n_hard':>7} {'K':>5} {'nt_xent ms':>11} {'hcl ms':>8} {'sscl ms':>8} {'hcl/nt':>7} {'sscl/nt':>8}")
    for b, d, n_hard, k in LOSS_SETTINGS:
        g = torch.Generator(device=device).manual_seed(0)
        z1, z2 = _unit_views(b, d, device, g)
        t = _interleaved(
            {
                "nt": _fwd_bwd(lambda a, c: nt_xent(a, c, temperature=0.5), z1, z2),
                "hcl": _fwd_bwd(lambda a, c: hcl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1), z1, z2),
                "sscl": _fwd_bwd(lambda a, c: sscl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=n_hard,
                                                        n_synthetic=k, generator=g), z1, z2),
            },
            rounds=rounds,
            repeats=repeats,
            sync=sync,
        )
        row = dict(B=b, D=d, n_hard=n_hard, K=k, nt_ms=t["nt"] * 1e3, hcl_ms=t["hcl"] * 1e3, sscl_ms=t["sscl"] * 1e3,
                   hcl_ratio=t["hcl"] / t["nt"], sscl_ratio=t["sscl"] / t["nt"])
        rows.append(row)
        print(f"{b:>5} {d:>5} {n_hard:>7} {k:>5} {row['nt_ms']:>11.2f} {row['hcl_ms']:>8.2f} {row['sscl_ms']:>8.2f} "
              f"{row['hcl_ratio']:>7.2f} {row['sscl_ratio']:>8.2f}")
    return rows


LIGHTLY_SETTINGS = [(256, 128), (512, 128), (1024, 128)]  # (B, D); sscl_loss with n_hard 32, K = 8


def bench_lightly(device: str = "cpu", rounds: int = 5, repeats: int = 10) -> list[dict[str, float]]:
    """Forward+backward time of ``sscl_loss`` (K = 8, n_hard 32) relative to lightly's plain ``NTXentLoss``.

    lightly is the optional ``bench`` extra (``pip install --no-deps lightly``: only its loss module
    is used). Its loss is first checked to equal ``nt_xent`` on the same inputs, so that the two
    time the same objective. Returns no rows, and says so, when lightly is not importable.
    """
    from sscl.losses import nt_xent, sscl_loss

    try:
        from lightly.loss import NTXentLoss
    except ImportError as exc:
        print(f"lightly comparison skipped: lightly is not importable ({exc}); "
              "install it with `pip install --no-deps lightly` (the optional 'bench' extra)")
        return []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    lightly_loss = NTXentLoss(temperature=0.5)
    rows = []
    print(f"sscl_loss (n_hard 32, K 8) vs lightly NTXentLoss, forward+backward on {device} (median of {rounds} rounds)")
    print(f"{'B':>5} {'D':>5} {'lightly ms':>11} {'sscl ms':>8} {'sscl/lightly':>13}")
    for b, d in LIGHTLY_SETTINGS:
        g = torch.Generator(device=device).manual_seed(0)
        z1, z2 = _unit_views(b, d, device, g)
        if not torch.allclose(lightly_loss(z1, z2), nt_xent(z1, z2, temperature=0.5), rtol=1e-5):
            raise RuntimeError(f"lightly's NTXentLoss differs from nt_xent at B={b}: not the same objective")
        t = _interleaved(
            {
                "lightly": _fwd_bwd(lightly_loss, z1, z2),
                "sscl": _fwd_bwd(lambda a, c: sscl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=32,
                                                        n_synthetic=8, generator=g), z1, z2),
            },
            rounds=rounds,
            repeats=repeats,
            sync=sync,
        )
        row = dict(B=b, D=d, lightly_ms=t["lightly"] * 1e3, sscl_ms=t["sscl"] * 1e3, ratio=t["sscl"] / t["lightly"])
        rows.append(row)
        print(f"{b:>5} {d:>5} {row['lightly_ms']:>11.2f} {row['sscl_ms']:>8.2f} {row['ratio']:>13.2f}")
    return rows


QUEUE_SETTINGS = [(256, 128, 4096, 256, 64), (256, 128, 65536, 1024, 256)]  # (queries, D, Q, n_hard, K)


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE as its reference code computes it: a cross-entropy whose class 0 is the key."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def bench_queue(device: str = "cpu", rounds: int = 5, repeats: int = 5) -> list[dict[str, float]]:
    """Forward+backward time of ``moco_loss`` with SSCL's settings relative to plain InfoNCE on the same queue."""
    from sscl.losses import moco_loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    print(f"queue loss forward+backward on {device}: moco_loss (t 0.2, beta 1, tau_plus 0.1, n_hard, K) vs InfoNCE")
    print(f"{'B':>5} {'D':>5} {'Q':>7} {'n_hard':>7} {'K':>5} {'InfoNCE ms':>11} {'moco_loss ms':>13} {'ratio':>7}")
    for b, d, q_size, n_hard, k in QUEUE_SETTINGS:
        g = torch.Generator(device=device).manual_seed(0)
        q, keys = _unit_views(b, d, device, g)
        keys = keys.detach()
        queue = F.normalize(torch.randn(q_size, d, device=device, generator=g), dim=1)

        def timed(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                loss_fn().backward()
                q.grad = None

            return run

        t = _interleaved(
            {
                "infonce": timed(lambda: infonce(q, keys, queue, 0.2)),
                "moco": timed(lambda: moco_loss(q, keys, queue, temperature=0.2, beta=1.0, tau_plus=0.1, n_hard=n_hard,
                                                n_synthetic=k, generator=g)),
            },
            rounds=rounds,
            repeats=repeats,
            sync=sync,
        )
        row = dict(B=b, D=d, Q=q_size, n_hard=n_hard, K=k, infonce_ms=t["infonce"] * 1e3, moco_ms=t["moco"] * 1e3,
                   ratio=t["moco"] / t["infonce"])
        rows.append(row)
        print(f"{b:>5} {d:>5} {q_size:>7} {n_hard:>7} {k:>5} {row['infonce_ms']:>11.2f} {row['moco_ms']:>13.2f} "
              f"{row['ratio']:>7.2f}")
    return rows


# --------------------------------------------------------------------------- augment


class _PerImageTwoViews(torch.utils.data.Dataset):
    """The baseline: torchvision.transforms.v2 applied per image, twice, in DataLoader workers."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.transform(self.images[i])


def _torchvision_two_view_transform(crop_size: int, blur_p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    from sscl.data.augment import CIFAR10_MEAN, CIFAR10_STD

    steps = [
        v2.RandomResizedCrop(crop_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur_p:
        steps.append(v2.RandomApply([v2.GaussianBlur(max(3, int(0.1 * crop_size) // 2 * 2 + 1))], p=blur_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    return v2.Compose(steps)


AUGMENT_SETTINGS = [("cifar 32px", 32, 32, 0.0), ("stl10 96px + blur", 96, 96, 0.5)]


def bench_augment(device: str = "cpu", n_images: int = 4096, batch_size: int = 512) -> list[dict[str, float]]:
    """Two-view images per second: batched ``TwoViewAugment`` vs per-image torchvision v2."""
    from sscl.data.augment import TwoViewAugment

    rows = []
    print(f"two-view augmentation, {n_images} images; batched on {device} with {torch.get_num_threads()} threads "
          "vs per-image torchvision v2 in a 2-worker DataLoader")
    print(f"{'setting':<20} {'batched img/s':>14} {'per-image img/s':>16} {'ratio':>7}")
    for name, size, crop, blur_p in AUGMENT_SETTINGS:
        gen = torch.Generator().manual_seed(0)
        images_hwc = torch.randint(0, 256, (n_images, size, size, 3), dtype=torch.uint8, generator=gen)
        augment = TwoViewAugment(crop_size=crop, blur_p=blur_p, seed=0)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        on_device = images_hwc.to(device)

        def batched() -> None:
            for start in range(0, n_images, batch_size):
                augment.views(on_device[start : start + batch_size])

        loader = torch.utils.data.DataLoader(
            _PerImageTwoViews(images_hwc.permute(0, 3, 1, 2).contiguous(), _torchvision_two_view_transform(crop, blur_p)),
            batch_size=256, num_workers=2, persistent_workers=True,
        )

        def per_image(loader=loader) -> None:
            for _ in loader:
                pass

        t = _interleaved({"batched": batched, "per_image": per_image}, rounds=2, repeats=1, sync=sync)
        row = dict(batched=n_images / t["batched"], per_image=n_images / t["per_image"])
        row["ratio"] = row["batched"] / row["per_image"]
        rows.append(row)
        print(f"{name:<20} {row['batched']:>14.0f} {row['per_image']:>16.0f} {row['ratio']:>7.1f}x")
        del loader
    return rows


# --------------------------------------------------------------------------- train


def bench_train(
    device: str = "cpu", batch_size: int | None = None, width: float | None = None, steps: int | None = None, amp: bool | None = None
) -> dict[str, float]:
    """Images per second of an SSCL training step vs a SimCLR step: ResNet-18 (CIFAR stem), same batch.

    Both steps include the forward and backward through the encoder, the loss and the optimiser.
    CPU defaults keep it to about a minute on 2 cores; CUDA defaults use the released settings.
    """
    from sscl.losses import get_loss
    from sscl.models import build_model
    from sscl.train import build_optimizer, train_one_epoch

    cuda = device.startswith("cuda")
    batch_size = batch_size or (256 if cuda else 32)
    width = width or (1.0 if cuda else 0.5)
    steps = steps or (20 if cuda else 3)
    amp = cuda if amp is None else amp
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, batch_size, 3, 32, 32, generator=gen).to(device)
    batches = [{"view1": views[0], "view2": views[1]}] * steps
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=min(32, 2 * batch_size - 2), n_synthetic=8, mode="mix")
    runners = {}
    for name in ("simclr", "sscl"):
        torch.manual_seed(0)
        model = build_model("resnet18", stem="cifar", width=width).to(device)
        optimizer = build_optimizer(model, "sgd", lr=0.1)
        loss_fn = get_loss(name, **hyper)

        def run(model=model, optimizer=optimizer, loss_fn=loss_fn) -> None:
            train_one_epoch(model, batches, loss_fn, optimizer, lr_schedule=lambda s: 0.1, device=device, amp=amp)

        runners[name] = run
    t = _interleaved(runners, rounds=3, repeats=1, sync=sync)
    row = {k: batch_size * steps / v for k, v in t.items()}
    row["ratio"] = t["sscl"] / t["simclr"]
    dev = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"training step, ResNet-18 width {width} CIFAR stem, batch {batch_size}, {steps} steps, amp={amp}, on {dev}")
    print(f"{'SimCLR img/s':>13} {'SSCL img/s':>11} {'SSCL/SimCLR time':>17}")
    print(f"{row['simclr']:>13.1f} {row['sscl']:>11.1f} {row['ratio']:>17.3f}")
    return row


# --------------------------------------------------------------------------- ingest


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
                              f"augment.where={where}", f"augment.crop_size={crop}", f"augment.blur_p={blur_p}",
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

    transform = _torchvision_two_view_transform(crop_size, blur_p)
    from torchvision.transforms import v2

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
    from sscl.data.sources import list_folder

    (width, height), image_size, crop, blur_p, where = INGEST_SETTINGS[setting]
    views = where == "ray_data"
    work = Path(workdir or tempfile.mkdtemp(prefix="sscl-ingest-"))
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


def _sizes(text: str) -> list[int]:
    """``--memory-sizes``: comma-separated positive integers, or ``none``."""
    if text == "none":
        return []
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 5000,50000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 1")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "augment", "train", "ingest", "driver-memory"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=None, help="train: batch size (cpu 32, cuda 256)")
    parser.add_argument("--width", type=float, default=None, help="train: ResNet width (cpu 0.5, cuda 1.0)")
    parser.add_argument("--steps", type=int, default=None, help="train: steps per timing (cpu 3, cuda 20)")
    parser.add_argument("--images", type=int, default=4000, help="ingest: images in the throughput comparison")
    parser.add_argument("--root", default="", help="ingest: an existing image folder (<class>/<image>) to read "
                                                   "instead of generated JPEGs")
    parser.add_argument("--setting", default="64px", choices=sorted(INGEST_SETTINGS),
                        help="ingest: 64px (64-px JPEGs -> two 32-px views) or imagenet (500x375 JPEGs decoded and "
                             "resized to 256 px, the ImageNet preset's CPU share)")
    parser.add_argument("--epochs", type=int, default=3, help="ingest: epochs of each loader (>= 2: the first, "
                                                               "then the steady state)")
    parser.add_argument("--json", default="", help="ingest: also write the figures to this JSON file")
    parser.add_argument("--memory-sizes", default="5000,50000", type=_sizes,
                        help="ingest: folder sizes for the driver's peak RSS, comma-separated integers, or none")
    parser.add_argument("--workdir", default="", help="ingest: where the JPEG folders go (default: a temp dir)")
    args, rest = parser.parse_known_args(argv)
    if args.what == "driver-memory":  # pipelines.pretrain's config arguments follow
        print(json.dumps(driver_peak_rss(rest)))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    problems = [m for ok, m in [
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (args.batch_size is None or args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.width is None or 0 < args.width <= 8, f"--width must be in (0, 8], got {args.width}"),
        (args.images >= 1, f"--images must be >= 1, got {args.images}"),
        (args.epochs >= 2, f"--epochs must be >= 2 (the first epoch, then the steady state), got {args.epochs}"),
        (not args.root or Path(args.root).is_dir(), f"--root {args.root}: no such folder"),
    ] if not ok]
    try:
        from pipelines.train_local import resolve_device

        resolve_device(args.device)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        parser.error("; ".join(problems))
    torch.set_num_threads(args.threads)
    if args.what == "ingest":
        bench_ingest(args.images, args.memory_sizes, args.workdir, root=args.root, setting=args.setting,
                     epochs=args.epochs, json_path=args.json)
    elif args.what == "loss":
        bench_loss(args.device)
        bench_lightly(args.device)
        bench_queue(args.device)
    elif args.what == "augment":
        bench_augment(args.device)
    else:
        bench_train(args.device, batch_size=args.batch_size, width=args.width, steps=args.steps)


if __name__ == "__main__":
    main()
