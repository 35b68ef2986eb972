"""Side-by-side benchmarks: every figure is a ratio of two timings taken in the same run.

    python -m pipelines.benchmark loss       # sscl_loss fwd+bwd vs nt_xent and lightly's NTXentLoss; moco_loss vs InfoNCE
    python -m pipelines.benchmark augment    # batched TwoViewAugment vs per-image torchvision v2
    python -m pipelines.benchmark train      # SSCL training step vs SimCLR step, ResNet-18
    python -m pipelines.benchmark train --device cuda
    python -m pipelines.benchmark ingest     # Ray Data streaming vs torchvision ImageFolder; driver memory
    python -m pipelines.benchmark ingest --images 16000 --memory-sizes none --json ingest.json
    python -m pipelines.benchmark ingest --setting imagenet --images 2000 --memory-sizes none
    python -m pipelines.benchmark ingest --root DIR   # your own image folder
    python -m pipelines.benchmark embed --images 4000   # the embedding job vs a one-process loop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipelines.bench import ingest
from pipelines.bench.harness import Column, fwd_bwd, header_line, median_ms, row_line, unit_rows

# The library is imported inside each benchmark, when it runs: a test that swaps
# ``sscl.losses.sscl_loss`` for a recording wrapper then sees every call.

# --------------------------------------------------------------------------- loss

LOSS_SETTINGS = [(256, 128, 32, 8), (256, 128, 64, 32), (512, 128, 64, 256)]  # (B, D, n_hard, K)
LIGHTLY_SETTINGS = [(256, 128), (512, 128), (1024, 128)]  # (B, D); sscl_loss with n_hard 32, K = 8
QUEUE_SETTINGS = [(256, 128, 4096, 256, 64), (256, 128, 65536, 1024, 256)]  # (queries, D, Q, n_hard, K)


def _views(b: int, d: int, device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return unit_rows(b, d, device, g).requires_grad_(True), unit_rows(b, d, device, g).requires_grad_(True)


def bench_loss(device: str = "cpu", rounds: int = 5, repeats: int = 10) -> list[dict[str, float]]:
    """Forward+backward time of ``sscl_loss`` (mix) and ``hcl_loss`` relative to ``nt_xent``.

    Args:
        device: where the losses run.
        rounds: interleaved rounds; repeats: timed calls of each loss per round.

    Returns:
        Per setting of ``LOSS_SETTINGS``: its sizes, each loss's median ms and the two ratios (also printed).
    """
    from sscl.losses import hcl_loss, nt_xent, sscl_loss

    dev = torch.device(device)
    columns: list[Column] = [("B", ">5", "d"), ("D", ">5", "d"), ("n_hard", ">7", "d"), ("K", ">5", "d"),
                             ("nt_xent ms", ">11", ".2f"), ("hcl ms", ">8", ".2f"), ("sscl ms", ">8", ".2f"),
                             ("hcl/nt", ">7", ".2f"), ("sscl/nt", ">8", ".2f")]
    print(f"loss forward+backward on {device}, {torch.get_num_threads()} threads (median of {rounds} rounds)")
    print(header_line(columns))
    rows = []
    for b, d, n_hard, k in LOSS_SETTINGS:
        g = torch.Generator(device=dev).manual_seed(0)
        z1, z2 = _views(b, d, dev, g)
        ms = median_ms(
            {
                "nt": fwd_bwd(lambda a, c: nt_xent(a, c, temperature=0.5), z1, z2),
                "hcl": fwd_bwd(lambda a, c: hcl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1), z1, z2),
                "sscl": fwd_bwd(lambda a, c: sscl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=n_hard,
                                                       n_synthetic=k, generator=g), z1, z2),
            },
            dev, warmup=1, rounds=rounds, calls=repeats,
        )
        rows.append(dict(B=b, D=d, n_hard=n_hard, K=k, nt_ms=ms["nt"], hcl_ms=ms["hcl"], sscl_ms=ms["sscl"],
                         hcl_ratio=ms["hcl"] / ms["nt"], sscl_ratio=ms["sscl"] / ms["nt"]))
        print(row_line(columns, list(rows[-1].values())))
    return rows


def bench_lightly(device: str = "cpu", rounds: int = 5, repeats: int = 10) -> list[dict[str, float]]:
    """Forward+backward time of ``sscl_loss`` (K = 8, n_hard 32) relative to lightly's plain ``NTXentLoss``.

    lightly is the optional ``bench`` extra (``pip install --no-deps lightly``: only its loss module
    is used). Its loss is first checked to equal ``nt_xent`` on the same inputs, so that the two
    time the same objective.

    Returns:
        Per setting of ``LIGHTLY_SETTINGS``: sizes, median ms of each, the ratio; no rows (and a printed
        line saying so) when lightly is not importable.

    Raises:
        RuntimeError: lightly's loss is not ``nt_xent`` on the same inputs.
    """
    from sscl.losses import nt_xent, sscl_loss

    try:
        from lightly.loss import NTXentLoss
    except ImportError as exc:
        print(f"lightly comparison skipped: lightly is not importable ({exc}); "
              "install it with `pip install --no-deps lightly` (the optional 'bench' extra)")
        return []
    dev = torch.device(device)
    lightly_loss = NTXentLoss(temperature=0.5)
    columns: list[Column] = [("B", ">5", "d"), ("D", ">5", "d"), ("lightly ms", ">11", ".2f"), ("sscl ms", ">8", ".2f"),
                             ("sscl/lightly", ">13", ".2f")]
    print(f"sscl_loss (n_hard 32, K 8) vs lightly NTXentLoss, forward+backward on {device} (median of {rounds} rounds)")
    print(header_line(columns))
    rows = []
    for b, d in LIGHTLY_SETTINGS:
        g = torch.Generator(device=dev).manual_seed(0)
        z1, z2 = _views(b, d, dev, g)
        if not torch.allclose(lightly_loss(z1, z2), nt_xent(z1, z2, temperature=0.5), rtol=1e-5):
            raise RuntimeError(f"lightly's NTXentLoss differs from nt_xent at B={b}: not the same objective")
        ms = median_ms(
            {
                "lightly": fwd_bwd(lightly_loss, z1, z2),
                "sscl": fwd_bwd(lambda a, c: sscl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=32,
                                                       n_synthetic=8, generator=g), z1, z2),
            },
            dev, warmup=1, rounds=rounds, calls=repeats,
        )
        rows.append(dict(B=b, D=d, lightly_ms=ms["lightly"], sscl_ms=ms["sscl"], ratio=ms["sscl"] / ms["lightly"]))
        print(row_line(columns, list(rows[-1].values())))
    return rows


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE as its reference code computes it: a cross-entropy whose class 0 is the key.

    Args:
        q: (B, D) queries, k: (B, D) their keys, queue: (Q, D) negatives; all L2-normalised.
        temperature: t of the logits ``q.k / t``.

    Returns:
        The mean loss over the queries.
    """
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def bench_queue(device: str = "cpu", rounds: int = 5, repeats: int = 5) -> list[dict[str, float]]:
    """Forward+backward time of ``moco_loss`` with SSCL's settings relative to plain InfoNCE on the same queue.

    Returns:
        Per setting of ``QUEUE_SETTINGS``: sizes, median ms of each and the ratio (also printed).
    """
    from sscl.losses import moco_loss

    dev = torch.device(device)
    columns: list[Column] = [("B", ">5", "d"), ("D", ">5", "d"), ("Q", ">7", "d"), ("n_hard", ">7", "d"),
                             ("K", ">5", "d"), ("InfoNCE ms", ">11", ".2f"), ("moco_loss ms", ">13", ".2f"),
                             ("ratio", ">7", ".2f")]
    print(f"queue loss forward+backward on {device}: moco_loss (t 0.2, beta 1, tau_plus 0.1, n_hard, K) vs InfoNCE")
    print(header_line(columns))
    rows = []
    for b, d, q_size, n_hard, k in QUEUE_SETTINGS:
        g = torch.Generator(device=dev).manual_seed(0)
        q, keys = unit_rows(b, d, dev, g).requires_grad_(True), unit_rows(b, d, dev, g)
        queue = unit_rows(q_size, d, dev, g)
        ms = median_ms(
            {
                "infonce": fwd_bwd(lambda a, c: infonce(a, c, queue, 0.2), q, keys),
                "moco": fwd_bwd(lambda a, c: moco_loss(a, c, queue, temperature=0.2, beta=1.0, tau_plus=0.1,
                                                       n_hard=n_hard, n_synthetic=k, generator=g), q, keys),
            },
            dev, warmup=1, rounds=rounds, calls=repeats,
        )
        rows.append(dict(B=b, D=d, Q=q_size, n_hard=n_hard, K=k, infonce_ms=ms["infonce"], moco_ms=ms["moco"],
                         ratio=ms["moco"] / ms["infonce"]))
        print(row_line(columns, list(rows[-1].values())))
    return rows


# --------------------------------------------------------------------------- augment

AUGMENT_SETTINGS = [("cifar 32px", 32, 32, 0.0), ("stl10 96px + blur", 96, 96, 0.5)]  # (name, size, crop, blur_p)


class _PerImageTwoViews(torch.utils.data.Dataset):
    """The baseline: torchvision.transforms.v2 applied per image, twice, in DataLoader workers."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.transform(self.images[i])


def torchvision_two_view_transform(crop_size: int, blur_p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image torchvision v2 pipeline of one view, with ``TwoViewAugment``'s steps and strengths.

    Args:
        crop_size: side of the random resized crop (px).
        blur_p: probability of the Gaussian blur (0: no blur step).

    Returns:
        A transform of one uint8 (3, H, W) image to a normalised float32 (3, S, S) view.
    """
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


def bench_augment(device: str = "cpu", n_images: int = 4096, batch_size: int = 512) -> list[dict[str, float]]:
    """Two-view images per second: batched ``TwoViewAugment`` vs per-image torchvision v2.

    Args:
        device: where the batched augmentation runs (the baseline runs in 2 CPU workers).
        n_images: images per timed pass; batch_size: of the batched augmentation.

    Returns:
        Per setting of ``AUGMENT_SETTINGS``: images/s of each and their ratio (also printed).
    """
    from sscl.data.augment import TwoViewAugment

    dev = torch.device(device)
    columns: list[Column] = [("setting", "<20", ""), ("batched img/s", ">14", ".0f"), ("per-image img/s", ">16", ".0f"),
                             ("ratio", ">7", ".1f")]
    print(f"two-view augmentation, {n_images} images; batched on {device} with {torch.get_num_threads()} threads "
          "vs per-image torchvision v2 in a 2-worker DataLoader")
    print(header_line(columns))
    rows = []
    for name, size, crop, blur_p in AUGMENT_SETTINGS:
        gen = torch.Generator().manual_seed(0)
        images_hwc = torch.randint(0, 256, (n_images, size, size, 3), dtype=torch.uint8, generator=gen)
        augment = TwoViewAugment(crop_size=crop, blur_p=blur_p, seed=0)
        on_device = images_hwc.to(dev)

        def batched() -> None:
            for start in range(0, n_images, batch_size):
                augment.views(on_device[start : start + batch_size])

        loader = torch.utils.data.DataLoader(
            _PerImageTwoViews(images_hwc.permute(0, 3, 1, 2).contiguous(), torchvision_two_view_transform(crop, blur_p)),
            batch_size=256, num_workers=2, persistent_workers=True,
        )

        def per_image(loader: torch.utils.data.DataLoader = loader) -> None:
            for _ in loader:
                pass

        ms = median_ms({"batched": batched, "per_image": per_image}, dev, warmup=1, rounds=2)
        rows.append(dict(batched=n_images / ms["batched"] * 1e3, per_image=n_images / ms["per_image"] * 1e3,
                         ratio=ms["per_image"] / ms["batched"]))
        print(row_line(columns, [name, *rows[-1].values()]) + "x")
        del loader
    return rows


# --------------------------------------------------------------------------- train


def bench_train(
    device: str = "cpu", batch_size: int | None = None, width: float | None = None, steps: int | None = None,
    amp: bool | None = None,
) -> dict[str, float]:
    """Images per second of an SSCL training step vs a SimCLR step: ResNet-18 (CIFAR stem), same batch.

    Both steps include the forward and backward through the encoder, the loss and the optimiser.
    CPU defaults keep it to about a minute on 2 cores; CUDA defaults use the released settings.

    Args:
        device: cpu or cuda.
        batch_size, width, steps, amp: the step's settings; None takes the device's default
            (cpu: 32, 0.5, 3, off; cuda: 256, 1.0, 20, on).

    Returns:
        img/s of each (``simclr``, ``sscl``) and the step time ratio SSCL/SimCLR (``ratio``), also printed.
    """
    from sscl.losses import LOSSES, get_loss
    from sscl.models import build_model
    from sscl.train import build_optimizer, train_one_epoch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    batch_size = batch_size or (256 if cuda else 32)
    width = width or (1.0 if cuda else 0.5)
    steps = steps or (20 if cuda else 3)
    amp = cuda if amp is None else amp
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, batch_size, 3, 32, 32, generator=gen).to(dev)
    batches = [{"view1": views[0], "view2": views[1]}] * steps
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=min(32, 2 * batch_size - 2), n_synthetic=8, mode="mix")
    runners = {}
    for name in ("simclr", "sscl"):
        torch.manual_seed(0)
        model = build_model("resnet18", stem="cifar", width=width).to(dev)
        optimizer = build_optimizer(model, "sgd", lr=0.1)
        loss_fn = get_loss(name, **{k: v for k, v in hyper.items() if k in LOSSES[name].keys})

        def run(model=model, optimizer=optimizer, loss_fn=loss_fn) -> None:
            train_one_epoch(model, batches, loss_fn, optimizer, lr_schedule=lambda s: 0.1, device=dev, amp=amp)

        runners[name] = run
    ms = median_ms(runners, dev, warmup=1, rounds=3)
    row = dict(simclr=batch_size * steps / ms["simclr"] * 1e3, sscl=batch_size * steps / ms["sscl"] * 1e3,
               ratio=ms["sscl"] / ms["simclr"])
    where = torch.cuda.get_device_name(dev) if cuda else f"cpu, {torch.get_num_threads()} threads"
    columns: list[Column] = [("SimCLR img/s", ">13", ".1f"), ("SSCL img/s", ">11", ".1f"), ("SSCL/SimCLR time", ">17", ".3f")]
    print(f"training step, ResNet-18 width {width} CIFAR stem, batch {batch_size}, {steps} steps, amp={amp}, on {where}")
    print(header_line(columns))
    print(row_line(columns, list(row.values())))
    return row


# --------------------------------------------------------------------------- command line


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
    """Parses the command line and runs one benchmark, which prints its table.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "augment", "train", "ingest", "embed", "driver-memory"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=None, help="train: batch size (cpu 32, cuda 256)")
    parser.add_argument("--width", type=float, default=None, help="train: ResNet width (cpu 0.5, cuda 1.0)")
    parser.add_argument("--steps", type=int, default=None, help="train: steps per timing (cpu 3, cuda 20)")
    parser.add_argument("--images", type=int, default=4000, help="ingest, embed: images in the throughput comparison")
    parser.add_argument("--actors", type=int, default=2, help="embed: the job's encoder actors (embed.actors)")
    parser.add_argument("--root", default="", help="ingest: an existing image folder (<class>/<image>) to read "
                                                   "instead of generated JPEGs")
    parser.add_argument("--setting", default="64px", choices=sorted(ingest.INGEST_SETTINGS),
                        help="ingest: 64px (64-px JPEGs -> two 32-px views) or imagenet (500x375 JPEGs decoded and "
                             "resized to 256 px, the ImageNet preset's CPU share)")
    parser.add_argument("--epochs", type=int, default=3, help="ingest: epochs of each loader (>= 2: the first, "
                                                               "then the steady state)")
    parser.add_argument("--json", default="", help="ingest, embed: also write the figures to this JSON file")
    parser.add_argument("--memory-sizes", default="5000,50000", type=_sizes,
                        help="ingest: folder sizes for the driver's peak RSS, comma-separated integers, or none")
    parser.add_argument("--workdir", default="", help="ingest, embed: where the JPEG folders go (default: a temp dir)")
    args, rest = parser.parse_known_args(argv)
    if args.what == "driver-memory":  # pipelines.pretrain's config arguments follow
        print(json.dumps(ingest.driver_peak_rss(rest)))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    problems = [m for ok, m in [
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (args.batch_size is None or args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.width is None or 0 < args.width <= 8, f"--width must be in (0, 8], got {args.width}"),
        (args.images >= 1, f"--images must be >= 1, got {args.images}"),
        (args.actors >= 1, f"--actors must be >= 1, got {args.actors}"),
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
        ingest.bench_ingest(args.images, args.memory_sizes, args.workdir, root=args.root, setting=args.setting,
                            epochs=args.epochs, json_path=args.json)
    elif args.what == "embed":
        from pipelines.bench.embed import bench_embed

        bench_embed(args.images, actors=args.actors, workdir=args.workdir, json_path=args.json)
    elif args.what == "loss":
        bench_loss(args.device)
        bench_lightly(args.device)
        bench_queue(args.device)
    elif args.what == "augment":
        bench_augment(args.device)
    else:
        bench_train(args.device, batch_size=args.batch_size, width=args.width, steps=args.steps)


def cli(argv: Sequence[str] | None = None) -> None:
    """``python -m pipelines.benchmark``: ``main`` inside the commands' one error boundary
    (``pipelines.errors.guarded``: a user's mistake exits 2 with one message)."""
    from pipelines.errors import guarded

    guarded("python -m pipelines.benchmark", lambda: main(argv))
