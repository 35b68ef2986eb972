"""The queue loss (MoCo with SSCL's negatives) against its loop reference, its reductions and checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loss_reference import reference_moco
from sscl.losses import Mixing, get_loss, moco_loss, queue_negative_similarities
from sscl.losses.steps import draw_from_hard_pool

pytestmark = pytest.mark.unit
TOL = dict(rtol=1e-10, atol=1e-10)


def queries_keys_queue(b: int = 6, q_size: int = 10, d: int = 8, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(b, d, generator=g, dtype=dtype), dim=1)  # keys near their queries
    queue = F.normalize(torch.randn(q_size, d, generator=g, dtype=dtype), dim=1)
    return q.requires_grad_(), k.requires_grad_(), queue.requires_grad_()


def queue_mixing(b: int, q_size: int, k: int, seed: int = 1) -> Mixing:
    g = torch.Generator().manual_seed(seed)
    return Mixing(torch.randint(q_size, (b, k), generator=g), torch.randint(q_size, (b, k), generator=g),
                  torch.rand(b, k, generator=g, dtype=torch.float64))


def value_and_grad(fn, q, k, queue):
    loss = fn(q, k, queue)
    return (loss.detach(), *torch.autograd.grad(loss, (q,)))


@pytest.mark.parametrize("mode", ["mix", "copy"])
@pytest.mark.parametrize("temperature,beta,tau_plus", [(0.5, 1.0, 0.1), (0.1, 3.0, 0.05), (0.2, 0.0, 0.0)])
def test_matches_loop_reference_values_and_gradients(mode, temperature, beta, tau_plus):
    q, k, queue = queries_keys_queue()
    mixing = queue_mixing(6, 10, k=4)
    hyper = dict(temperature=temperature, beta=beta, tau_plus=tau_plus)
    ours = value_and_grad(lambda *a: moco_loss(*a, **hyper, n_hard=3, n_synthetic=4, mode=mode, mixing=mixing),
                          q, k, queue)
    reference = value_and_grad(lambda *a: reference_moco(*a, **hyper, mixing=mixing, mode=mode), q, k, queue)
    for x, y in zip(ours, reference):
        torch.testing.assert_close(x, y, **TOL)


def test_gradient_flows_to_the_queries_only():
    q, k, queue = queries_keys_queue()
    loss = moco_loss(q, k, queue, temperature=0.2, beta=1.0, tau_plus=0.1, n_hard=4, n_synthetic=3,
                     generator=torch.Generator().manual_seed(0))
    grad_q, grad_k, grad_queue = torch.autograd.grad(loss, (q, k, queue), allow_unused=True)
    assert grad_k is None and grad_queue is None
    assert grad_q.abs().sum() > 0


def test_without_hardness_debiasing_or_synthetics_it_is_infonce():
    q, k, queue = queries_keys_queue()
    t = 0.2
    # MoCo's InfoNCE as its paper writes it: a cross-entropy whose class 0 is the key.
    logits = torch.cat([(q * k.detach()).sum(1, keepdim=True), q @ queue.detach().T], dim=1) / t
    expected = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    torch.testing.assert_close(moco_loss(q, k, queue, temperature=t), expected, **TOL)
    torch.testing.assert_close(get_loss("simclr", "moco", temperature=t)(q, k, queue), expected, **TOL)
    with pytest.raises(ValueError, match="does not take beta"):
        get_loss("simclr", "moco", temperature=t, beta=2.0)


def test_without_synthetics_it_is_the_debiased_hard_loss_on_the_queue():
    q, k, queue = queries_keys_queue()
    hyper = dict(temperature=0.3, beta=1.5, tau_plus=0.1)
    torch.testing.assert_close(moco_loss(q, k, queue, **hyper), reference_moco(q, k, queue, **hyper), **TOL)
    hcl = get_loss("hcl", "moco", **hyper)
    torch.testing.assert_close(hcl(q, k, queue), reference_moco(q, k, queue, **hyper), **TOL)


def test_mix_with_alpha_one_or_equal_parents_is_copy():
    q, k, queue = queries_keys_queue()
    j1, j2, alpha = queue_mixing(6, 10, k=5)
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=3, n_synthetic=5)
    copy = moco_loss(q, k, queue, **hyper, mode="copy", mixing=(j1, j2, alpha))
    torch.testing.assert_close(moco_loss(q, k, queue, **hyper, mixing=(j1, j2, torch.ones_like(alpha))), copy, **TOL)
    torch.testing.assert_close(moco_loss(q, k, queue, **hyper, mixing=(j1, j1, alpha)), copy, **TOL)


def test_drawn_parents_are_each_querys_hardest_queue_entries():
    q, k, queue = queries_keys_queue(b=5, q_size=40)
    generator = torch.Generator().manual_seed(3)
    _, found = moco_loss(q, k, queue, temperature=0.5, n_hard=6, n_synthetic=50, generator=generator,
                         return_diagnostics=True)
    # The same draw, replayed: each parent is among the query's 6 most similar queue rows.
    with torch.no_grad():
        similarities = q @ queue.T
        mixing = draw_from_hard_pool(similarities, 6, 50, torch.Generator().manual_seed(3))
    hardest = similarities.topk(6, dim=1).indices
    for parents in (mixing.j1, mixing.j2):
        assert all(set(row.tolist()) <= set(pool.tolist()) for row, pool in zip(parents, hardest))
    assert float(found.hardest_real) == pytest.approx(float(similarities.amax(1).mean()), abs=1e-12)
    replayed = moco_loss(q, k, queue, temperature=0.5, n_hard=6, n_synthetic=50, mixing=mixing)
    drawn = moco_loss(q, k, queue, temperature=0.5, n_hard=6, n_synthetic=50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, replayed, **TOL)


def test_diagnostics_floor_fraction_counts_the_floored_queries():
    q, k, queue = queries_keys_queue(b=8, q_size=30)
    t, tau_plus = 0.5, 0.3  # a large prior sends some queries (here half) to the floor
    per_query, found = moco_loss(q, k, queue, temperature=t, tau_plus=tau_plus, reduction="none",
                                 return_diagnostics=True)
    pos = torch.exp((q * k).sum(1) / t).detach()
    r = torch.exp(q @ queue.T / t).sum(1).detach()
    floored = (r - tau_plus * 30 * pos) / (1 - tau_plus) <= 30 * torch.exp(torch.tensor(-1 / t, dtype=q.dtype))
    assert 0 < float(found.floor_fraction) < 1
    assert float(found.floor_fraction) == pytest.approx(float(floored.double().mean()))
    assert per_query.shape == (8,)


@pytest.mark.parametrize("temperature,beta", [(0.05, 10.0), (0.2, 1.0)])
def test_stable_under_bf16_autocast(temperature, beta):
    q, k, queue = queries_keys_queue(b=64, q_size=4096, d=128, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = moco_loss(q.bfloat16(), k.bfloat16(), queue.bfloat16(), temperature=temperature, beta=beta,
                         tau_plus=0.1, n_hard=64, n_synthetic=32, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss, (q,))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    full = moco_loss(q, k, queue, temperature=temperature, beta=beta, tau_plus=0.1, n_hard=64, n_synthetic=32,
                     generator=torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=0.05)


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((4, 8), (4, 8), (10, 7)), {}, r"queue must have shape \(Q, D\) = \(Q, 8\)"),
    (((4, 8), (5, 8), (10, 8)), {}, "q and k must have the same shape"),
    (((4, 8), (4, 8), (10, 8)), {"n_hard": 11, "n_synthetic": 2}, r"n_hard must be in \[0, Q = 10\]"),
    (((4, 8), (4, 8), (10, 8)), {"n_synthetic": 2}, "n_hard must be >= 1 when n_synthetic > 0"),
    (((4, 8), (4, 8), (10, 8)), {"tau_plus": 1.0}, r"tau_plus must be in \[0, 1\)"),
    (((4, 8), (4, 8), (10, 8)), {"n_hard": 2, "n_synthetic": 3, "mixing": (torch.zeros(4, 2, dtype=torch.long),) * 2
                                 + (torch.zeros(4, 2),)}, r"mixing j1 must have shape \(B, n_synthetic\) = \(4, 3\)"),
])
def test_bad_input_names_the_argument(shapes, kwargs, match):
    tensors = [F.normalize(torch.randn(shape), dim=1) for shape in shapes]
    with pytest.raises(ValueError, match=match):
        moco_loss(*tensors, temperature=0.5, **kwargs)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'byol'; valid: simclr, moco"):
        get_loss("sscl", "byol", temperature=0.5)


@pytest.mark.parametrize("mode", ["mix", "copy"])
def test_histogram_similarities_are_the_queue_and_the_losss_own_synthetics(mode):
    q, k, queue = (t.detach() for t in queries_keys_queue(b=5, q_size=30))
    real, synthetic = queue_negative_similarities(q, queue, n_hard=4, n_synthetic=7, mode=mode,
                                                  generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(real, (q @ queue.T).flatten(), **TOL)
    # The same generator seed draws the same synthetic negatives as the loss.
    _, found = moco_loss(q, k, queue, temperature=0.5, n_hard=4, n_synthetic=7, mode=mode,
                         generator=torch.Generator().manual_seed(2), return_diagnostics=True)
    assert synthetic.shape == (5 * 7,)
    torch.testing.assert_close(synthetic.mean(), found.synthetic_mean, **TOL)
    if mode == "copy":  # each synthetic negative is one of its query's 4 most similar queue keys
        pool = (q @ queue.T).topk(4, dim=1).values  # (5, 4)
        assert bool((synthetic.view(5, 7, 1) == pool[:, None, :]).any(dim=2).all())
    with pytest.raises(ValueError, match=r"n_hard must be in \[0, Q = 30\]"):
        queue_negative_similarities(q, queue, n_hard=31, n_synthetic=2)
