"""Loss correctness on one device (and a registered encoder's pt2 archive loaded there), in torch alone: the check bodies that ``tests/sscl/losses/test_device_losses.py``
(pytest, on the CPU and on a GPU when there is one) and ``pipelines/bench/gpu_check.py`` (a lent GPU
machine with PyTorch and maybe nothing else, not even pytest) both import.

The library's losses run on ``device`` and are compared with the loop reference of
``loss_reference.py`` on the CPU (an independent oracle) in float64; the bf16 checks run a grid of sharp
settings and nearly identical or collapsed views under autocast and collect what is not finite.
Nothing here asserts: each function returns what it found and its caller judges it (a test asserts,
the GPU check writes a row), so that one failing loss does not hide the others in the GPU check.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from loss_reference import reference_loss, reference_moco, reference_nt_xent, reference_pool
from pipelines.bench.harness import Loss2, error_text
from sscl.losses import Mixing, dcl_loss, draw_mixing, hcl_loss, moco_loss, nt_xent, sscl_loss

TOLERANCE = 1e-10  # max abs error of value and gradients in float64, as in tests/sscl/losses/test_losses.py
LOSSES = ("nt_xent", "dcl", "hcl", "sscl mix", "sscl copy")
# (B, hyperparameters): an even and an odd batch, mild and sharp settings.
REFERENCE_SETTINGS = (
    (8, dict(temperature=0.5, beta=1.0, tau_plus=0.1)),
    (13, dict(temperature=0.1, beta=3.0, tau_plus=0.05)),
)
DRAW_SETTINGS = ((16, 5), (64, 8))  # (B, n_hard); 64 takes the CPU's blocked top-k path
# The hyperparameters each loss takes in the bf16 grid; the others stay at temperature 1, beta and tau_plus 0.
GRID_KEYS = {
    "nt_xent": ("temperature",),
    "dcl": ("temperature", "tau_plus"),
    "hcl": ("temperature", "beta", "tau_plus"),
    "sscl mix": ("temperature", "beta", "tau_plus"),
    "sscl copy": ("temperature", "beta", "tau_plus"),
}
GRID = dict(temperature=(0.05, 0.2, 1.0), beta=(0.0, 1.0, 10.0), tau_plus=(0.0, 0.1, 0.49))
VIEW_KINDS = ("random", "near", "collapsed")


def views(b: int, d: int, *, seed: int, kind: str = "random", dtype: torch.dtype = torch.float64
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded unit rows (B, D) on the CPU.

    Args:
        b, d: rows and their dimension.
        seed: the generator's seed.
        kind: "random" (correlated views, as in training), "near" (z2 within 1e-3 of z1) or "collapsed"
            (every row within 1e-3 of one direction).
        dtype: of the returned rows (drawn in float64).

    Returns:
        z1, z2: (B, D) each, L2-normalised.
    """
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


def random_mixing(rows: int, parents: int, k: int, seed: int) -> Mixing:
    """Arbitrary parents (not only a hard pool: the formula must hold for any recipe), each (rows, K)."""
    g = torch.Generator().manual_seed(seed)
    j1 = torch.randint(parents, (rows, k), generator=g)
    j2 = torch.randint(parents, (rows, k), generator=g)
    return Mixing(j1, j2, torch.rand(rows, k, generator=g, dtype=torch.float64))


def value_and_grads(loss: Loss2, z1: torch.Tensor, z2: torch.Tensor) -> list[torch.Tensor]:
    """``[loss, dloss/dz1, dloss/dz2]`` on the CPU, for leaves made from copies of z1, z2."""
    a, c = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    value = loss(a, c)
    g1, g2 = torch.autograd.grad(value, (a, c))
    return [t.detach().cpu() for t in (value, g1, g2)]


def library_loss(name: str, hyper: dict[str, float], mixing: Mixing) -> Loss2:
    """The library's loss ``name`` (a key of ``GRID_KEYS``) bound to ``hyper`` and, for SSCL, ``mixing``."""
    t, beta, tau = hyper["temperature"], hyper["beta"], hyper["tau_plus"]
    if name == "nt_xent":
        return lambda a, c: nt_xent(a, c, temperature=t)
    if name == "dcl":
        return lambda a, c: dcl_loss(a, c, temperature=t, tau_plus=tau)
    if name == "hcl":
        return lambda a, c: hcl_loss(a, c, temperature=t, beta=beta, tau_plus=tau)
    mode = name.split()[1]
    return lambda a, c: sscl_loss(a, c, temperature=t, beta=beta, tau_plus=tau, n_hard=2,
                                  n_synthetic=mixing.j1.shape[1], mode=mode, mixing=mixing)


def _reference(name: str, hyper: dict[str, float], mixing: Mixing) -> Loss2:
    if name == "nt_xent":
        return lambda a, c: reference_nt_xent(a, c, temperature=hyper["temperature"])
    if name == "dcl":
        return lambda a, c: reference_loss(a, c, temperature=hyper["temperature"], tau_plus=hyper["tau_plus"])
    if name == "hcl":
        return lambda a, c: reference_loss(a, c, **hyper)
    return lambda a, c: reference_loss(a, c, **hyper, mixing=mixing, mode=name.split()[1])


def reference_errors(name: str, device: torch.device) -> dict[str, float]:
    """Loss ``name`` in float64 on ``device`` against its loop reference on the CPU.

    Args:
        name: one of ``LOSSES``.
        device: where the library's loss runs.

    Returns:
        Per setting of ``REFERENCE_SETTINGS`` (``"B=8 t=0.5 beta=1.0 tau_plus=0.1"``): the max abs error
        over the value and the gradients w.r.t. z1 and z2 (NaN stays NaN).
    """
    found = {}
    for index, (b, hyper) in enumerate(REFERENCE_SETTINGS):
        z1, z2 = views(b, 8, seed=index)
        mixing = random_mixing(2 * b, 2 * b, k=5, seed=index + 1)
        on_device = Mixing(*(x.to(device) for x in mixing))
        got = value_and_grads(library_loss(name, hyper, on_device), z1.to(device), z2.to(device))
        want = value_and_grads(_reference(name, hyper, mixing), z1, z2)
        key = f"B={b} t={hyper['temperature']} beta={hyper['beta']} tau_plus={hyper['tau_plus']}"
        found[key] = max((x - y).abs().max().item() for x, y in zip(got, want))
    return found


def draw_problems(b: int, n_hard: int, device: torch.device) -> tuple[int, list[str]]:
    """Whether ``draw_mixing`` on ``device`` draws every anchor's parents from exactly its hard pool
    (found by sorting a Python list), with alpha in [0, 1), reproducibly from a seed.

    Args:
        b: the batch (2B anchors, D = 16).
        n_hard: the pool's size; K = 40 n_hard, so that every member is drawn unless with
            probability < 1e-6.
        device: where the draw runs.

    Returns:
        The number of anchors whose parents differ from their pool, and each problem found (none: pass).
    """
    z1, z2 = views(b, 16, seed=29)
    draws = [draw_mixing(z1.to(device), z2.to(device), n_hard=n_hard, n_synthetic=40 * n_hard,
                         generator=torch.Generator(device=device).manual_seed(0)) for _ in range(2)]
    pools = reference_pool(z1, z2, n_hard)
    j1, j2, alpha = (x.cpu() for x in draws[0])
    wrong = sum(set(j1[a].tolist()) | set(j2[a].tolist()) != pools[a] for a in range(2 * b))
    checks = {
        "not reproducible": not all(torch.equal(x, y) for x, y in zip(draws[0], draws[1])),
        "alpha outside [0, 1)": not bool(alpha.min() >= 0 and alpha.max() < 1),
        f"{wrong} anchors' parents differ from their pool": wrong > 0,
    }
    return wrong, [text for text, bad in checks.items() if bad]


def bf16_failures(name: str, device: torch.device) -> tuple[list[str], int, float]:
    """Loss ``name`` under bf16 autocast over ``GRID``, the view kinds, float32 and bf16 inputs.

    A case fails if its loss or a gradient is NaN/inf, or if it raises. The largest relative deviation
    from the same loss in float64 is returned for information (bf16 inputs alone move it by about 1e-2).

    Args:
        name: one of ``LOSSES``.
        device: where the losses run.

    Returns:
        The failed cases (each named by views, dtype and setting), the number of cases, and the
        largest relative deviation of a finite case.
    """
    b, d = 16, 16
    failures, worst_rel, cases = [], 0.0, 0
    keys = GRID_KEYS[name]
    for kind in VIEW_KINDS:
        z1, z2 = views(b, d, seed=23, kind=kind)
        # One recipe per view set, drawn from the hard pool in float64: every precision mixes the same parents.
        drawn = draw_mixing(z1, z2, n_hard=8, n_synthetic=8, generator=torch.Generator().manual_seed(0))
        mixing = Mixing(*(x.to(device) for x in drawn))
        for values in itertools.product(*(GRID[k] for k in keys)):
            fn = library_loss(name, dict(temperature=1.0, beta=0.0, tau_plus=0.0) | dict(zip(keys, values)), mixing)
            setting = " ".join(f"{k}={v}" for k, v in zip(keys, values))
            try:
                exact = value_and_grads(fn, z1.to(device), z2.to(device))[0]
            except Exception as exc:  # recorded: the other cases still run
                cases += 2
                failures.append(f"{kind} float64 {setting}: {error_text(exc)}")
                continue
            for dtype in (torch.float32, torch.bfloat16):
                cases += 1
                label = f"{kind} {str(dtype).removeprefix('torch.')} {setting}"
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        got = value_and_grads(fn, z1.to(device, dtype), z2.to(device, dtype))
                except Exception as exc:  # recorded: the other cases still run
                    failures.append(f"{label}: {error_text(exc)}")
                    continue
                if not all(bool(torch.isfinite(t).all()) for t in got):
                    failures.append(label)
                    continue
                deviation = abs(got[0].double().item() - exact.item()) / max(abs(exact.item()), 1e-12)
                worst_rel = max(worst_rel, deviation)
    return failures, cases, worst_rel


def queue_inputs(b: int, q_size: int, d: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded unit rows on the CPU: queries q (B, D), their keys k (B, D) near them, a queue (Q, D)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return q, k, F.normalize(torch.randn(q_size, d, generator=g, dtype=dtype), dim=1)


def moco_reference_error(device: torch.device) -> float:
    """``moco_loss`` in float64 on ``device`` against its loop reference: the max abs error of the value
    and the gradient w.r.t. q over two settings (B = 6, Q = 24, K = 5; mix and copy)."""

    def value_and_grad(loss_fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                       queue: torch.Tensor) -> list[torch.Tensor]:
        q = q.clone().requires_grad_(True)
        loss = loss_fn(q, k, queue)
        return [loss.detach().cpu(), torch.autograd.grad(loss, q)[0].cpu()]

    errors = []
    for seed, (t, beta, tau, mode) in enumerate([(0.5, 1.0, 0.1, "mix"), (0.1, 3.0, 0.05, "copy")]):
        q, k, queue = queue_inputs(6, 24, 8, seed, torch.float64)
        mixing = random_mixing(6, 24, k=5, seed=seed + 1)
        hyper = dict(temperature=t, beta=beta, tau_plus=tau, mode=mode)
        on_device = Mixing(*(x.to(device) for x in mixing))
        got = value_and_grad(lambda *a: moco_loss(*a, **hyper, n_hard=4, n_synthetic=5, mixing=on_device),
                             *(x.to(device) for x in (q, k, queue)))
        want = value_and_grad(lambda *a: reference_moco(*a, **hyper, mixing=mixing), q, k, queue)
        errors.append(max((x - y).abs().max().item() for x, y in zip(got, want)))
    return max(errors)


def moco_bf16_failures(device: torch.device) -> tuple[list[str], int]:
    """``moco_loss`` under bf16 autocast on a Q = 4096 queue at sharp and mild settings.

    Returns:
        The settings whose loss or gradient w.r.t. q is NaN/inf, and the number of settings.
    """
    settings = [(0.05, 10.0), (0.2, 1.0), (1.0, 0.0)]  # (temperature, beta)
    bad = []
    for t, beta in settings:
        q, k, queue = (x.to(device, torch.bfloat16) for x in queue_inputs(64, 4096, 128, 0, torch.float32))
        q.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = moco_loss(q, k, queue, temperature=t, beta=beta, tau_plus=0.1, n_hard=64, n_synthetic=32,
                             generator=torch.Generator(device=device).manual_seed(0))
        (grad,) = torch.autograd.grad(loss, q)
        if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
            bad.append(f"t={t} beta={beta}")
    return bad, len(settings)


# The embedding job's and evaluation's encoder: a registered pt2 archive loaded on the device.
ENCODER_TOLERANCE = 1e-4  # float32 features of the same images, on the CPU and on the device


def encoder_archive_error(device: torch.device) -> float:
    """Max abs difference between a small ResNet-18's features from its pt2 archive on ``device``
    (``sscl.model_registry.program_module``, exported with a dynamic batch as registration does) and
    the module itself on the CPU, on a batch of another size than the one traced."""
    import io

    from sscl.evaluate import extract_features
    from sscl.model_registry import program_module
    from sscl.models import build_model
    from sscl.tracking import EncoderForExport

    torch.manual_seed(0)
    encoder = EncoderForExport(build_model("resnet18", stem="cifar", width=0.125).encoder).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(encoder, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    archive = io.BytesIO()
    torch.export.save(program, archive)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    batches = [{"image": images, "label": torch.zeros(5, dtype=torch.long)}]
    on_device, _ = extract_features(program_module(archive.getvalue()).to(device), batches, device=device)
    on_cpu, _ = extract_features(encoder, batches, device="cpu")
    return float((on_device.cpu() - on_cpu).abs().max())
