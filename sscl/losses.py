"""Two-view contrastive losses: NT-Xent, DCL, HCL and SSCL.

Notation (see ``shared/method.md``): a batch of B images gives two L2-normalised views
``z1, z2`` of shape (B, D). They are stacked as ``Z = [z1; z2]`` of shape (2B, D); row ``a`` is an
anchor and its positive is row ``p(a) = (a + B) mod 2B``. The real negatives of ``a`` are the other
2B - 2 rows.

Under ``torch.distributed`` with more than one rank, ``z1``/``z2`` are gathered from every rank
(gradient flows back to the local part), B and N count *global* rows, and each rank computes the
loss of its own anchors against the global batch. The mean over local anchors, averaged over ranks
(as DDP does with gradients), equals the single-process loss on the concatenated batch.

Papers:
    NT-Xent: Chen et al., "A Simple Framework for Contrastive Learning" (SimCLR), ICML 2020.
    DCL: Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020.
    HCL: Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021.
    SSCL: Dong et al., "Synthetic Hard Negative Samples for Contrastive Learning", arXiv 2304.02971.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "Mixing",
    "dcl_loss",
    "draw_mixing",
    "get_loss",
    "hcl_loss",
    "negative_similarities",
    "nt_xent",
    "sscl_loss",
]

Mode = Literal["mix", "copy"]
Reduction = Literal["mean", "none"]
MODES = ("mix", "copy")
REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class Mixing:
    """Synthetic-negative recipe for every anchor.

    Attributes:
        j1: (2B, K) int64, absolute row indices into ``cat([z1, z2])`` of the first parent.
        j2: (2B, K) int64, row indices of the second parent.
        alpha: (2B, K) float, weight of ``j1``: ``h = unit(alpha * Z[j1] + (1 - alpha) * Z[j2])``.
    """

    j1: torch.Tensor
    j2: torch.Tensor
    alpha: torch.Tensor

    def __iter__(self):
        return iter((self.j1, self.j2, self.alpha))


# --------------------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class _Layout:
    """Where this process's anchors sit in the (global) stacked batch.

    Attributes:
        rows: (A,) global row index of each local anchor (A = 2 * local B).
        pos: (A,) global row index of each anchor's positive.
        neg_bias: (A, 2B) float, 0 at the 2B - 2 real negatives of each anchor and -inf elsewhere.
        self_bias: (A, 2B) float, -inf at each anchor's own column and 0 elsewhere.
        n_rows: 2B, the number of rows of the global stacked batch.
        distributed: whether the embeddings were gathered from more than one rank.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    neg_bias: torch.Tensor
    self_bias: torch.Tensor
    n_rows: int
    distributed: bool


@functools.lru_cache(maxsize=32)
def _layout(local_b: int, world: int, rank: int, device: torch.device, dtype: torch.dtype) -> _Layout:
    # Built once per (batch size, rank, device): the training loop calls the loss with the same
    # shapes every step, so masks and indices are reused instead of rebuilt.
    global_b = local_b * world
    local = torch.arange(local_b, device=device) + rank * local_b
    rows = torch.cat([local, local + global_b])  # (A,)
    pos = (rows + global_b) % (2 * global_b)  # (A,)
    cols = torch.arange(2 * global_b, device=device)  # (2B,)
    self_mask = cols[None, :] == rows[:, None]  # (A, 2B)
    neg_mask = ~self_mask & (cols[None, :] != pos[:, None])  # (A, 2B)
    # Additive 0/-inf masks: adding one is ~10x cheaper on CPU than masked_fill with a bool mask.
    zeros = torch.zeros(neg_mask.shape, dtype=dtype, device=device)
    neg_bias = zeros.masked_fill(~neg_mask, -math.inf)
    self_bias = zeros.masked_fill(self_mask, -math.inf)
    return _Layout(rows, pos, neg_bias, self_bias, 2 * global_b, world > 1)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _stack(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, _Layout]:
    """Stacks the views into the global ``Z`` (2B, D) and returns the local anchors' layout."""
    world, rank = _world()
    if world > 1:
        from torch.distributed.nn.functional import all_gather  # differentiable gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still supported
            warnings.simplefilter("ignore", FutureWarning)
            z1 = torch.cat(all_gather(z1.contiguous()))
            z2 = torch.cat(all_gather(z2.contiguous()))
    z = torch.cat([z1, z2])  # (2B, D), global
    compute_dtype = torch.promote_types(z.dtype, torch.float32)  # bf16 autocast -> float32
    return z, _layout(z1.shape[0] // world, world, rank, z.device, compute_dtype)


@dataclass(frozen=True)
class _Similarities:
    """Detached similarity values of the local anchors, computed once per step.

    Attributes:
        z_anchor: (A, D) the local anchors' rows of Z (the autograd inputs, with ``z``).
        z: (2B, D) global stacked views.
        sim: (A, 2B) ``<Z_a, Z_j>`` values, no gradient.
        neg: (A, 2B) ``sim`` with everything but the real negatives at -inf.
    """

    z_anchor: torch.Tensor
    z: torch.Tensor
    sim: torch.Tensor
    neg: torch.Tensor


def _similarities(z: torch.Tensor, layout: _Layout) -> _Similarities:
    z_anchor = z[layout.rows] if layout.distributed else z
    with torch.no_grad():
        sim = (z_anchor @ z.T).to(layout.neg_bias.dtype)  # (A, 2B); the gradient is attached below
        neg = sim + layout.neg_bias
    return _Similarities(z_anchor, z, sim, neg)


class _NegativeTerms(torch.autograd.Function):
    """The (A, 2B)-sized part of the loss, with a hand-written backward.

    Returns, per anchor, ``s_pos / t``, ``log sum_v exp((1 + beta) s_v / t)`` and
    ``log sum_v exp(beta s_v / t)`` over ``V_a`` = the real negatives plus the synthetic ones. A
    synthetic similarity is ``sum_g weights[a, g, k] * sim[a, cols[a, g, k]]`` (its parents are
    detached, so its gradient reaches only the anchor). Autograd through the same steps would
    recompute every exp in the backward and add a transposed (2B, 2B) copy; here the forward's exps
    are reused and the matmuls are the three of a plain ``Z @ Z.T``.
    """

    @staticmethod
    def forward(ctx, z_anchor, z, sim, neg, pos, cols, weights, temperature, beta):  # noqa: D102
        inv_t = 1.0 / temperature
        syn = (weights * sim.gather(1, cols.flatten(1)).view_as(weights)).sum(dim=1)  # (A, K)
        shift = neg.amax(dim=1, keepdim=True)  # (A, 1), keeps every exponent <= 0
        if syn.shape[1]:
            shift = torch.maximum(shift, syn.amax(dim=1, keepdim=True))
        d = (neg - shift).mul_(inv_t)  # (A, 2B), -inf off the negatives
        d_syn = (syn - shift).mul_(inv_t)  # (A, K)
        e_w, e_w_syn = torch.exp(d * (1.0 + beta)), torch.exp(d_syn * (1.0 + beta))  # w * e / row const
        sum_we = e_w.sum(dim=1) + e_w_syn.sum(dim=1)  # >= 1: the shift's own term is exp(0)
        lse_we = torch.log(sum_we) + shift.squeeze(1) * ((1.0 + beta) * inv_t)
        n_neg = neg.shape[1] - 2 + syn.shape[1]
        if beta:
            w, w_syn = d.mul_(beta).exp_(), d_syn.mul_(beta).exp_()  # reuse d's storage
            sum_w = w.sum(dim=1) + w_syn.sum(dim=1)
            lse_w = torch.log(sum_w) + shift.squeeze(1) * (beta * inv_t)
        else:
            w = w_syn = sum_w = torch.empty(0, device=sim.device)
            lse_w = torch.full_like(lse_we, math.log(n_neg))  # N unit weights
        log_pos = sim.gather(1, pos[:, None]).squeeze(1) * inv_t
        ctx.save_for_backward(z_anchor, z, e_w, e_w_syn, sum_we, w, w_syn, sum_w, pos, cols, weights)
        ctx.temperature, ctx.beta = temperature, beta
        return log_pos, lse_we, lse_w

    @staticmethod
    def backward(ctx, grad_pos, grad_we, grad_w):  # noqa: D102
        z_anchor, z, e_w, e_w_syn, sum_we, w, w_syn, sum_w, pos, cols, weights = ctx.saved_tensors
        t, beta = ctx.temperature, ctx.beta
        # d lse / d s_v = scale / t * (the forward's softmax over v).
        c_we = (grad_we * ((1.0 + beta) / t) / sum_we)[:, None]  # (A, 1)
        grad = e_w * c_we  # (A, 2B)
        grad_syn = e_w_syn * c_we  # (A, K)
        if beta:
            c_w = (grad_w * (beta / t) / sum_w)[:, None]
            grad.addcmul_(w, c_w)
            grad_syn.addcmul_(w_syn, c_w)
        grad.scatter_add_(1, pos[:, None], (grad_pos / t)[:, None])
        grad_z = grad.T.to(z.dtype) @ z_anchor  # (2B, D): the anchors' partners
        if grad_syn.shape[1]:  # detached parents: the synthetic terms reach the anchor only
            grad.scatter_add_(1, cols.flatten(1), (weights * grad_syn[:, None, :]).flatten(1))
        grad_anchor = grad.to(z.dtype) @ z  # (A, D)
        return grad_anchor, grad_z, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- validation


def _check_views(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.ndim != 2:
        raise ValueError(f"z1 must have shape (B, D), got {tuple(z1.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}")
    if not z1.is_floating_point() or not z2.is_floating_point():
        raise ValueError(f"z1 and z2 must be floating point, got {z1.dtype} and {z2.dtype}")
    world, _ = _world()
    if z1.shape[0] * world < 2:
        raise ValueError(f"z1 must hold a batch of B >= 2 (over all ranks), got B = {z1.shape[0] * world}")


def _check_hyper(temperature: float, beta: float, tau_plus: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= tau_plus < 1:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_synthetic(n_hard: int, n_synthetic: int, mode: str, n_rows: int) -> None:
    if n_synthetic < 0:
        raise ValueError(f"n_synthetic must be >= 0, got {n_synthetic}")
    if n_hard < 0:
        raise ValueError(f"n_hard must be >= 0, got {n_hard}")
    if n_synthetic > 0 and n_hard < 1:
        raise ValueError(f"n_hard must be >= 1 when n_synthetic > 0, got {n_hard}")
    if n_hard > n_rows - 2:
        raise ValueError(f"n_hard must be <= 2B - 2 = {n_rows - 2} (the real negatives per anchor), got {n_hard}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _reduce(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_anchor.mean() if reduction == "mean" else per_anchor


# --------------------------------------------------------------------------- losses


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, reduction: Reduction = "mean"
) -> torch.Tensor:
    """NT-Xent (SimCLR): ``-log(pos_a / (pos_a + sum_{v real neg} e_v))`` averaged over 2B anchors.

    Args:
        z1: (B, D), L2-normalised projections of the first view.
        z2: (B, D), L2-normalised projections of the second view.
        temperature: t > 0.
        reduction: "mean" (scalar) or "none" (per-anchor values, shape (A,) with A = 2B locally).

    Returns:
        The loss, a scalar or (A,).

    Raises:
        ValueError: naming the argument on bad shapes or values.
    """
    _check_views(z1, z2)
    _check_hyper(temperature, 0.0, 0.0, reduction)
    z, layout = _stack(z1, z2)
    z_anchor = z[layout.rows] if layout.distributed else z
    logits = (z_anchor @ z.T).to(layout.self_bias.dtype) / temperature + layout.self_bias  # (A, 2B)
    return F.cross_entropy(logits, layout.pos, reduction=reduction)


def _debiased_hard_loss(
    sims: _Similarities,
    layout: _Layout,
    *,
    temperature: float,
    beta: float,
    tau_plus: float,
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-anchor ``-log(pos / (pos + Ng))`` of ``method.md`` step 3, in log space.

    Args:
        sims: similarity values of the local anchors.
        layout: where the anchors, positives and real negatives are.
        synthetic: ``(cols, weights)``, each (A, G, K): synthetic negative k of anchor a has
            similarity ``sum_g weights[a, g, k] * sim[a, cols[a, g, k]]``; None for K = 0.

    Returns:
        (A,) per-anchor loss.
    """
    if synthetic is None:
        empty = torch.empty((layout.rows.numel(), 1, 0), device=sims.sim.device)
        synthetic = (empty.long(), empty.to(sims.sim.dtype))
    cols, weights = synthetic
    log_pos, log_we, log_w = _NegativeTerms.apply(
        sims.z_anchor, sims.z, sims.sim, sims.neg, layout.pos, cols, weights, temperature, beta
    )
    n_neg = layout.n_rows - 2 + cols.shape[2]  # N
    # log R = log N + log sum(w e) - log sum(w), w = exp(beta s / t).
    log_r = math.log(n_neg) + log_we - log_w
    # log Ng = max(log(R - tau N pos) - log(1 - tau), log N - 1/t), with R - tau N pos > 0 guarded.
    log_floor = math.log(n_neg) - 1.0 / temperature
    if tau_plus > 0:
        x = math.log(tau_plus * n_neg) + log_pos - log_r  # log(tau N pos / R)
        valid = x < 0
        x_safe = torch.where(valid, x, torch.full_like(x, -1.0))
        debiased = log_r + torch.log(-torch.expm1(x_safe)) - math.log1p(-tau_plus)
        debiased = torch.where(valid, debiased, torch.full_like(debiased, -math.inf))
    else:
        debiased = log_r
    log_ng = torch.clamp(debiased, min=log_floor)
    return F.softplus(log_ng - log_pos)  # -log(pos / (pos + Ng))


def dcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    tau_plus: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al. 2020): ``method.md`` step 3 with beta = 0, K = 0.

    ``Ng = max((sum_v e_v - tau_plus * N * pos) / (1 - tau_plus), N * exp(-1/t))``, N = 2B - 2.

    Args:
        z1: (B, D), L2-normalised. z2: (B, D), L2-normalised.
        temperature: t > 0.
        tau_plus: class prior in [0, 1).
        reduction: "mean" or "none".

    Returns:
        Scalar, or (A,) per-anchor values.
    """
    return hcl_loss(z1, z2, temperature=temperature, beta=0.0, tau_plus=tau_plus, reduction=reduction)


def hcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    tau_plus: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021): ``method.md`` step 3 with K = 0.

    ``R = N * sum_v(w_v e_v) / sum_v(w_v)`` with ``w_v = exp(beta * s_v / t)``, then debiased as DCL.

    Args:
        z1: (B, D), L2-normalised. z2: (B, D), L2-normalised.
        temperature: t > 0.
        beta: hardness concentration >= 0 (0 gives DCL).
        tau_plus: class prior in [0, 1).
        reduction: "mean" or "none".

    Returns:
        Scalar, or (A,) per-anchor values.
    """
    _check_views(z1, z2)
    _check_hyper(temperature, beta, tau_plus, reduction)
    z, layout = _stack(z1, z2)
    sims = _similarities(z, layout)
    per_anchor = _debiased_hard_loss(sims, layout, temperature=temperature, beta=beta, tau_plus=tau_plus)
    return _reduce(per_anchor, reduction)


def _hard_pool(sims: _Similarities, n_hard: int) -> torch.Tensor:
    """(A, n_hard) global row indices of each anchor's most similar real negatives (detached)."""
    return sims.neg.topk(n_hard, dim=1, sorted=False).indices


_DRAW_BITS = 21  # bits per field of one 63-bit draw: j1, j2 and alpha


def _draw_from_pool(
    pool: torch.Tensor, n_synthetic: int, generator: torch.Generator | None, dtype: torch.dtype
) -> Mixing:
    """Uniform draws with replacement from each anchor's pool, and ``alpha ~ U[0, 1)``.

    One 63-bit random integer per synthetic negative supplies all three values (21 bits each):
    a third of the generator calls of three separate draws, which dominate at large K on CPU. A
    pool index is ``floor(r * n_hard / 2^21)``: uniform up to a relative bias below
    ``n_hard / 2^21``; alpha has a resolution of ``2^-21``.
    """
    n_anchors, n_hard = pool.shape
    draw_device = generator.device if generator is not None else pool.device
    bits = torch.empty((n_anchors, 1, n_synthetic), dtype=torch.int64, device=draw_device)
    bits = bits.random_(generator=generator).to(pool.device)  # uniform on [0, 2^63)
    shifts = torch.tensor([0, _DRAW_BITS, 2 * _DRAW_BITS], device=pool.device)[None, :, None]
    fields = (bits >> shifts) & ((1 << _DRAW_BITS) - 1)  # (A, 3, K)
    picks = (fields[:, :2] * n_hard) >> _DRAW_BITS  # (A, 2, K) positions in the pool
    parents = pool.gather(1, picks.flatten(1)).view_as(picks)  # (A, 2, K)
    alpha = fields[:, 2].to(dtype) * 2.0**-_DRAW_BITS
    return Mixing(parents[:, 0], parents[:, 1], alpha)


def draw_mixing(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    n_hard: int,
    n_synthetic: int,
    generator: torch.Generator | None = None,
) -> Mixing:
    """Draws the synthetic-negative recipe of ``method.md`` steps 1-2 for this process's anchors.

    For each anchor the pool is its ``n_hard`` most similar real negatives (ranked on detached
    values); ``j1`` and ``j2`` are drawn uniformly with replacement from it, ``alpha ~ U[0, 1)``.
    ``sscl_loss(..., mixing=None, generator=g)`` performs exactly this draw with ``g``.

    Args:
        z1: (B, D), L2-normalised. z2: (B, D), L2-normalised.
        n_hard: pool size, 1 <= n_hard <= 2B - 2.
        n_synthetic: K >= 0 synthetic negatives per anchor.
        generator: optional RNG for reproducible draws (its device is used for the draw).

    Returns:
        ``Mixing`` with (A, K) tensors of global row indices and weights (A = 2B in one process).
    """
    _check_views(z1, z2)
    with torch.no_grad():
        z, layout = _stack(z1.detach(), z2.detach())
        _check_synthetic(n_hard, n_synthetic, "mix", layout.n_rows)
        sims = _similarities(z, layout)
        return _draw_from_pool(_hard_pool(sims, n_hard), n_synthetic, generator, sims.sim.dtype)


def _synthetic_terms(
    sims: _Similarities, layout: _Layout, mixing: Mixing, mode: Mode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expresses ``<Z_a, h>`` for every synthetic negative through entries of the similarity matrix.

    For unit rows, ``||alpha x + (1 - alpha) y||^2 = alpha^2 + (1 - alpha)^2 + 2 alpha (1 - alpha)
    <x, y>``, so ``<Z_a, h> = (alpha s(a, j1) + (1 - alpha) s(a, j2)) / ||.||``: no (A, K, D) tensor.

    Returns:
        cols, weights: each (A, G, K), G = 1 for copy and 2 for mix.
    """
    j1, j2, alpha = mixing
    if mode == "copy":
        return j1[:, None, :], torch.ones_like(j1[:, None, :], dtype=sims.sim.dtype)
    alpha = alpha.to(sims.sim.dtype)
    with torch.no_grad():
        if layout.distributed:
            # Parents may live on other ranks: their mutual similarity needs the full (2B, 2B).
            s12 = (sims.z @ sims.z.T).to(sims.sim.dtype)[j1, j2]
        else:
            flat = (j1 * sims.sim.shape[1]).add_(j2)  # every row is an anchor here
            s12 = sims.sim.view(-1).gather(0, flat.view(-1)).view_as(j1)
        one_minus = 1.0 - alpha
        norm = torch.sqrt((alpha * alpha + one_minus * one_minus + 2.0 * alpha * one_minus * s12).clamp_min(1e-12))
    return torch.stack([j1, j2], dim=1), torch.stack([alpha / norm, one_minus / norm], dim=1)


def _check_mixing(mixing: Mixing, n_anchors: int, n_synthetic: int, n_rows: int) -> Mixing:
    if len(tuple(mixing)) != 3:
        raise ValueError("mixing must be a triple (j1, j2, alpha)")
    j1, j2, alpha = mixing
    for name, t in (("j1", j1), ("j2", j2), ("alpha", alpha)):
        if t.shape not in ((n_anchors, n_synthetic), (n_rows, n_synthetic)):
            raise ValueError(
                f"mixing {name} must have shape (2B, n_synthetic) = ({n_rows}, {n_synthetic}), got {tuple(t.shape)}"
            )
    return Mixing(j1, j2, alpha)


def sscl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    tau_plus: float,
    n_hard: int,
    n_synthetic: int,
    mode: Mode = "mix",
    mixing: Mixing | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """SSCL (Dong et al., arXiv 2304.02971): HCL+DCL over real plus K synthetic hard negatives.

    Each anchor gets K detached synthetic negatives mixed from pairs of its ``n_hard`` hardest real
    negatives (``mode="mix"``: ``h = unit(alpha Z[j1] + (1 - alpha) Z[j2])``, the paper) or copied
    from one of them (``mode="copy"``: ``h = Z[j1]``, the released code). With ``N = 2B - 2 + K``:
    ``R = N sum(w e) / sum(w)``, ``Ng = max((R - tau_plus N pos) / (1 - tau_plus), N e^{-1/t})``,
    loss ``= -log(pos / (pos + Ng))``. Reduces to HCL for K = 0.

    Args:
        z1: (B, D), L2-normalised projections of the first view.
        z2: (B, D), L2-normalised projections of the second view.
        temperature: t > 0.
        beta: hardness concentration >= 0.
        tau_plus: class prior in [0, 1).
        n_hard: size of each anchor's hard pool, <= 2B - 2.
        n_synthetic: K >= 0.
        mode: "mix" or "copy".
        mixing: optional ``(j1, j2, alpha)``, each (2B, K): absolute row indices into
            ``cat([z1, z2])`` (global under distributed training) and the weight of ``j1``. When
            None, it is drawn as in :func:`draw_mixing`.
        generator: RNG for that draw.
        reduction: "mean" or "none".

    Returns:
        Scalar mean over the anchors, or (A,) per-anchor values.

    Raises:
        ValueError: naming the argument on bad shapes or values.
    """
    _check_views(z1, z2)
    _check_hyper(temperature, beta, tau_plus, reduction)
    world, _ = _world()
    n_rows = 2 * z1.shape[0] * world
    _check_synthetic(n_hard, n_synthetic, mode, n_rows)
    z, layout = _stack(z1, z2)
    sims = _similarities(z, layout)
    synthetic = None
    if n_synthetic > 0:
        if mixing is None:
            mixing = _draw_from_pool(_hard_pool(sims, n_hard), n_synthetic, generator, sims.sim.dtype)
        else:
            mixing = _check_mixing(Mixing(*mixing), layout.rows.numel(), n_synthetic, n_rows)
            mixing = Mixing(*(t.to(z.device) for t in mixing))
            if mixing.j1.shape[0] != layout.rows.numel():  # global recipe: keep the local anchors
                mixing = Mixing(*(t[layout.rows] for t in mixing))
        synthetic = _synthetic_terms(sims, layout, mixing, mode)
    per_anchor = _debiased_hard_loss(
        sims, layout, temperature=temperature, beta=beta, tau_plus=tau_plus, synthetic=synthetic
    )
    return _reduce(per_anchor, reduction)


LossFn = Callable[..., torch.Tensor]

# Name -> (function, the hyperparameters it takes). Config field names equal these keywords.
LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "simclr": (nt_xent, ("temperature",)),
    "dcl": (dcl_loss, ("temperature", "tau_plus")),
    "hcl": (hcl_loss, ("temperature", "beta", "tau_plus")),
    "sscl": (sscl_loss, ("temperature", "beta", "tau_plus", "n_hard", "n_synthetic", "mode")),
}


def get_loss(name: str, **hyper: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Binds a registered loss to its hyperparameters, ignoring the ones it does not take.

    Args:
        name: one of ``LOSSES``.
        **hyper: any superset of the loss's hyperparameters.

    Returns:
        ``fn(z1, z2, **extra) -> loss``.

    Raises:
        ValueError: on an unknown name, listing the valid ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    fn, keys = LOSSES[name]
    missing = [k for k in keys if k not in hyper]
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)}")
    return functools.partial(fn, **{k: hyper[k] for k in keys})


@torch.no_grad()
def negative_similarities(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    n_hard: int,
    n_synthetic: int,
    mode: Mode = "mix",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-negative cosine similarities, for diagnostics (e.g. a histogram).

    Args:
        z1: (B, D), L2-normalised. z2: (B, D), L2-normalised.
        n_hard, n_synthetic, mode, generator: as in :func:`sscl_loss`.

    Returns:
        real: (A * (2B - 2),) similarities to the real negatives.
        synthetic: (A * K,) similarities to synthetic negatives drawn as in the loss.
    """
    _check_views(z1, z2)
    z, layout = _stack(z1.detach(), z2.detach())
    _check_synthetic(n_hard, n_synthetic, mode, layout.n_rows)
    sims = _similarities(z, layout)
    real = sims.sim[torch.isfinite(layout.neg_bias)]
    if n_synthetic == 0:
        return real, real.new_empty(0)
    mixing = _draw_from_pool(_hard_pool(sims, n_hard), n_synthetic, generator, sims.sim.dtype)
    cols, weights = _synthetic_terms(sims, layout, mixing, mode)
    synthetic = (weights * sims.sim.gather(1, cols.flatten(1)).view_as(weights)).sum(dim=1)
    return real, synthetic.flatten()
