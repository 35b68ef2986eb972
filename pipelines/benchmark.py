"""Side-by-side benchmarks: every figure is a ratio of two timings taken in the same run.

    python -m pipelines.benchmark loss       # sscl_loss fwd+bwd vs nt_xent fwd+bwd
    python -m pipelines.benchmark augment    # batched TwoViewAugment vs per-image torchvision v2
    python -m pipelines.benchmark train      # SSCL training step vs SimCLR step, ResNet-18
    python -m pipelines.benchmark train --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 3, sync: Callable[[], None] = lambda: None) -> float:
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

LOSS_SETTINGS = [(256, 128, 32, 8), (256, 128, 64, 32), (512, 128, 64, 256)]


def bench_loss(device: str = "cpu", rounds: int = 5, repeats: int = 10) -> list[dict[str, float]]:
    """Forward+backward time of ``sscl_loss`` (mix) and ``hcl_loss`` relative to ``nt_xent``."""
    from sscl.losses import hcl_loss, nt_xent, sscl_loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    print(f"loss forward+backward on {device}, {torch.get_num_threads()} threads (median of {rounds} rounds)")
    print(f"{'B':>5} {'D':>5} {'n_hard':>7} {'K':>5} {'nt_xent ms':>11} {'hcl ms':>8} {'sscl ms':>8} {'hcl/nt':>7} {'sscl/nt':>8}")
    for b, d, n_hard, k in LOSS_SETTINGS:
        g = torch.Generator(device=device).manual_seed(0)
        z1 = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_(True)
        z2 = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_(True)

        def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                loss_fn().backward()
                z1.grad = z2.grad = None

            return run

        t = _interleaved(
            {
                "nt": step(lambda: nt_xent(z1, z2, temperature=0.5)),
                "hcl": step(lambda: hcl_loss(z1, z2, temperature=0.5, beta=1.0, tau_plus=0.1)),
                "sscl": step(
                    lambda: sscl_loss(
                        z1, z2, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=n_hard, n_synthetic=k, generator=g
                    )
                ),
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "augment", "train"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "loss":
        bench_loss(args.device)
    elif args.what == "augment":
        bench_augment(args.device)
    else:
        bench_train(args.device)


if __name__ == "__main__":
    main()
