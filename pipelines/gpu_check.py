"""One prepared GPU check: loss correctness on the device, then loss, augmentation and training-step
throughput, in a single process that needs only PyTorch (and torchvision, numpy).

    make gpu-check                                      # python3 -m pipelines.gpu_check --device cuda
    python -m pipelines.gpu_check --device cuda --out $OUT/gpu_check.json
    python -m pipelines.gpu_check --device cpu --quick  # the same code at tiny sizes, < 1 min on 2 cores

It is written for a lent GPU machine that has PyTorch but neither Ray, MLflow nor this project
installed: run it from the repository root. It imports only ``sscl.losses``, ``sscl.models``,
``sscl.moco``, ``sscl.data.augment``, ``sscl.data.device_decode``, ``sscl.train`` (torch, torchvision,
numpy and PIL only) and the loop reference in
``tests/loss_reference.py``.

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
import gc
import importlib.util
import itertools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from sscl.data.augment import TwoViewAugment
from sscl.losses import Mixing, dcl_loss, draw_mixing, get_loss, hcl_loss, moco_loss, nt_xent, sscl_loss
from sscl.models import build_model
from sscl.moco import MomentumQueue
from sscl.train import EpochResult, build_optimizer, train_one_epoch

T = TypeVar("T")
Loss2 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z1, z2) -> loss

TOLERANCE = 1e-10  # float64 on the device against the loop reference, as in tests/test_losses.py
# The benchmark's SSCL settings (pipelines/benchmark.py): n_hard capped by the batch, K = 8.
HYPER = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=32, n_synthetic=8, mode="mix")


@dataclass(frozen=True)
class Row:
    """One line of the report.

    Attributes:
        section: a key of ``SECTION_RUNNERS``.
        case: what was measured, with its sizes.
        figure: the number (None when the case did not run).
        unit: what ``figure`` counts.
        status: "pass"/"FAIL: ..." for correctness, "ok" for measurements, "error: ..." or
            "skipped: ..." when a case did not run.
        extra: further numbers kept in the JSON only.
    """

    section: str
    case: str
    figure: float | None
    unit: str
    status: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentCase:
    """Attributes: name, batch (images), input_size (px of the uint8 images), crop_size, blur_p."""

    name: str
    batch: int
    input_size: int
    crop_size: int
    blur_p: float


@dataclass(frozen=True)
class TrainCase:
    """Attributes: name, encoder, stem, width (channel multiplier), batch (images), image_size (px)."""

    name: str
    encoder: str
    stem: str
    width: float
    batch: int
    image_size: int


@dataclass(frozen=True)
class EndToEndCase:
    """Section 5's files and step. Attributes: images (JPEGs written), photo ((width, height) of each),
    image_size (decoded side), crop_size, width (ResNet-50 channel multiplier), batch, loader_workers
    (DataLoader workers reading the files), epochs (the first is not timed)."""

    images: int
    photo: tuple[int, int]
    image_size: int
    crop_size: int
    width: float
    batch: int
    loader_workers: int
    epochs: int


@dataclass(frozen=True)
class StepOptions:
    """Attributes: channels_last (model and inputs), compile (torch.compile of the model)."""

    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        return f"channels_last {'on' if self.channels_last else 'off'}, compile {'on' if self.compile else 'off'}"


# The training step's losses: the first is every ratio's denominator.
# "moco sscl": SSCL on a MoCo queue, as the moco_cifar10 preset trains on one GPU: BatchNorm in 8 parts.
TRAIN_LOSSES = ("simclr", "sscl", "moco sscl")
MOCO_BN_SPLITS = 8
PROJECTION_DIM = 128  # z of the training step's models, and of the queue's keys

# Compile only with channels_last on: each compile of ResNet-50 costs about a minute, and the
# channels_last effect is already measured without it.
OPTION_SETS = (StepOptions(False, False), StepOptions(True, False), StepOptions(True, True))


@dataclass(frozen=True)
class Plan:
    """Sizes and repeat counts of one run.

    Attributes:
        loss_batches: global batch sizes B for the loss timing.
        loss_dim: D of the projections.
        queue_sizes, queue_queries: Q and the number of queries for the queue loss timing.
        loss_warmup, loss_repeats: calls before timing, timed calls per loss (interleaved).
        augment_cases: the augmentation settings.
        augment_warmup, augment_repeats: calls before timing, timed calls.
        train_cases: the models of the training step.
        train_warmup, train_steps: steps before timing (compile happens here), timed steps.
        compile_backend: torch.compile backend, or None to skip the compiled cases.
        train_budget_s: no new training case starts after this many seconds of the section.
        e2e: the end-to-end case (section 5).
    """

    loss_batches: tuple[int, ...]
    loss_dim: int
    queue_sizes: tuple[int, ...]
    queue_queries: int
    loss_warmup: int
    loss_repeats: int
    augment_cases: tuple[AugmentCase, ...]
    augment_warmup: int
    augment_repeats: int
    train_cases: tuple[TrainCase, ...]
    train_warmup: int
    train_steps: int
    compile_backend: str | None
    train_budget_s: float
    e2e: EndToEndCase


# Sized for about six minutes on one H200, most of it the two inductor compiles.
FULL = Plan(
    loss_batches=(256, 1024, 4096),
    loss_dim=128,
    queue_sizes=(4096, 65536),
    queue_queries=512,
    loss_warmup=3,
    loss_repeats=20,
    augment_cases=(
        AugmentCase("32px b512", batch=512, input_size=32, crop_size=32, blur_p=0.0),
        AugmentCase("224px from 256px b256 blur_p 0.5", batch=256, input_size=256, crop_size=224, blur_p=0.5),
    ),
    augment_warmup=2,
    augment_repeats=10,
    train_cases=(
        TrainCase("resnet18 cifar 32px b512", "resnet18", "cifar", 1.0, batch=512, image_size=32),
        TrainCase("resnet50 imagenet 224px b256", "resnet50", "imagenet", 1.0, batch=256, image_size=224),
    ),
    train_warmup=3,  # the first call compiles; the next ones settle cuDNN and the allocator
    train_steps=15,
    compile_backend="inductor",
    train_budget_s=240.0,
    # ImageNet's typical photo, decoded at 256 and cropped to 224 as the ImageNet preset does.
    e2e=EndToEndCase(images=2048, photo=(500, 375), image_size=256, crop_size=224, width=1.0, batch=256,
                     loader_workers=8, epochs=3),
)

# The same code at sizes a 2-core CPU runs in well under a minute. Inductor would spend minutes
# compiling C++ there, so the compiled cases use the "eager" backend: Dynamo still traces the model
# inside train_one_epoch, which is the part this run can check before the GPU run.
QUICK = Plan(
    loss_batches=(16, 32, 64),
    loss_dim=128,
    queue_sizes=(256, 2048),
    queue_queries=32,
    loss_warmup=1,
    loss_repeats=3,
    augment_cases=(
        AugmentCase("16px b64", batch=64, input_size=16, crop_size=16, blur_p=0.0),
        AugmentCase("32px from 40px b32 blur_p 0.5", batch=32, input_size=40, crop_size=32, blur_p=0.5),
    ),
    augment_warmup=1,
    augment_repeats=2,
    train_cases=(
        TrainCase("resnet18 w0.125 cifar 32px b32", "resnet18", "cifar", 0.125, batch=32, image_size=32),
        TrainCase("resnet50 w0.125 imagenet 64px b16", "resnet50", "imagenet", 0.125, batch=16, image_size=64),
    ),
    train_warmup=1,
    train_steps=2,
    compile_backend="eager",
    train_budget_s=40.0,
    e2e=EndToEndCase(images=48, photo=(100, 75), image_size=64, crop_size=56, width=0.125, batch=16,
                     loader_workers=2, epochs=3),
)


# --------------------------------------------------------------------------- helpers


def _log(message: str, start: float) -> None:
    # stderr, flushed: when the run is cut short, its log still says how far it got.
    print(f"[gpu_check {time.monotonic() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Runs ``fn`` once; returns its result and its duration in ms (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end)
    began = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - began) * 1e3


def _median_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms per call of each function; calls alternate so that drifts hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_timed_ms(fn, device)[1])
    return {name: statistics.median(ms) for name, ms in samples.items()}


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load_loss_reference() -> ModuleType:
    """The loop reference of ``tests/loss_reference.py``, loaded from its file.

    By path rather than ``import tests.loss_reference``: ``tests`` has no ``__init__.py``, and a
    regular ``tests`` package that some wheel left in site-packages would win over that namespace
    package on a machine whose Python environment this project does not control.
    """
    path = Path(__file__).resolve().parents[1] / "tests" / "loss_reference.py"
    spec = importlib.util.spec_from_file_location("loss_reference", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the loss reference from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views(
    b: int, d: int, *, seed: int, kind: str = "random", dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows (B, D) on the CPU, seeded: "random" (correlated views, as in training), "near"
    (z2 within 1e-3 of z1) or "collapsed" (every row within 1e-3 of one direction)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "collapsed":
        centre = torch.randn(1, d, generator=g, dtype=torch.float64)
        z1 = centre + 1e-3 * torch.randn(b, d, generator=g, dtype=torch.float64)
        z2 = centre + 1e-3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    else:
        z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
        noise = 1e-3 if kind == "near" else 0.5
        z2 = F.normalize(z1, dim=1) + noise * torch.randn(b, d, generator=g, dtype=torch.float64)
    return F.normalize(z1, dim=1).to(dtype), F.normalize(z2, dim=1).to(dtype)


def _random_mixing(b: int, k: int, seed: int) -> Mixing:
    # Arbitrary parents, not only the hard pool: the formula must hold for any recipe.
    g = torch.Generator().manual_seed(seed)
    j1 = torch.randint(2 * b, (2 * b, k), generator=g)
    j2 = torch.randint(2 * b, (2 * b, k), generator=g)
    return Mixing(j1, j2, torch.rand(2 * b, k, generator=g, dtype=torch.float64))


def _value_and_grads(loss: Loss2, z1: torch.Tensor, z2: torch.Tensor) -> list[torch.Tensor]:
    """``[loss, dloss/dz1, dloss/dz2]`` on the CPU, for leaves made from copies of z1, z2."""
    a, c = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    value = loss(a, c)
    g1, g2 = torch.autograd.grad(value, (a, c))
    return [t.detach().cpu() for t in (value, g1, g2)]


# --------------------------------------------------------------------------- 1. correctness


def _reference_cases(
    ref: ModuleType, setting: dict[str, float], mixing: Mixing, device: torch.device
) -> dict[str, tuple[Loss2, Loss2]]:
    """Per loss: (the library's loss, its loop reference), bound to one hyperparameter setting."""
    t, beta, tau = setting["temperature"], setting["beta"], setting["tau_plus"]
    on_device = Mixing(*(x.to(device) for x in mixing))
    k = mixing.j1.shape[1]
    cases: dict[str, tuple[Loss2, Loss2]] = {
        "nt_xent": (lambda a, c: nt_xent(a, c, temperature=t), lambda a, c: ref.reference_nt_xent(a, c, temperature=t)),
        "dcl": (
            lambda a, c: dcl_loss(a, c, temperature=t, tau_plus=tau),
            lambda a, c: ref.reference_loss(a, c, temperature=t, tau_plus=tau),
        ),
        "hcl": (
            lambda a, c: hcl_loss(a, c, temperature=t, beta=beta, tau_plus=tau),
            lambda a, c: ref.reference_loss(a, c, temperature=t, beta=beta, tau_plus=tau),
        ),
    }
    for mode in ("mix", "copy"):
        cases[f"sscl {mode}"] = (
            lambda a, c, mode=mode: sscl_loss(
                a, c, temperature=t, beta=beta, tau_plus=tau, n_hard=2, n_synthetic=k, mode=mode, mixing=on_device
            ),
            lambda a, c, mode=mode: ref.reference_loss(
                a, c, temperature=t, beta=beta, tau_plus=tau, mixing=mixing, mode=mode
            ),
        )
    return cases


def _reference_rows(ref: ModuleType, device: torch.device) -> list[Row]:
    """Each loss in float64 on the device against the loop reference on the CPU (an independent oracle)."""
    settings = [  # (B, hyperparameters): an even and an odd batch, mild and sharp settings
        (8, dict(temperature=0.5, beta=1.0, tau_plus=0.1)),
        (13, dict(temperature=0.1, beta=3.0, tau_plus=0.05)),
    ]
    found: dict[str, dict[str, float | str]] = {}  # loss -> setting -> max abs error, or the error text
    for index, (b, setting) in enumerate(settings):
        z1, z2 = _views(b, 8, seed=index)
        mixing = _random_mixing(b, k=5, seed=index + 1)
        key = f"B={b} t={setting['temperature']} beta={setting['beta']} tau_plus={setting['tau_plus']}"
        for name, (fn, reference) in _reference_cases(ref, setting, mixing, device).items():
            try:
                got = _value_and_grads(fn, z1.to(device), z2.to(device))
                want = _value_and_grads(reference, z1, z2)
                found.setdefault(name, {})[key] = max((x - y).abs().max().item() for x, y in zip(got, want))
            except Exception as exc:  # one broken loss must not hide the others
                found.setdefault(name, {})[key] = _error_text(exc)
    rows = []
    for name, by_setting in found.items():
        errors = [v for v in by_setting.values() if isinstance(v, float)]
        crashed = [f"{k}: {v}" for k, v in by_setting.items() if isinstance(v, str)]
        worst = max(errors, default=math.nan)
        if crashed:
            status = f"FAIL: {crashed[0]}"
        elif not worst <= TOLERANCE:  # also catches NaN
            status = f"FAIL: max abs error {worst:.3g} > {TOLERANCE:g}"
        else:
            status = "pass"
        rows.append(Row("correctness", f"{name} float64 vs loop reference (value, grads)", worst, "max abs err", status,
                        extra=by_setting))
    return rows


def _draw_rows(ref: ModuleType, device: torch.device) -> list[Row]:
    """The drawn parents of every anchor cover exactly its hard pool, and the draw is seeded."""
    rows = []
    for b, n_hard in ((16, 5), (64, 8)):  # 64: the CPU's blocked top-k path
        z1, z2 = _views(b, 16, seed=29)
        k = 40 * n_hard  # every pool member is drawn unless with probability < 1e-6
        draws = [
            draw_mixing(z1.to(device), z2.to(device), n_hard=n_hard, n_synthetic=k,
                        generator=torch.Generator(device=device).manual_seed(0))
            for _ in range(2)
        ]
        pools = ref.reference_pool(z1, z2, n_hard)
        j1, j2, alpha = (x.cpu() for x in draws[0])
        wrong = sum(set(j1[a].tolist()) | set(j2[a].tolist()) != pools[a] for a in range(2 * b))
        reproducible = all(torch.equal(x, y) for x, y in zip(draws[0], draws[1]))
        alpha_ok = bool(alpha.min() >= 0 and alpha.max() < 1)
        checks = {
            "not reproducible": not reproducible,
            "alpha outside [0, 1)": not alpha_ok,
            f"{wrong} anchors' parents differ from their pool": wrong > 0,
        }
        problems = [text for text, bad in checks.items() if bad]
        rows.append(Row("correctness", f"draw_mixing B={b} n_hard={n_hard} K={k}: parents = hard pool", float(wrong),
                        "anchors wrong", "pass" if not problems else "FAIL: " + "; ".join(problems)))
    return rows


# Hyperparameters each loss takes in the bf16 grid; the others stay at 0.
_GRID_LOSSES = {
    "nt_xent": ("temperature",),
    "dcl": ("temperature", "tau_plus"),
    "hcl": ("temperature", "beta", "tau_plus"),
    "sscl mix": ("temperature", "beta", "tau_plus"),
    "sscl copy": ("temperature", "beta", "tau_plus"),
}
_GRID = dict(temperature=(0.05, 0.2, 1.0), beta=(0.0, 1.0, 10.0), tau_plus=(0.0, 0.1, 0.49))


def _grid_loss(name: str, hyper: dict[str, float], mixing: Mixing) -> Loss2:
    if name == "nt_xent":
        return lambda a, c: nt_xent(a, c, temperature=hyper["temperature"])
    if name == "dcl":
        return lambda a, c: dcl_loss(a, c, temperature=hyper["temperature"], tau_plus=hyper["tau_plus"])
    if name == "hcl":
        return lambda a, c: hcl_loss(a, c, **hyper)
    mode = name.split()[1]
    return lambda a, c: sscl_loss(a, c, **hyper, n_hard=8, n_synthetic=mixing.j1.shape[1], mode=mode, mixing=mixing)


def _bf16_rows(device: torch.device) -> list[Row]:
    """Every loss under bf16 autocast over a grid of hyperparameters, views and input dtypes.

    Passes if no loss or gradient is NaN/inf; the largest relative deviation from the same loss in
    float64 is kept for information (bf16 inputs alone move it by about 1e-2).
    """
    b, d = 16, 16
    view_sets = {kind: _views(b, d, seed=23, kind=kind) for kind in ("random", "near", "collapsed")}
    # One recipe per view set, drawn from the hard pool in float64: every precision mixes the same parents.
    mixings = {}
    for kind, (z1, z2) in view_sets.items():
        drawn = draw_mixing(z1, z2, n_hard=8, n_synthetic=8, generator=torch.Generator().manual_seed(0))
        mixings[kind] = Mixing(*(x.to(device) for x in drawn))
    rows = []
    for name, keys in _GRID_LOSSES.items():
        failures, worst_rel, cases = [], 0.0, 0
        for kind, (z1, z2) in view_sets.items():
            for values in itertools.product(*(_GRID[k] for k in keys)):
                hyper = dict(temperature=1.0, beta=0.0, tau_plus=0.0) | dict(zip(keys, values))
                fn = _grid_loss(name, hyper, mixings[kind])
                setting = " ".join(f"{k}={v}" for k, v in zip(keys, values))
                try:
                    exact = _value_and_grads(fn, z1.to(device), z2.to(device))[0]
                except Exception as exc:  # recorded: the other cases still run
                    cases += 2
                    failures.append(f"{kind} float64 {setting}: {_error_text(exc)}")
                    continue
                for dtype in (torch.float32, torch.bfloat16):
                    cases += 1
                    label = f"{kind} {str(dtype).removeprefix('torch.')} {setting}"
                    try:
                        with torch.autocast(device.type, dtype=torch.bfloat16):
                            got = _value_and_grads(fn, z1.to(device, dtype), z2.to(device, dtype))
                    except Exception as exc:  # recorded: the other cases still run
                        failures.append(f"{label}: {_error_text(exc)}")
                        continue
                    if not all(bool(torch.isfinite(t).all()) for t in got):
                        failures.append(label)
                        continue
                    deviation = abs(got[0].double().item() - exact.item()) / max(abs(exact.item()), 1e-12)
                    worst_rel = max(worst_rel, deviation)
        status = "pass" if not failures else f"FAIL: non-finite in {len(failures)} cases, e.g. {failures[0]}"
        rows.append(Row("correctness", f"{name} bf16 autocast: loss and grads finite", float(len(failures)),
                        f"bad of {cases}", status, extra=dict(max_rel_dev_from_float64=worst_rel, failures=failures)))
    return rows


def _queue_inputs(b: int, q_size: int, d: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return q, k, F.normalize(torch.randn(q_size, d, generator=g, dtype=dtype), dim=1)


def _queue_rows(ref: ModuleType, device: torch.device) -> list[Row]:
    """``moco_loss`` in float64 on the device against its loop reference (value, grad w.r.t. q), and
    under bf16 autocast at sharp settings (finite loss and gradient)."""
    errors, bad, cases = [], [], 0
    for seed, (t, beta, tau, mode) in enumerate([(0.5, 1.0, 0.1, "mix"), (0.1, 3.0, 0.05, "copy")]):
        q, k, queue = _queue_inputs(6, 24, 8, seed, torch.float64)
        g = torch.Generator().manual_seed(seed + 1)
        mixing = Mixing(torch.randint(24, (6, 5), generator=g), torch.randint(24, (6, 5), generator=g),
                        torch.rand(6, 5, generator=g, dtype=torch.float64))
        hyper = dict(temperature=t, beta=beta, tau_plus=tau, mode=mode)

        def value_and_grad(loss_fn, q, k, queue):
            q = q.clone().requires_grad_(True)
            loss = loss_fn(q, k, queue)
            return [loss.detach().cpu(), torch.autograd.grad(loss, q)[0].cpu()]

        got = value_and_grad(lambda *a: moco_loss(*a, **hyper, n_hard=4, n_synthetic=5,
                                                  mixing=Mixing(*(x.to(device) for x in mixing))),
                             *(x.to(device) for x in (q, k, queue)))
        want = value_and_grad(lambda *a: ref.reference_moco(*a, **hyper, mixing=mixing), q, k, queue)
        errors.append(max((x - y).abs().max().item() for x, y in zip(got, want)))
    for t, beta in [(0.05, 10.0), (0.2, 1.0), (1.0, 0.0)]:
        cases += 1
        q, k, queue = (x.to(device, torch.bfloat16) for x in _queue_inputs(64, 4096, 128, 0, torch.float32))
        q.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = moco_loss(q, k, queue, temperature=t, beta=beta, tau_plus=0.1, n_hard=64, n_synthetic=32,
                             generator=torch.Generator(device=device).manual_seed(0))
        (grad,) = torch.autograd.grad(loss, q)
        if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
            bad.append(f"t={t} beta={beta}")
    worst = max(errors)
    return [
        Row("correctness", "moco_loss float64 vs loop reference (value, grad q)", worst, "max abs err",
            "pass" if worst <= TOLERANCE else f"FAIL: max abs error {worst:.3g} > {TOLERANCE:g}"),
        Row("correctness", "moco_loss bf16 autocast Q=4096: loss and grad finite", float(len(bad)), f"bad of {cases}",
            "pass" if not bad else f"FAIL: non-finite at {bad[0]}"),
    ]


def check_correctness(device: torch.device, plan: Plan) -> list[Row]:
    """Section 1: the losses on ``device`` against the loop reference, the drawn pool, bf16 stability.

    Args:
        device: where the losses run.
        plan: unused (the correctness sizes are the same in every plan); kept for a uniform signature.

    Returns:
        Rows whose status is "pass" or "FAIL: ...".
    """
    ref = _load_loss_reference()
    parts = {
        "losses vs loop reference": lambda: _reference_rows(ref, device),
        "draw_mixing vs sorted pool": lambda: _draw_rows(ref, device),
        "bf16 autocast grid": lambda: _bf16_rows(device),
        "moco_loss": lambda: _queue_rows(ref, device),
    }
    rows = []
    for part, run in parts.items():
        try:
            rows += run()
        except Exception as exc:  # a part that breaks down must not take the others' rows with it
            traceback.print_exc(file=sys.stderr)
            rows.append(Row("correctness", part, None, "", f"FAIL: {_error_text(exc)}"))
    return rows


# --------------------------------------------------------------------------- 2. loss timing


def _fwd_bwd(loss: Loss2, z1: torch.Tensor, z2: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        loss(z1, z2).backward()
        z1.grad = z2.grad = None

    return run


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
            z1 = F.normalize(torch.randn(b, plan.loss_dim, device=device, generator=g), dim=1).requires_grad_(True)
            z2 = F.normalize(torch.randn(b, plan.loss_dim, device=device, generator=g), dim=1).requires_grad_(True)
            hyper = HYPER | dict(n_hard=min(HYPER["n_hard"], 2 * b - 2))
            ms = _median_ms(
                {
                    "nt_xent": _fwd_bwd(lambda a, c: nt_xent(a, c, temperature=hyper["temperature"]), z1, z2),
                    "sscl": _fwd_bwd(lambda a, c: sscl_loss(a, c, **hyper, generator=g), z1, z2),
                },
                device,
                warmup=plan.loss_warmup,
                repeats=plan.loss_repeats,
            )
            sizes = f"B={b} D={plan.loss_dim}"
            sscl_case = f"sscl_loss {sizes} n_hard={hyper['n_hard']} K={hyper['n_synthetic']} fwd+bwd"
            rows += [
                Row("loss timing", f"nt_xent {sizes} fwd+bwd", ms["nt_xent"], "ms", "ok"),
                Row("loss timing", sscl_case, ms["sscl"], "ms", "ok"),
                Row("loss timing", f"sscl/nt_xent {sizes}", ms["sscl"] / ms["nt_xent"], "time ratio", "ok"),
            ]
        except Exception as exc:
            rows.append(Row("loss timing", f"B={b} D={plan.loss_dim}", None, "ms", f"error: {_error_text(exc)}"))
        _free_memory(device)
    for q_size in plan.queue_sizes:
        case = f"Q={q_size} queries={plan.queue_queries} D={plan.loss_dim}"
        try:
            q, k, queue = (x.to(device) for x in _queue_inputs(plan.queue_queries, q_size, plan.loss_dim, 0,
                                                              torch.float32))
            q.requires_grad_(True)
            g = torch.Generator(device=device).manual_seed(0)
            n_hard, n_synthetic = min(1024, q_size), 256
            infonce = get_loss("simclr", "moco", temperature=0.2)
            ms = _median_ms(
                {
                    "infonce": lambda: infonce(q, k, queue).backward(),
                    "moco": lambda: moco_loss(q, k, queue, temperature=0.2, beta=1.0, tau_plus=0.1, n_hard=n_hard,
                                              n_synthetic=n_synthetic, generator=g).backward(),
                },
                device,
                warmup=plan.loss_warmup,
                repeats=plan.loss_repeats,
            )
            rows += [
                Row("loss timing", f"InfoNCE {case} fwd+bwd", ms["infonce"], "ms", "ok"),
                Row("loss timing", f"moco_loss {case} n_hard={n_hard} K={n_synthetic} fwd+bwd", ms["moco"], "ms", "ok"),
                Row("loss timing", f"moco_loss/InfoNCE {case}", ms["moco"] / ms["infonce"], "time ratio", "ok"),
            ]
        except Exception as exc:
            rows.append(Row("loss timing", f"moco_loss {case}", None, "ms", f"error: {_error_text(exc)}"))
        _free_memory(device)
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
            ms = _median_ms({"views": lambda: augment.views(images)}, device,
                            warmup=plan.augment_warmup, repeats=plan.augment_repeats)["views"]
            rows.append(Row("augmentation", f"TwoViewAugment.views {case.name}", case.batch / ms * 1e3,
                            "img/s (2 views)", "ok", extra=dict(ms_per_batch=ms)))
        except Exception as exc:
            rows.append(Row("augmentation", f"TwoViewAugment.views {case.name}", None, "img/s (2 views)",
                            f"error: {_error_text(exc)}"))
        _free_memory(device)
    return rows


# --------------------------------------------------------------------------- 4. training step


def _timed_epoch(
    model: torch.nn.Module, runner: Callable[..., Any], batch: dict[str, torch.Tensor], loss_name: str,
    device: torch.device, plan: Plan, channels_last: bool,
) -> tuple[EpochResult, float]:
    """Warm-up steps, then ``plan.train_steps`` timed steps of ``train_one_epoch`` on one batch.

    ``runner`` is the model or its compiled wrapper; the optimiser is built on ``model``'s parameters
    (the same tensors). ``loss_name`` is a key of ``LOSSES``, or "moco sscl": SSCL on a queue of
    ``plan.queue_sizes[0]`` keys from a momentum copy of ``model``. Peak memory statistics are reset
    after the warm-up.

    Returns:
        The timed epoch's result and its duration in ms.
    """
    method, _, family = loss_name.rpartition(" ")
    moco = None
    if method == "moco":
        queue_size = plan.queue_sizes[0]
        moco = MomentumQueue(model, queue_size=queue_size, momentum=0.99, total_steps=1000, dim=PROJECTION_DIM,
                             seed=0)
        n_hard = min(HYPER["n_hard"], queue_size)
    else:
        n_hard = min(HYPER["n_hard"], 2 * batch["view1"].shape[0] - 2)
    loss_fn = get_loss(family, method or "simclr", **(HYPER | dict(n_hard=n_hard)))
    # SGD as built for training: fused kernels when the parameters are on a GPU.
    optimizer = build_optimizer(model, "sgd", lr=0.01)
    kwargs = dict(lr_schedule=lambda step: 0.01, device=device, amp=True, channels_last=channels_last, moco=moco)
    train_one_epoch(runner, [batch] * plan.train_warmup, loss_fn, optimizer, **kwargs)  # compiles, if compiled
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _timed_ms(lambda: train_one_epoch(runner, [batch] * plan.train_steps, loss_fn, optimizer, **kwargs), device)


def _step_model(case: TrainCase, options: StepOptions, device: torch.device, plan: Plan, bn_splits: int = 1
                ) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """The case's model on ``device`` (seeded), as ``options`` lay it out, and what runs it (compiled or not)."""
    torch.manual_seed(0)
    model = build_model(case.encoder, stem=case.stem, width=case.width, out_dim=PROJECTION_DIM,
                        bn_splits=bn_splits).to(device)
    if options.channels_last:  # as train.channels_last: the model here, the views inside train_one_epoch
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model, backend=plan.compile_backend) if options.compile else model


def _train_one_option_set(
    case: TrainCase, options: StepOptions, device: torch.device, plan: Plan, start: float
) -> list[Row]:
    """The training steps of SimCLR, SSCL and SSCL on a MoCo queue for one model and one set of step options."""
    section = "training step"
    label = f"{case.name}, {options.label}"
    if options.compile and plan.compile_backend != "inductor":
        label += f" ({plan.compile_backend} backend)"
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, 3, case.image_size, case.image_size)
    batch = {name: torch.randn(shape, generator=g).to(device) for name in ("view1", "view2")}
    rows, seconds = [], {}
    compile_error = None
    model, runner = _step_model(case, options, device, plan)
    for loss_name in TRAIN_LOSSES:
        case_name = f"{loss_name} {label}"
        if compile_error is not None:  # another attempt would spend the same compile time to fail again
            rows.append(Row(section, case_name, None, "img/s", f"skipped: compile failed above ({compile_error})"))
            continue
        if loss_name.startswith("moco"):
            if options.compile:
                rows.append(Row(section, case_name, None, "img/s", "skipped: its own model would need a second "
                                "compile, beyond the check's time"))
                continue
            model, runner = _step_model(case, options, device, plan, bn_splits=MOCO_BN_SPLITS)
        _log(f"training step: {case_name}", start)
        try:
            result, ms = _timed_epoch(model, runner, batch, loss_name, device, plan, options.channels_last)
            seconds[loss_name] = ms / 1e3
            extra = dict(ms_per_step=ms / plan.train_steps, loss=result.loss, steps=plan.train_steps,
                         train_one_epoch_images_per_second=result.images_per_second)
            images_per_second = case.batch * plan.train_steps / seconds[loss_name]
            rows.append(Row(section, case_name, images_per_second, "img/s", "ok", extra))
            if device.type == "cuda":
                rows.append(Row(section, f"{case_name}: peak mem", torch.cuda.max_memory_allocated(device) / 2**30,
                                "GiB", "ok"))
            else:
                rows.append(Row(section, f"{case_name}: peak mem", None, "GiB", "skipped: CUDA statistics only"))
        except Exception as exc:
            # A compile failure is a finding, not a crash: record its text and keep going.
            rows.append(Row(section, case_name, None, "img/s", f"error: {_error_text(exc)}"))
            traceback.print_exc(file=sys.stderr)
            if options.compile:
                compile_error = _error_text(exc)[:80]
        model.zero_grad(set_to_none=True)
        _free_memory(device)
    for loss_name in TRAIN_LOSSES[1:]:
        if loss_name in seconds and "simclr" in seconds:
            rows.append(Row(section, f"{loss_name}/simclr {label}", seconds[loss_name] / seconds["simclr"],
                            "step time ratio", "ok"))
    return rows


def time_training(device: torch.device, plan: Plan) -> list[Row]:
    """Section 4: images/s and peak memory of ``train_one_epoch`` (bf16 autocast) on synthetic views.

    Each model runs ``TRAIN_LOSSES`` under each of ``OPTION_SETS``; images count the batch (two
    views of ``batch`` images are ``batch`` images, as ``train_one_epoch`` counts). The compiled
    option set comes last, so that a run short of time drops it first.

    Args:
        device: the training device.
        plan: the models, step counts, compile backend and time budget.

    Returns:
        Per case: an images/s row and a peak-memory row; per model and option set, the step time
        ratios of SSCL and of SSCL on a MoCo queue to SimCLR. Cases that did not run carry "error: ..."
        or "skipped: ..." instead.
    """
    start = time.monotonic()
    rows = []
    for options in OPTION_SETS:
        for case in plan.train_cases:
            label = f"{case.name}, {options.label}"
            if options.compile and plan.compile_backend is None:
                rows.append(Row("training step", label, None, "img/s", "skipped: no compile backend in this plan"))
                continue
            if time.monotonic() - start > plan.train_budget_s:
                rows.append(Row("training step", label, None, "img/s",
                                f"skipped: the section's {plan.train_budget_s:.0f} s budget is spent"))
                continue
            try:
                rows += _train_one_option_set(case, options, device, plan, start)
            except Exception as exc:
                rows.append(Row("training step", label, None, "img/s", f"error: {_error_text(exc)}"))
                traceback.print_exc(file=sys.stderr)
            if options.compile:
                torch._dynamo.reset()  # drop the compiled graphs and their guards before the next model
            _free_memory(device)
    return rows


# --------------------------------------------------------------------------- 5. end to end


class _StoredFiles(torch.utils.data.Dataset):
    """The files' bytes as stored, or (``size``) decoded and resized by the pipeline's CPU decoder."""

    def __init__(self, paths: list[Path], size: int | None = None) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        data = self.paths[i].read_bytes()
        if self.size is None:
            return data, str(self.paths[i])
        from sscl.data.sources import decode_image

        return torch.from_numpy(decode_image(data, self.size, str(self.paths[i])).copy())


def _write_photos(folder: Path, case: EndToEndCase) -> list[Path]:
    """``case.images`` smooth random JPEGs (compressible like photos) of ``case.photo`` pixels."""
    from PIL import Image

    width, height = case.photo
    g = torch.Generator().manual_seed(0)
    across, down = torch.linspace(0, 1, width), torch.linspace(0, 1, height)
    paths = []
    for i in range(case.images):
        a, b, c = (torch.rand(3, generator=g) * 255, torch.rand(3, generator=g) * 256 - 128,
                   torch.rand(3, generator=g) * 256 - 128)
        img = a + b * down[:, None, None] + c * across[None, :, None] + torch.randn(height, width, 3, generator=g) * 8
        paths.append(folder / f"{i}.jpg")
        Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(paths[-1], quality=90)
    return paths


def time_end_to_end(device: torch.device, plan: Plan) -> list[Row]:
    """Section 5: JPEGs on disk to bf16 ResNet-50 steps (channels_last, SSCL), views made on the device.

    DataLoader workers read the files; the images are decoded (a) by those workers on the CPU (the
    pipeline's PIL decoder, ``data.decode=tasks``) or (b) on the device (``sscl.data.device_decode``,
    ``data.decode=device``). The step-only rate runs the same views and steps on images already on
    the device; each path's row gives its fraction of it. A truncated JPEG must be named by the
    device decoder as by the CPU one.

    Returns:
        The correctness row of the truncated file, then img/s of the step only and of each path.
    """
    import tempfile

    from sscl.data.device_decode import decode_batch
    from sscl.data.sources import CorruptDataError

    case, section = plan.e2e, "end to end"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = _write_photos(Path(folder), case)
        cut = paths[0].read_bytes()
        try:
            decode_batch([cut, cut[: len(cut) // 2]], ["whole.jpg", "cut.jpg"], size=case.image_size, device=device)
            status = "FAIL: a truncated JPEG was decoded without an error"
        except CorruptDataError as err:
            status = "pass" if "cut.jpg" in str(err) else f"FAIL: the error does not name the file: {err}"
        rows.append(Row(section, "device decoding names a truncated JPEG", None, "check", status))
        augment = TwoViewAugment(crop_size=case.crop_size, blur_p=0.5, seed=0).views
        torch.manual_seed(0)
        model = build_model("resnet50", stem="imagenet", width=case.width, out_dim=PROJECTION_DIM).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, "sgd", lr=0.01)
        loss_fn = get_loss("sscl", **(HYPER | dict(n_hard=min(HYPER["n_hard"], 2 * case.batch - 2))))
        pin = device.type == "cuda"

        def on_cpu():
            loader = torch.utils.data.DataLoader(_StoredFiles(paths, case.image_size), batch_size=case.batch,
                                                 num_workers=case.loader_workers, drop_last=True, pin_memory=pin)
            return ({"image": images.to(device, non_blocking=True)} for images in loader)

        def on_device():
            loader = torch.utils.data.DataLoader(_StoredFiles(paths), batch_size=case.batch, drop_last=True,
                                                 num_workers=case.loader_workers, collate_fn=lambda b: list(zip(*b)))
            return ({"image": decode_batch(data, where, size=case.image_size, device=device)[0]}
                    for data, where in loader)

        steps = case.images // case.batch
        resident = torch.randint(0, 256, (case.batch, case.image_size, case.image_size, 3), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        step_only = "step only (images on the device)"
        runs = {step_only: lambda: [{"image": resident}] * steps,
                f"decoded by {case.loader_workers} DataLoader workers on the CPU": on_cpu,
                "bytes from the workers, decoded on the device": on_device}
        rates = {}
        for name, batches in runs.items():
            try:
                for _ in range(case.epochs):  # the last is timed: the first warms cuDNN, the allocator, the workers
                    result, ms = _timed_ms(lambda: train_one_epoch(
                        model, batches(), loss_fn, optimizer, lr_schedule=lambda step: 0.01, device=device,
                        amp=True, channels_last=True, augment=augment), device)
                rates[name] = steps * case.batch / ms * 1e3
                rows.append(Row(section, f"{name}: {case.photo[0]}x{case.photo[1]} JPEG -> {case.image_size} -> 2 "
                                f"views {case.crop_size}, resnet50 w{case.width:g} b{case.batch} bf16 channels_last",
                                rates[name], "img/s", "ok", dict(ms_per_epoch=ms, loss=result.loss, steps=steps)))
            except Exception as exc:
                rows.append(Row(section, name, None, "img/s", f"error: {_error_text(exc)}"))
                traceback.print_exc(file=sys.stderr)
            _free_memory(device)
        for name, rate in rates.items():
            if name != step_only and step_only in rates:
                rows.append(Row(section, f"{name} / step only", rate / rates[step_only], "rate ratio", "ok"))
    return rows


# --------------------------------------------------------------------------- report


SECTION_RUNNERS: dict[str, Callable[[torch.device, Plan], list[Row]]] = {
    "correctness": check_correctness,
    "loss timing": time_losses,
    "augmentation": time_augmentation,
    "training step": time_training,
    "end to end": time_end_to_end,
}


def _format_figure(row: Row) -> str:
    x = row.figure
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if row.unit in ("max abs err",) or (x != 0 and abs(x) < 1e-2):
        return f"{x:.2e}"
    if x.is_integer() and row.unit not in ("ms", "time ratio", "step time ratio"):  # counts
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    """One aligned text table: section, case, figure, unit, status (long statuses are cut).

    Args:
        rows: the report's rows.

    Returns:
        The table, header first, without a trailing newline.
    """
    header = ("section", "case", "figure", "unit", "status")
    cells = [(r.section, r.case, _format_figure(r), r.unit, r.status[:100]) for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = []
    for line in [header, *cells]:
        parts = [text.rjust(w) if i == 2 else text.ljust(w) for i, (text, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _environment(device: torch.device, quick: bool) -> dict[str, Any]:
    env = dict(device=str(device), quick=quick, python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, threads=torch.get_num_threads())
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _json_safe(value: Any) -> Any:
    # NaN and infinities are not JSON: they become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


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
        _log(f"{section} ...", start)
        try:
            section_rows = runner(device, plan)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            status = f"{'FAIL' if section == 'correctness' else 'error'}: {_error_text(exc)}"
            section_rows = [Row(section, "section aborted", None, "", status)]
        rows += section_rows
        bad = sum(r.status.startswith(("FAIL", "error")) for r in section_rows)
        _log(f"{section}: {len(section_rows)} rows, {bad} failed", start)
        _free_memory(device)
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
    _log(f"{env}", start)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[Row]) -> None:
        # Rewritten after every section: a run cut short by its time limit still leaves its rows.
        env["wall_s"] = round(time.monotonic() - start, 1)
        report = dict(environment=env, rows=[asdict(r) for r in rows])
        args.out.write_text(json.dumps(_json_safe(report), indent=2) + "\n")

    rows = run_check(device, QUICK if args.quick else FULL, start, on_section=save)
    print(format_table(rows))
    failed = correctness_failed(rows)
    print(f"{'FAILED' if failed else 'passed'}: correctness; {env['wall_s']} s on {env.get('device_name', device)}; "
          f"rows in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
