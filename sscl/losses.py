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
        neg_mask: (A, 2B) bool, True at the 2B - 2 real negatives of each anchor.
        self_mask: (A, 2B) bool, True at each anchor's own column.
        n_rows: 2B, the number of rows of the global stacked batch.
        distributed: whether the embeddings were gathered from more than one rank.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    neg_mask: torch.Tensor
    self_mask: torch.Tensor
    n_rows: int
    distributed: bool


@functools.lru_cache(maxsize=32)
def _layout(local_b: int, world: int, rank: int, device: torch.device) -> _Layout:
    # Built once per (batch size, rank, device): the training loop calls the loss with the same
    # shapes every step, so masks and indices are reused instead of rebuilt.
    global_b = local_b * world
    local = torch.arange(local_b, device=device) + rank * local_b
    rows = torch.cat([local, local + global_b])  # (A,)
    pos = (rows + global_b) % (2 * global_b)  # (A,)
    cols = torch.arange(2 * global_b, device=device)  # (2B,)
    self_mask = cols[None, :] == rows[:, None]  # (A, 2B)
    neg_mask = ~self_mask & (cols[None, :] != pos[:, None])  # (A, 2B)
    return _Layout(rows, pos, neg_mask, self_mask, 2 * global_b, world > 1)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _stack(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, _Layout]:
    """Stacks the views into the global ``Z`` (2B, D) and returns the local anchors' layout."""
    world, rank = _world()
    if world > 1:
        from torch.distributed.nn.functional import all_gather  # differentiable gather

        z1 = torch.cat(all_gather(z1.contiguous()))
        z2 = torch.cat(all_gather(z2.contiguous()))
    z = torch.cat([z1, z2])  # (2B, D), global
    return z, _layout(z1.shape[0] // world, world, rank, z.device)


def _similarities(z: torch.Tensor, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of the local anchors to every row, computed with one matmul.

    Returns:
        s: (A, 2B) similarities with gradient into both the anchor and the other row.
        s_anchor: (A, 2B) the same values with gradient into the anchor only, used for the
            synthetic negatives, which are detached by definition.
    """
    compute_dtype = torch.promote_types(z.dtype, torch.float32)  # bf16 autocast -> float32
    z_anchor = z[layout.rows] if layout.distributed else z
    s_anchor = (z_anchor @ z.detach().T).to(compute_dtype)  # (A, 2B), grad -> anchors only
    if layout.distributed:
        s_other = (z_anchor.detach() @ z.T).to(compute_dtype)  # grad -> other rows only
    else:
        s_other = s_anchor.T  # Z is square-symmetric: the transpose carries grad to the columns
    # Value of s_anchor, gradient of both halves: no second forward matmul in one process.
    s = s_anchor + s_other - s_anchor.detach()
    return s, s_anchor


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
    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    logits = (z_anchor @ z.T).to(compute_dtype) / temperature  # (A, 2B)
    logits = logits.masked_fill(layout.self_mask, -math.inf)
    return F.cross_entropy(logits, layout.pos, reduction=reduction)


def _debiased_hard_loss(
    s: torch.Tensor,
    synthetic: torch.Tensor | None,
    layout: _Layout,
    *,
    temperature: float,
    beta: float,
    tau_plus: float,
) -> torch.Tensor:
    """Per-anchor ``-log(pos / (pos + Ng))`` of ``method.md`` step 3, in log space.

    Args:
        s: (A, 2B) similarities of the local anchors to every row of Z.
        synthetic: (A, K) similarities to the synthetic negatives, or None for K = 0.
        layout: where the anchors, positives and real negatives are.

    Returns:
        (A,) per-anchor loss.
    """
    n_syn = 0 if synthetic is None else synthetic.shape[1]
    n_neg = layout.n_rows - 2 + n_syn  # N
    logits = s / temperature  # (A, 2B)
    log_pos = logits.gather(1, layout.pos[:, None]).squeeze(1)  # (A,)
    neg = logits.masked_fill(~layout.neg_mask, -math.inf)  # (A, 2B), real negatives only
    syn = None if synthetic is None else synthetic / temperature  # (A, K)

    def lse(scale: float) -> torch.Tensor:
        # log sum_v exp(scale * s_v / t) over real and synthetic negatives.
        out = torch.logsumexp(neg * scale, dim=1)
        if syn is not None:
            out = torch.logaddexp(out, torch.logsumexp(syn * scale, dim=1))
        return out

    # log R = log N + log sum(w e) - log sum(w), w = exp(beta s / t); beta = 0 gives sum(w) = N.
    log_r = lse(1.0 + beta)
    if beta != 0:
        log_r = log_r + math.log(n_neg) - lse(beta)
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
    s, _ = _similarities(z, layout)
    per_anchor = _debiased_hard_loss(s, None, layout, temperature=temperature, beta=beta, tau_plus=tau_plus)
    return _reduce(per_anchor, reduction)


def _hard_pool(s_anchor: torch.Tensor, layout: _Layout, n_hard: int) -> torch.Tensor:
    """(A, n_hard) global row indices of each anchor's most similar real negatives (detached)."""
    ranked = s_anchor.detach().masked_fill(~layout.neg_mask, -math.inf)
    return ranked.topk(n_hard, dim=1).indices


def _draw_from_pool(
    pool: torch.Tensor, n_synthetic: int, generator: torch.Generator | None, dtype: torch.dtype
) -> Mixing:
    """Uniform draws with replacement from each anchor's pool, and ``alpha ~ U[0, 1)``."""
    n_anchors, n_hard = pool.shape
    draw_device = generator.device if generator is not None else pool.device
    pick = torch.randint(n_hard, (2, n_anchors, n_synthetic), generator=generator, device=draw_device)
    alpha = torch.rand((n_anchors, n_synthetic), generator=generator, device=draw_device, dtype=dtype)
    pick, alpha = pick.to(pool.device), alpha.to(pool.device)
    return Mixing(pool.gather(1, pick[0]), pool.gather(1, pick[1]), alpha)


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
        _, s_anchor = _similarities(z, layout)
        pool = _hard_pool(s_anchor, layout, n_hard)
        return _draw_from_pool(pool, n_synthetic, generator, s_anchor.dtype)


def _synthetic_similarities(
    z: torch.Tensor, s_anchor: torch.Tensor, layout: _Layout, mixing: Mixing, mode: Mode
) -> torch.Tensor:
    """(A, K) similarities ``<Z_a, h>`` to the detached synthetic negatives, without any (A, K, D).

    For unit rows, ``||alpha x + (1 - alpha) y||^2 = alpha^2 + (1 - alpha)^2 + 2 alpha (1 - alpha)
    <x, y>``, so ``<Z_a, h>`` is a combination of entries of the similarity matrix.
    """
    j1, j2, alpha = mixing
    s1 = s_anchor.gather(1, j1)  # (A, K), gradient into the anchor only
    if mode == "copy":
        return s1
    alpha = alpha.to(s_anchor.dtype)
    s2 = s_anchor.gather(1, j2)
    with torch.no_grad():
        if layout.distributed:
            # Parents may live on other ranks: their mutual similarity needs the full (2B, 2B).
            parents = (z @ z.T).to(s_anchor.dtype)
            s12 = parents[j1, j2]
        else:
            s12 = s_anchor.detach()[j1, j2]  # s_anchor holds every row here
        beta_ = 1.0 - alpha
        norm = torch.sqrt((alpha * alpha + beta_ * beta_ + 2.0 * alpha * beta_ * s12).clamp_min(1e-12))
    return (alpha * s1 + (1.0 - alpha) * s2) / norm


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
    s, s_anchor = _similarities(z, layout)
    synthetic = None
    if n_synthetic > 0:
        if mixing is None:
            pool = _hard_pool(s_anchor, layout, n_hard)
            mixing = _draw_from_pool(pool, n_synthetic, generator, s_anchor.dtype)
        else:
            mixing = _check_mixing(Mixing(*mixing), layout.rows.numel(), n_synthetic, n_rows)
            if mixing.j1.shape[0] != layout.rows.numel():  # global recipe: keep the local anchors
                mixing = Mixing(*(t.to(z.device)[layout.rows] for t in mixing))
        synthetic = _synthetic_similarities(z, s_anchor, layout, mixing, mode)
    per_anchor = _debiased_hard_loss(s, synthetic, layout, temperature=temperature, beta=beta, tau_plus=tau_plus)
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
