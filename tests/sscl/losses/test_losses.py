"""Losses against the loop reference, their exact reductions, stability and input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference import reference_loss, reference_nt_xent, reference_pool
from sscl.losses import (LossDiagnostics, Mixing, dcl_loss, draw_mixing, get_loss, hcl_loss, negative_similarities,
                         nt_xent, sscl_loss)

TOL = dict(rtol=1e-10, atol=1e-10)


def views(b: int, d: int = 8, seed: int = 0, dtype=torch.float64, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    # Correlated second view so positives are more similar than negatives, as in training.
    z2 = F.normalize(z1 + 0.5 * torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return z1.requires_grad_(requires_grad), z2.requires_grad_(requires_grad)


def value_and_grads(fn, z1, z2):
    loss = fn(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    return loss.detach(), g1, g2


def assert_same(fn_a, fn_b, z1, z2):
    la, *ga = value_and_grads(fn_a, z1, z2)
    lb, *gb = value_and_grads(fn_b, z1, z2)
    torch.testing.assert_close(la, lb, **TOL)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **TOL)


def random_mixing(b: int, k: int, seed: int = 1) -> Mixing:
    # Arbitrary parents (not only the hard pool): the formula must hold for any recipe.
    g = torch.Generator().manual_seed(seed)
    two_b = 2 * b
    j1 = torch.randint(two_b, (two_b, k), generator=g)
    j2 = torch.randint(two_b, (two_b, k), generator=g)
    return Mixing(j1, j2, torch.rand(two_b, k, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("b", [2, 3, 8])
@pytest.mark.parametrize("mode", ["mix", "copy"])
@pytest.mark.parametrize("temperature,beta,tau_plus", [(0.5, 1.0, 0.1), (0.1, 3.0, 0.05), (1.0, 0.0, 0.0)])
def test_sscl_matches_loop_reference(b, mode, temperature, beta, tau_plus):
    z1, z2 = views(b)
    mixing = random_mixing(b, k=5)
    hyper = dict(temperature=temperature, beta=beta, tau_plus=tau_plus)
    assert_same(
        lambda a, c: sscl_loss(a, c, **hyper, n_hard=2, n_synthetic=5, mode=mode, mixing=mixing),
        lambda a, c: reference_loss(a, c, **hyper, mixing=mixing, mode=mode),
        z1,
        z2,
    )


@pytest.mark.parametrize("b", [2, 5])
@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (0.0, 0.2), (2.0, 0.1)])
def test_hcl_dcl_nt_xent_match_loop_references(b, beta, tau_plus):
    z1, z2 = views(b, seed=3)
    assert_same(
        lambda a, c: hcl_loss(a, c, temperature=0.3, beta=beta, tau_plus=tau_plus),
        lambda a, c: reference_loss(a, c, temperature=0.3, beta=beta, tau_plus=tau_plus),
        z1,
        z2,
    )
    assert_same(
        lambda a, c: dcl_loss(a, c, temperature=0.3, tau_plus=tau_plus),
        lambda a, c: reference_loss(a, c, temperature=0.3, tau_plus=tau_plus),
        z1,
        z2,
    )
    assert_same(
        lambda a, c: nt_xent(a, c, temperature=0.3),
        lambda a, c: reference_nt_xent(a, c, temperature=0.3),
        z1,
        z2,
    )


def test_floor_binds_and_matches_reference():
    # tau_plus close to 1 with aligned views drives R - tau N pos below the floor.
    z1, z2 = views(4, seed=5)
    z2 = F.normalize(z1.detach() + 1e-3, dim=1).requires_grad_(True)
    hyper = dict(temperature=0.5, beta=0.5, tau_plus=0.9)
    assert_same(lambda a, c: hcl_loss(a, c, **hyper), lambda a, c: reference_loss(a, c, **hyper), z1, z2)


def test_reductions_hold_exactly():
    z1, z2 = views(6, seed=7)
    t = 0.4
    mixing = random_mixing(6, k=4)
    # K = 0 -> HCL
    assert_same(
        lambda a, c: sscl_loss(a, c, temperature=t, beta=1.5, tau_plus=0.1, n_hard=4, n_synthetic=0),
        lambda a, c: hcl_loss(a, c, temperature=t, beta=1.5, tau_plus=0.1),
        z1,
        z2,
    )
    # K = 0, beta = 0 -> DCL
    assert_same(
        lambda a, c: sscl_loss(a, c, temperature=t, beta=0.0, tau_plus=0.1, n_hard=4, n_synthetic=0),
        lambda a, c: dcl_loss(a, c, temperature=t, tau_plus=0.1),
        z1,
        z2,
    )
    # K = 0, beta = 0, tau_plus = 0 -> NT-Xent
    assert_same(
        lambda a, c: sscl_loss(a, c, temperature=t, beta=0.0, tau_plus=0.0, n_hard=4, n_synthetic=0),
        lambda a, c: nt_xent(a, c, temperature=t),
        z1,
        z2,
    )

    # copy, beta = 0, tau_plus = 0 -> InfoNCE whose denominator also holds the K copies.
    def info_nce_with_copies(a, c):
        z = torch.cat([a, c])
        n = z.shape[0]
        logits = z @ z.T / t
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
        copies = (z[:, None, :] * z.detach()[mixing.j1]).sum(-1) / t  # (2B, K)
        all_logits = torch.cat([logits, copies], dim=1)
        target = (torch.arange(n) + n // 2) % n
        return F.cross_entropy(all_logits, target)

    assert_same(
        lambda a, c: sscl_loss(a, c, temperature=t, beta=0.0, tau_plus=0.0, n_hard=4, n_synthetic=4, mode="copy", mixing=mixing),
        info_nce_with_copies,
        z1,
        z2,
    )
    # mix with alpha = 1, or with j2 = j1 -> copy
    hyper = dict(temperature=t, beta=1.0, tau_plus=0.05, n_hard=4, n_synthetic=4)
    copy = lambda a, c: sscl_loss(a, c, **hyper, mode="copy", mixing=mixing)  # noqa: E731
    alpha_one = Mixing(mixing.j1, mixing.j2, torch.ones_like(mixing.alpha))
    same_parent = Mixing(mixing.j1, mixing.j1, mixing.alpha)
    assert_same(lambda a, c: sscl_loss(a, c, **hyper, mode="mix", mixing=alpha_one), copy, z1, z2)
    assert_same(lambda a, c: sscl_loss(a, c, **hyper, mode="mix", mixing=same_parent), copy, z1, z2)


@pytest.mark.parametrize("mode", ["mix", "copy"])
def test_symmetric_under_swapping_views(mode):
    b = 5
    z1, z2 = views(b, seed=11)
    mixing = random_mixing(b, k=3)
    swap = lambda idx: (idx + b) % (2 * b)  # noqa: E731  row a of [z1; z2] is row a+B of [z2; z1]
    order = swap(torch.arange(2 * b))
    swapped = Mixing(swap(mixing.j1)[order], swap(mixing.j2)[order], mixing.alpha[order])
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=3, n_synthetic=3, mode=mode)
    forward = sscl_loss(z1, z2, **hyper, mixing=mixing, reduction="none")
    backward = sscl_loss(z2, z1, **hyper, mixing=swapped, reduction="none")
    torch.testing.assert_close(forward, backward[order], **TOL)


def test_drawn_mixing_is_reproducible_and_from_the_hard_pool():
    b, n_hard, k = 16, 5, 7
    z1, z2 = views(b, d=16, seed=13)
    draw = draw_mixing(z1, z2, n_hard=n_hard, n_synthetic=k, generator=torch.Generator().manual_seed(0))
    again = draw_mixing(z1, z2, n_hard=n_hard, n_synthetic=k, generator=torch.Generator().manual_seed(0))
    for x, y in zip(draw, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    pools = reference_pool(z1, z2, n_hard)
    for a in range(2 * b):
        assert set(draw.j1[a].tolist()) <= pools[a] and set(draw.j2[a].tolist()) <= pools[a]
    assert draw.alpha.min() >= 0 and draw.alpha.max() < 1
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=n_hard, n_synthetic=k)
    drawn_inside = sscl_loss(z1, z2, **hyper, generator=torch.Generator().manual_seed(0))
    explicit = sscl_loss(z1, z2, **hyper, mixing=draw)
    torch.testing.assert_close(drawn_inside, explicit, **TOL)
    other_seed = sscl_loss(z1, z2, **hyper, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(drawn_inside, other_seed)


def clustered_views(b: int, d: int, small: int, seed: int = 0):
    # Two antipodal clusters, one of `small` images: their rows have few positive similarities.
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    sign = torch.ones(b, 1, dtype=torch.float64)
    sign[:small] = -1.0
    z1 = F.normalize(sign * centre + 0.2 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(sign * centre + 0.2 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return z1, z2


@pytest.mark.parametrize(
    "case,b,d,n_hard",
    [
        ("small batch", 16, 16, 5),
        ("larger batch", 64, 16, 8),
        ("odd batch", 51, 16, 8),
        ("every real negative", 8, 16, 14),  # n_hard = 2B - 2
        ("few positive similarities", 16, 2, 20),  # on a circle about half the similarities are < 0
        ("clustered, few positive similarities", 64, 16, 8),  # clustered below
    ],
)
def test_drawn_pool_is_exactly_the_hardest_negatives(case, b, d, n_hard):
    z1, z2 = clustered_views(b, d, small=3) if case.startswith("clustered") else views(b, d=d, seed=29)
    k = 40 * n_hard  # enough draws to see every pool member (a miss has probability < 1e-6)
    draw = draw_mixing(z1, z2, n_hard=n_hard, n_synthetic=k, generator=torch.Generator().manual_seed(0))
    pools = reference_pool(z1, z2, n_hard)
    for a in range(2 * b):
        assert set(draw.j1[a].tolist()) | set(draw.j2[a].tolist()) == pools[a], f"anchor {a}"


@pytest.mark.parametrize(
    "temperature,beta,tau_plus", list(itertools.product([0.05, 0.2, 1.0], [0.0, 1.0, 10.0], [0.0, 0.1, 0.49]))
)
def test_stable_in_float32(temperature, beta, tau_plus):
    z1, z2 = views(64, d=32, seed=19, dtype=torch.float32)
    loss = sscl_loss(z1, z2, temperature=temperature, beta=beta, tau_plus=tau_plus, n_hard=16, n_synthetic=8)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()


@pytest.mark.parametrize("temperature,beta", [(0.05, 10.0), (0.5, 1.0), (1.0, 0.0)])
def test_stable_under_bf16_autocast(temperature, beta):
    z1, z2 = views(32, d=16, seed=23, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sscl_loss(z1, z2, temperature=temperature, beta=beta, tau_plus=0.1, n_hard=8, n_synthetic=8,
                         generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    exact = sscl_loss(z1.double(), z2.double(), temperature=temperature, beta=beta, tau_plus=0.1, n_hard=8,
                      n_synthetic=8, generator=torch.Generator().manual_seed(0))
    assert abs(loss.item() - exact.item()) / exact.item() < 0.05  # bf16 matmul, otherwise float32


def debiased_by_hand(z1, z2, *, temperature, beta, tau_plus, mixing=None):
    """Per anchor: (R - tau_plus N pos) / (1 - tau_plus) and the floor N exp(-1/t), by loops."""
    z = torch.cat([z1, z2]).detach()
    two_b, t = z.shape[0], temperature
    out = []
    for a in range(two_b):
        p = (a + two_b // 2) % two_b
        sims = [float(z[a] @ z[v]) for v in range(two_b) if v not in (a, p)]
        if mixing is not None:
            for j1, j2, al in zip(mixing.j1[a].tolist(), mixing.j2[a].tolist(), mixing.alpha[a].tolist()):
                h = al * z[j1] + (1 - al) * z[j2]
                sims.append(float(z[a] @ (h / h.norm())))
        n = len(sims)
        r = n * sum(math.exp((1 + beta) * s / t) for s in sims) / sum(math.exp(beta * s / t) for s in sims)
        pos = math.exp(float(z[a] @ z[p]) / t)
        out.append(((r - tau_plus * n * pos) / (1 - tau_plus), n * math.exp(-1 / t)))
    return out


def hardest_real_by_hand(z1, z2):
    z = torch.cat([z1, z2]).detach()
    two_b = z.shape[0]
    hardest = [max(float(z[a] @ z[v]) for v in range(two_b) if v not in (a, (a + two_b // 2) % two_b))
               for a in range(two_b)]
    return sum(hardest) / two_b


def test_diagnostics_floor_fraction_is_the_anchors_on_the_floor():
    # Images 0-2: identical views, so pos = e^{1/t} dwarfs the negatives and tau_plus N pos > R: the
    # floor binds. Images 3-5: opposite views, pos = e^{-1/t} is the smallest possible: it cannot.
    b, t, tau_plus = 6, 0.1, 0.5
    z1, _ = views(b, d=16, seed=31)
    z2 = torch.cat([z1[:3], -z1[3:]]).detach().requires_grad_(True)
    for beta in (0.0, 1.0):
        by_hand = debiased_by_hand(z1, z2, temperature=t, beta=beta, tau_plus=tau_plus)
        on_floor = [debiased <= floor for debiased, floor in by_hand]
        assert on_floor == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
        loss, diag = hcl_loss(z1, z2, temperature=t, beta=beta, tau_plus=tau_plus, return_diagnostics=True)
        assert diag.floor_fraction.item() == 0.5
        torch.testing.assert_close(loss, hcl_loss(z1, z2, temperature=t, beta=beta, tau_plus=tau_plus), **TOL)
    assert dcl_loss(z1, z2, temperature=t, tau_plus=tau_plus, return_diagnostics=True)[1].floor_fraction.item() == 0.5
    # Without debiasing, R >= N e^{-1/t} always: nothing sits on the floor.
    assert hcl_loss(z1, z2, temperature=t, beta=1.0, tau_plus=0.0, return_diagnostics=True)[1].floor_fraction == 0


@pytest.mark.parametrize("tau_plus", [0.1, 0.6, 0.9])
def test_diagnostics_floor_fraction_matches_the_formula(tau_plus):
    b, k = 8, 5
    z1, z2 = views(b, d=4, seed=37)
    mixing = random_mixing(b, k=k)
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=tau_plus)
    by_hand = debiased_by_hand(z1, z2, **hyper, mixing=mixing)
    expected = sum(debiased <= floor for debiased, floor in by_hand) / (2 * b)
    _, diag = sscl_loss(z1, z2, **hyper, n_hard=4, n_synthetic=k, mixing=mixing, return_diagnostics=True)
    assert diag.floor_fraction.item() == expected
    if tau_plus == 0.9:
        assert 0 < expected < 1  # the floor binds for some anchors and not for others


def test_diagnostics_hardest_real_and_synthetic_mean_by_hand():
    b, k = 7, 3
    z1, z2 = views(b, seed=41)
    mixing = random_mixing(b, k=k)
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=4, n_synthetic=k)
    loss, diag = sscl_loss(z1, z2, **hyper, mixing=mixing, return_diagnostics=True)
    assert isinstance(diag, LossDiagnostics) and not diag.hardest_real.requires_grad
    torch.testing.assert_close(loss, sscl_loss(z1, z2, **hyper, mixing=mixing), **TOL)
    hardest = hardest_real_by_hand(z1, z2)
    assert diag.hardest_real.item() == pytest.approx(hardest, abs=1e-12)
    z = torch.cat([z1, z2]).detach()
    synthetic = []
    for a in range(2 * b):
        for j1, j2, al in zip(mixing.j1[a].tolist(), mixing.j2[a].tolist(), mixing.alpha[a].tolist()):
            h = al * z[j1] + (1 - al) * z[j2]
            synthetic.append(float(z[a] @ (h / h.norm())))
    assert diag.synthetic_mean.item() == pytest.approx(sum(synthetic) / len(synthetic), abs=1e-12)
    copies = [float(z[a] @ z[j]) for a in range(2 * b) for j in mixing.j1[a].tolist()]
    _, copy = sscl_loss(z1, z2, **hyper, mode="copy", mixing=mixing, return_diagnostics=True)
    assert copy.synthetic_mean.item() == pytest.approx(sum(copies) / len(copies), abs=1e-12)
    # K = 0 (HCL, DCL, NT-Xent): no synthetic negatives, NaN; NT-Xent has no floor.
    for fn in (lambda a, c, **kw: hcl_loss(a, c, temperature=0.5, beta=1.0, tau_plus=0.1, **kw),
               lambda a, c, **kw: dcl_loss(a, c, temperature=0.5, tau_plus=0.1, **kw),
               lambda a, c, **kw: nt_xent(a, c, temperature=0.5, **kw),
               get_loss("sscl", **hyper | dict(n_synthetic=0, mode="mix"))):
        value, diag = fn(z1, z2, return_diagnostics=True)
        torch.testing.assert_close(value, fn(z1, z2), **TOL)
        assert diag.hardest_real.item() == pytest.approx(hardest, abs=1e-12)
        assert math.isnan(diag.synthetic_mean.item())
    assert nt_xent(z1, z2, temperature=0.01, return_diagnostics=True)[1].floor_fraction.item() == 0


def test_get_loss_registry():
    z1, z2 = views(4)
    fn = get_loss("dcl", temperature=0.5, tau_plus=0.1)
    torch.testing.assert_close(fn(z1, z2), dcl_loss(z1, z2, temperature=0.5, tau_plus=0.1), **TOL)
    with pytest.raises(ValueError, match="loss 'dcl' takes temperature, tau_plus; does not take beta, n_hard"):
        get_loss("dcl", temperature=0.5, tau_plus=0.1, beta=3.0, n_hard=2)
    with pytest.raises(ValueError, match="takes temperature, beta, tau_plus; missing beta"):
        get_loss("hcl", temperature=0.5, tau_plus=0.1)
    with pytest.raises(ValueError, match="simclr, dcl, hcl, sscl"):
        get_loss("moco", temperature=0.5)


@pytest.mark.parametrize(
    "kwargs,z_shapes,match",
    [
        ({}, ((4, 8), (5, 8)), "z1 and z2"),
        ({}, ((8,), (8,)), "z1"),
        ({}, ((1, 8), (1, 8)), "B >= 2"),
        ({"temperature": 0.0}, None, "temperature"),
        ({"temperature": -1.0}, None, "temperature"),
        ({"tau_plus": 1.0}, None, "tau_plus"),
        ({"tau_plus": -0.1}, None, "tau_plus"),
        ({"beta": -0.5}, None, "beta"),
        ({"n_hard": 7}, None, "n_hard"),
        ({"n_hard": -1}, None, "n_hard"),
        ({"n_synthetic": -2}, None, "n_synthetic"),
        ({"n_hard": 0, "n_synthetic": 2}, None, "n_hard"),
        ({"mode": "blend"}, None, "mode"),
        ({"reduction": "sum"}, None, "reduction"),
        ({"mixing": (torch.zeros(3, 2, dtype=torch.long),) * 3}, None, "mixing"),
    ],
)
def test_bad_input_names_the_argument(kwargs, z_shapes, match):
    shapes = z_shapes or ((4, 8), (4, 8))
    z1, z2 = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=2, n_synthetic=2, mode="mix") | kwargs
    with pytest.raises(ValueError, match=match):
        sscl_loss(z1, z2, **hyper)


def test_histogram_similarities_are_the_real_negatives_and_the_losss_own_synthetics():
    b = 6
    z1, z2 = views(b, seed=5, requires_grad=False)
    real, synthetic = negative_similarities(z1, z2, n_hard=4, n_synthetic=3, generator=torch.Generator().manual_seed(9))
    z = torch.cat([z1, z2])
    rows = torch.arange(2 * b)
    is_negative = (rows[:, None] != rows) & (rows[None, :] != (rows[:, None] + b) % (2 * b))  # (2B, 2B)
    torch.testing.assert_close(real, (z @ z.T)[is_negative], **TOL)  # each anchor's 2B - 2, row by row
    _, found = sscl_loss(z1, z2, temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=4, n_synthetic=3,
                         generator=torch.Generator().manual_seed(9), return_diagnostics=True)
    assert synthetic.shape == (2 * b * 3,)
    torch.testing.assert_close(synthetic.mean(), found.synthetic_mean, **TOL)  # the same draw as the loss
