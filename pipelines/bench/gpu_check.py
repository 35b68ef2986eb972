"""One prepared GPU check: loss correctness on the device, then loss, augmentation and training-step
throughput, in a single process that needs only PyTorch (and torchvision, numpy).

    make gpu-check                                      # python3 -m pipelines.gpu_check --device cuda
    python -m pipelines.gpu_check --device cuda --out $OUT/gpu_check.json
    python -m pipelines.gpu_check --device cpu --quick  # the same code at tiny sizes, < 1 min on 2 cores

It is written for a lent GPU machine that has PyTorch but neither Ray, MLflow, pytest nor this
project installed: run it from the repository root. It imports only ``sscl.losses``, ``sscl.models``,
``sscl.moco``, ``sscl.data.augment``, ``sscl.data.device_decode``, ``sscl.train`` (torch, torchvision,
numpy and PIL only) and, from ``tests/``, the torch-only correctness checks ``device_checks.py`` with
the loop reference ``loss_reference.py`` (the checks that ``tests/sscl/losses/test_device_losses.py`` runs).

Sections, in order (each catches its own failures, so one failure keeps the rest):

1. correctness: every loss in float64 on the device against the loop reference (value and the
   gradients w.r.t. z1, z2; pass if the max abs error is <= 1e-10), the drawn hard pool against a
   sorted list, and a bf16-autocast grid (small temperatures, beta up to 10, tau_plus, nearly
   identical and collapsed views) that passes if no loss or gradient is NaN/inf; the same for the
   queue loss ``moco_loss``.
2. loss timing: forward+backward of ``sscl_loss`` and ``nt_xent`` at global batches 256, 1024 and
   4096 (D = 128), and of ``moco_loss`` and MoCo's InfoNCE at Q = 4096 and 65536, median of
   interleaved calls timed with CUDA events.
3. augmentation: ``TwoViewAugment.views`` images/s on a uint8 batch already on the device.
4. training step: ``train_one_epoch`` with bf16 autocast, ResNet-18 (CIFAR stem, 32 px) and ResNet-50
   (ImageNet stem, 224 px), SimCLR, SSCL and SSCL on a MoCo queue (the momentum encoder's keys, its
   update and the enqueue in every step, BatchNorm split in 8 parts), with channels_last and
   torch.compile on and off (the MoCo step uncompiled only).
5. end to end: JPEGs the check writes (500x375) read as bytes by DataLoader workers and decoded by
   them on the CPU or on the device, resized to 256, two 224-px views on the device, bf16 ResNet-50
   SSCL steps with channels_last: img/s of each and its fraction of the step-only rate; and the
   device decoder must name a truncated JPEG.

It prints one aligned table at the end and writes the same rows as JSON to ``--out``; the exit
status is 1 if any correctness row failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import torch

from pipelines.bench.gpu_plans import FULL, HYPER, QUICK, Plan
from pipelines.bench.gpu_training import time_end_to_end, time_training
from pipelines.bench.harness import (Row, error_text, format_table, free_memory, fwd_bwd, json_safe, median_ms,
                                     progress, unit_rows)
from sscl.data.augment import TwoViewAugment
from sscl.losses import get_loss, moco_loss, nt_xent, sscl_loss

TESTS = Path(__file__).resolve().parents[2] / "tests"


def device_checks() -> ModuleType:
    """``tests/device_checks.py``, the correctness checks that pytest also runs, imported by name.

    This is the one place where ``tests/`` joins ``sys.path`` outside pytest (which puts it there
    itself): the GPU machine may lack pytest, and ``tests`` is not a package. First on the path, so
    that no other ``device_checks`` or ``loss_reference`` module installed there wins.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import device_checks

    return device_checks


# --------------------------------------------------------------------------- 1. correctness


def _max_error_status(worst: float, tolerance: float) -> str:
    return "pass" if worst <= tolerance else f"FAIL: max abs error {worst:.3g} > {tolerance:g}"  # NaN fails too


def _reference_row(checks: ModuleType, device: torch.device, case: str, name: str) -> Row:
    by_setting = checks.reference_errors(name, device)
    worst = max(by_setting.values())
    return Row("correctness", case, worst, "max abs err", _max_error_status(worst, checks.TOLERANCE), by_setting)


def _draw_row(checks: ModuleType, device: torch.device, case: str, b: int, n_hard: int) -> Row:
    wrong, problems = checks.draw_problems(b, n_hard, device)
    return Row("correctness", case, float(wrong), "anchors wrong", "FAIL: " + "; ".join(problems) if problems else "pass")


def _bf16_row(checks: ModuleType, device: torch.device, case: str, name: str) -> Row:
    failures, cases, worst_rel = checks.bf16_failures(name, device)
    status = f"FAIL: non-finite in {len(failures)} cases, e.g. {failures[0]}" if failures else "pass"
    return Row("correctness", case, float(len(failures)), f"bad of {cases}", status,
               dict(max_rel_dev_from_float64=worst_rel, failures=failures))


def _moco_reference_row(checks: ModuleType, device: torch.device, case: str) -> Row:
    worst = checks.moco_reference_error(device)
    return Row("correctness", case, worst, "max abs err", _max_error_status(worst, checks.TOLERANCE))


def _moco_bf16_row(checks: ModuleType, device: torch.device, case: str) -> Row:
    bad, cases = checks.moco_bf16_failures(device)
    return Row("correctness", case, float(len(bad)), f"bad of {cases}", f"FAIL: non-finite at {bad[0]}" if bad else "pass")


def _encoder_row(checks: ModuleType, device: torch.device, case: str) -> Row:
    worst = checks.encoder_archive_error(device)
    return Row("correctness", case, worst, "max abs err", _max_error_status(worst, checks.ENCODER_TOLERANCE))


def check_correctness(device: torch.device, plan: Plan) -> list[Row]:
    """Section 1: the losses on ``device`` against the loop reference, the drawn pool, bf16 stability;
    a registered encoder's pt2 archive on ``device`` (as the embedding job and evaluation load it).

    The checks are ``tests/device_checks.py``'s, as ``tests/sscl/losses/test_device_losses.py`` runs them.

    Args:
        device: where the losses run.
        plan: unused (the correctness sizes are the same in every plan); kept for a uniform signature.

    Returns:
        Rows whose status is "pass" or "FAIL: ...".
    """
    checks = device_checks()
    jobs: list[tuple[str, Callable[..., Row], tuple[Any, ...]]] = [  # (case, what makes its row, its arguments)
        *((f"{name} float64 vs loop reference (value, grads)", _reference_row, (name,)) for name in checks.LOSSES),
        *((f"draw_mixing B={b} n_hard={n_hard} K={40 * n_hard}: parents = hard pool", _draw_row, (b, n_hard))
          for b, n_hard in checks.DRAW_SETTINGS),
        *((f"{name} bf16 autocast: loss and grads finite", _bf16_row, (name,)) for name in checks.LOSSES),
        ("moco_loss float64 vs loop reference (value, grad q)", _moco_reference_row, ()),
        ("moco_loss bf16 autocast Q=4096: loss and grad finite", _moco_bf16_row, ()),
        ("encoder pt2 archive on the device vs the module on the CPU", _encoder_row, ()),
    ]
    rows = []
    for case, make_row, args in jobs:
        try:
            rows.append(make_row(checks, device, case, *args))
        except Exception as exc:  # one broken check must not take the others' rows with it
            traceback.print_exc(file=sys.stderr)
            rows.append(Row("correctness", case, None, "", f"FAIL: {error_text(exc)}"))
    return rows


# --------------------------------------------------------------------------- 2. loss timing


def time_losses(device: torch.device, plan: Plan) -> list[Row]:
    """Section 2: forward+backward ms of ``sscl_loss`` (mix) and ``nt_xent`` on float32 unit rows.

    Args:
        device: where the losses run.
        plan: the batches, D and repeat counts.

    Returns:
        Per batch: one row per loss (median ms) and the ratio sscl/nt.
    """
    rows = []
    for b in plan.loss_batches:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            z1, z2 = (unit_rows(b, plan.loss_dim, device, g).requires_grad_(True) for _ in range(2))
            hyper = HYPER | dict(n_hard=min(HYPER["n_hard"], 2 * b - 2))
            ms = median_ms(
                {
                    "nt_xent": fwd_bwd(lambda a, c: nt_xent(a, c, temperature=hyper["temperature"]), z1, z2),
                    "sscl": fwd_bwd(lambda a, c: sscl_loss(a, c, **hyper, generator=g), z1, z2),
                },
                device,
                warmup=plan.loss_warmup,
                rounds=plan.loss_repeats,
            )
            sizes = f"B={b} D={plan.loss_dim}"
            sscl_case = f"sscl_loss {sizes} n_hard={hyper['n_hard']} K={hyper['n_synthetic']} fwd+bwd"
            rows += [
                Row("loss timing", f"nt_xent {sizes} fwd+bwd", ms["nt_xent"], "ms", "ok"),
                Row("loss timing", sscl_case, ms["sscl"], "ms", "ok"),
                Row("loss timing", f"sscl/nt_xent {sizes}", ms["sscl"] / ms["nt_xent"], "time ratio", "ok"),
            ]
        except Exception as exc:
            rows.append(Row("loss timing", f"B={b} D={plan.loss_dim}", None, "ms", f"error: {error_text(exc)}"))
        free_memory(device)
    for q_size in plan.queue_sizes:
        case = f"Q={q_size} queries={plan.queue_queries} D={plan.loss_dim}"
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k = (unit_rows(plan.queue_queries, plan.loss_dim, device, g) for _ in range(2))
            queue = unit_rows(q_size, plan.loss_dim, device, g)
            q.requires_grad_(True)
            n_hard, n_synthetic = min(1024, q_size), 256
            infonce = get_loss("simclr", "moco", temperature=0.2)
            ms = median_ms(
                {
                    "infonce": fwd_bwd(lambda a, c: infonce(a, c, queue), q, k),
                    "moco": fwd_bwd(lambda a, c: moco_loss(a, c, queue, temperature=0.2, beta=1.0, tau_plus=0.1,
                                                           n_hard=n_hard, n_synthetic=n_synthetic, generator=g), q, k),
                },
                device,
                warmup=plan.loss_warmup,
                rounds=plan.loss_repeats,
            )
            rows += [
                Row("loss timing", f"InfoNCE {case} fwd+bwd", ms["infonce"], "ms", "ok"),
                Row("loss timing", f"moco_loss {case} n_hard={n_hard} K={n_synthetic} fwd+bwd", ms["moco"], "ms", "ok"),
                Row("loss timing", f"moco_loss/InfoNCE {case}", ms["moco"] / ms["infonce"], "time ratio", "ok"),
            ]
        except Exception as exc:
            rows.append(Row("loss timing", f"moco_loss {case}", None, "ms", f"error: {error_text(exc)}"))
        free_memory(device)
    return rows


# --------------------------------------------------------------------------- 3. augmentation


def time_augmentation(device: torch.device, plan: Plan) -> list[Row]:
    """Section 3: ``TwoViewAugment(crop_size=S).views`` on a uint8 (N, H, W, 3) batch on ``device``.

    Args:
        device: where the images are and the augmentation runs.
        plan: the settings and repeat counts.

    Returns:
        One row per setting: input images per second (each gives two views).
    """
    rows = []
    for case in plan.augment_cases:
        try:
            g = torch.Generator().manual_seed(0)
            size = (case.batch, case.input_size, case.input_size, 3)
            images = torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(device)
            augment = TwoViewAugment(crop_size=case.crop_size, blur_p=case.blur_p, seed=0)
            ms = median_ms({"views": lambda: augment.views(images)}, device, warmup=plan.augment_warmup,
                           rounds=plan.augment_repeats)["views"]
            rows.append(Row("augmentation", f"TwoViewAugment.views {case.name}", case.batch / ms * 1e3,
                            "img/s (2 views)", "ok", extra=dict(ms_per_batch=ms)))
        except Exception as exc:
            rows.append(Row("augmentation", f"TwoViewAugment.views {case.name}", None, "img/s (2 views)",
                            f"error: {error_text(exc)}"))
        free_memory(device)
    return rows


# --------------------------------------------------------------------------- report


SECTION_RUNNERS: dict[str, Callable[[torch.device, Plan], list[Row]]] = {
    "correctness": check_correctness,
    "loss timing": time_losses,
    "augmentation": time_augmentation,
    "training step": time_training,
    "end to end": time_end_to_end,
}


def _environment(device: torch.device, quick: bool) -> dict[str, Any]:
    env = dict(device=str(device), quick=quick, python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, threads=torch.get_num_threads())
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_check(
    device: torch.device, plan: Plan, start: float, on_section: Callable[[list[Row]], None] | None = None
) -> list[Row]:
    """Runs every section in order; a section that raises becomes one failed row.

    Args:
        device: where everything runs.
        plan: sizes and repeat counts.
        start: ``time.monotonic()`` at the start of the run, for the progress log.
        on_section: called with the rows so far after each section (e.g. to save them).

    Returns:
        All rows, in section order.
    """
    rows: list[Row] = []
    for section, runner in SECTION_RUNNERS.items():
        progress("gpu_check", f"{section} ...", start)
        try:
            section_rows = runner(device, plan)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            status = f"{'FAIL' if section == 'correctness' else 'error'}: {error_text(exc)}"
            section_rows = [Row(section, "section aborted", None, "", status)]
        rows += section_rows
        bad = sum(r.status.startswith(("FAIL", "error")) for r in section_rows)
        progress("gpu_check", f"{section}: {len(section_rows)} rows, {bad} failed", start)
        free_memory(device)
        if on_section is not None:
            on_section(rows)
    return rows


def correctness_failed(rows: Sequence[Row]) -> bool:
    """Whether any correctness row did not pass (the exit status of the check)."""
    return any(r.status.startswith("FAIL") or (r.section == "correctness" and r.status != "pass") for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, runs the check, prints the table and writes the JSON.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        1 if a correctness row failed, else 0.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the same code in under a minute on a CPU")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check.json"), help="where the JSON rows go")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: not a device; use cuda or cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --quick for a CPU run)")
    start = time.monotonic()
    env = _environment(device, args.quick)
    progress("gpu_check", f"{env}", start)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[Row]) -> None:
        # Rewritten after every section: a run cut short by its time limit still leaves its rows.
        env["wall_s"] = round(time.monotonic() - start, 1)
        report = dict(environment=env, rows=[asdict(r) for r in rows])
        args.out.write_text(json.dumps(json_safe(report), indent=2) + "\n")

    rows = run_check(device, QUICK if args.quick else FULL, start, on_section=save)
    print(format_table(rows))
    failed = correctness_failed(rows)
    print(f"{'FAILED' if failed else 'passed'}: correctness; {env['wall_s']} s on {env.get('device_name', device)}; "
          f"rows in {args.out}")
    return 1 if failed else 0


def cli(argv: Sequence[str] | None = None) -> None:
    """``python -m pipelines.gpu_check``: ``main`` inside the commands' one error boundary
    (``pipelines.errors.guarded``); exits 1 if a correctness row failed, else 0."""
    from pipelines.errors import guarded

    raise SystemExit(guarded("python -m pipelines.gpu_check", lambda: main(argv)))
