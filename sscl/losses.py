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

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

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
_DRAW_BITS = 21  # bits per field of one 63-bit random draw: j1, j2 and alpha


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


# --------------------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class _Layout:
    """Where this process's anchors sit in the (global) stacked batch.

    Attributes:
        rows: (A,) global row index of each local anchor (A = 2 * local B).
        pos: (A,) global row index of each anchor's positive.
        excluded: ((2A,), (2A,)) local row and column of each anchor's own entry, then of its
            positive's, in an (A, 2B) matrix: the entries that are not real negatives.
        self_bias: (A, 2B) float, -inf at each anchor's own column and 0 elsewhere.
        minus_inf: 0-dim tensor holding -inf, for masking in place.
        draw_shifts: (2, 1, 1) bit offsets of the two parents' fields in a random draw.
        n_rows: 2B, the number of rows of the global stacked batch.
        distributed: whether the embeddings were gathered from more than one rank.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    excluded: tuple[torch.Tensor, torch.Tensor]
    self_bias: torch.Tensor
    minus_inf: torch.Tensor
    draw_shifts: torch.Tensor
    n_rows: int
    distributed: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.self_bias.dtype


@functools.lru_cache(maxsize=32)
def _layout(local_b: int, world: int, rank: int, device: torch.device, dtype: torch.dtype) -> _Layout:
    # Built once per (batch size, rank, device): the training loop calls the loss with the same
    # shapes every step, so masks and indices are reused instead of rebuilt.
    global_b = local_b * world
    n_rows = 2 * global_b
    local = torch.arange(local_b, device=device) + rank * local_b
    rows = torch.cat([local, local + global_b])  # (A,)
    pos = (rows + global_b) % n_rows  # (A,)
    anchors = torch.arange(rows.numel(), device=device)
    excluded = (torch.cat([anchors, anchors]), torch.cat([rows, pos]))  # (2A,) each
    # An additive 0/-inf mask: adding one is ~10x cheaper on CPU than masked_fill with a bool mask.
    self_bias = torch.zeros((rows.numel(), n_rows), dtype=dtype, device=device)
    self_bias[anchors, rows] = -math.inf
    minus_inf = torch.tensor(-math.inf, dtype=dtype, device=device)
    draw_shifts = torch.tensor([0, _DRAW_BITS], device=device).view(2, 1, 1)
    return _Layout(rows, pos, excluded, self_bias, minus_inf, draw_shifts, n_rows, world > 1)


def _gram(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` in ``dtype``, outside autocast: the backward's matmuls run in it too."""
    if not torch.is_autocast_enabled(a.device.type):
        return torch.mm(a.to(dtype), b.to(dtype).T, out=out)
    with torch.autocast(a.device.type, enabled=False):
        return torch.mm(a.to(dtype), b.to(dtype).T, out=out)


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


class _Similarities:
    """Detached similarities ``<Z_a, Z_j>`` of the local anchors, computed once per step.

    ``values`` (A, 2B) holds -inf at each anchor's own column and its positive's, so that top-k and
    the sums over real negatives need no mask; the original entries are kept aside and put back
    only inside :meth:`unmasked`, for looking up similarities between arbitrary rows. The matrix
    has K more columns for the synthetic negatives' similarities, so that the loss treats all
    ``2B - 2 + K`` negatives of a row in one pass.

    Attributes:
        z_anchor: (A, D) the local anchors' rows of Z (the autograd inputs, with ``z``).
        z: (2B, D) global stacked views.
        table: (A, 2B + K) ``values`` then ``synthetic``.
        values: (A, 2B) similarities, -inf where ``j`` is not a real negative of ``a``.
        synthetic: (A, K) similarities to the synthetic negatives, filled in by :func:`_synthetic`.
        spare: (A, 2B + K) scratch of the same allocation for the loss's second exponential, or None.
        positive: (A,) ``<Z_a, Z_p(a)>``.
    """

    def __init__(self, z: torch.Tensor, layout: _Layout, n_synthetic: int = 0, spare: bool = False) -> None:
        self.z_anchor = z[layout.rows] if layout.distributed else z
        self.z, self._layout, self.draw_shifts = z, layout, layout.draw_shifts
        n = layout.n_rows
        with torch.no_grad():  # the gradient is attached by _DebiasedHardLoss
            # With a spare table in the same allocation: one large block per step instead of two,
            # which glibc keeps mapped from step to step rather than unmapping and faulting in again.
            shape = (1 + spare, layout.rows.numel(), n + n_synthetic)
            tables = torch.empty(shape, dtype=layout.dtype, device=z.device)
            table = tables[0]
            values = _gram(self.z_anchor, z, layout.dtype, out=table[:, :n])
            self._excluded_values = values[layout.excluded]  # (2A,): self, then positive
            values.index_put_(layout.excluded, layout.minus_inf)
        self.table, self.values, self.synthetic = table, values, table[:, n:]
        self.spare = tables[1] if spare else None
        self.positive = self._excluded_values[layout.rows.numel() :]

    @contextlib.contextmanager
    def unmasked(self) -> Iterator[torch.Tensor]:
        """Yields ``values`` with the excluded entries restored, masking them again on exit."""
        self.values.index_put_(self._layout.excluded, self._excluded_values)
        try:
            yield self.values
        finally:
            self.values.index_put_(self._layout.excluded, self._layout.minus_inf)


@dataclass(frozen=True)
class _Synthetic:
    """How the synthetic similarities depend on real ones (their values sit in ``sims.synthetic``).

    Attributes:
        parents: per parent (one for copy, two for mix), ``(index, weight)``: index (A, K) locates
            the parent (a column of ``table``, or a global row when ``table`` is None) and weight
            (A, K) is ``d <Z_a, h> / d <Z_a, Z_parent>`` with the parents held fixed (None for 1).
        table: (A, P) global rows of each anchor's hard pool, or None.
    """

    parents: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    table: torch.Tensor | None


class _DebiasedHardLoss(torch.autograd.Function):
    """Per-anchor ``-log(pos / (pos + Ng))`` of ``method.md`` step 3, with a hand-written backward.

    With ``N = 2B - 2 + K``, ``w_v = exp(beta s_v / t)`` and ``e_v = exp(s_v / t)`` over ``V_a`` (the
    real negatives plus the synthetic ones, one row of ``sims.table``): ``R = N sum(w e) / sum(w)``,
    ``Ng = max((R - tau_plus N pos) / (1 - tau_plus), N exp(-1/t))``, all in log space. Every exp is
    taken once and shifted by the anchor's largest negative similarity; the backward reuses them
    (in place) and needs only the matmuls of a plain ``Z @ Z.T`` (one, ``(G + G^T) @ Z``, when all
    rows are local anchors). A synthetic similarity is a fixed combination of real ones (its parents
    are detached), so its gradient reaches the anchor only. Autograd through the same steps would
    recompute the exps, add transposed (2B, 2B) copies and some fifty small ops, which dominate at
    small batches.
    """

    @staticmethod
    def forward(ctx, z_anchor, z, sims, row_max, synthetic, pos, temperature, beta, tau_plus):  # noqa: D102
        inv_t = 1.0 / temperature
        table = sims.table  # (A, 2B + K)
        n_neg = table.shape[1] - 2  # N
        shift = row_max  # (A,): keeps every exponent <= 0
        if synthetic is not None:
            shift = torch.maximum(shift, sims.synthetic.amax(dim=1))
        # exp(c (s_v - shift) / t), one pass each, and its row sum (>= 1: the shift's own term is
        # exp(0)); -inf off the negatives. The last one overwrites the table: sims is spent.
        shift = shift[:, None]
        w = sum_w = None
        if beta:
            w = torch.add(shift * (-beta * inv_t), table, alpha=beta * inv_t, out=sims.spare).exp_()
            sum_w = w.sum(dim=1)
        c = (1.0 + beta) * inv_t
        we = torch.add(shift * -c, table, alpha=c, out=table).exp_()
        sum_we = we.sum(dim=1)
        shift = shift[:, 0]
        log_pos = sims.positive * inv_t
        # log R = log N + log sum(w e) - log sum(w); sum(w) = N without hardness weights.
        log_r = torch.log(sum_we).add_(shift * inv_t)
        if beta:
            log_r = log_r.sub_(torch.log(sum_w)).add_(math.log(n_neg))
        log_floor = math.log(n_neg) - inv_t
        x = None
        if tau_plus > 0:
            # log Ng = log R + log(1 - tau N pos / R) - log(1 - tau); x = log(tau N pos / R) >= 0
            # means R - tau N pos <= 0 and Ng falls to the floor (log(0) = -inf below).
            x = (log_pos - log_r).add_(math.log(tau_plus * n_neg)).clamp_max_(0.0)
            debiased = torch.expm1(x).neg_().log_().add_(log_r).sub_(math.log1p(-tau_plus))
        else:
            debiased = log_r
        margin = debiased.clamp_min(log_floor).sub_(log_pos)  # log Ng - log pos
        ctx.save_for_backward(z_anchor, z, we, sum_we, w, sum_w, pos, debiased, margin, x)
        ctx.synthetic, ctx.log_floor, ctx.n_real = synthetic, log_floor, sims.values.shape[1]
        ctx.all_anchors = z_anchor is z  # one process: every row of Z is an anchor
        ctx.temperature, ctx.beta, ctx.spent = temperature, beta, False
        return F.softplus(margin)  # -log(pos / (pos + Ng))

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        if ctx.spent:
            raise RuntimeError(
                "the contrastive loss supports one backward pass per forward (its backward reuses the "
                "forward's buffers); compute the loss again to differentiate it again"
            )
        ctx.spent = True
        z_anchor, z, we, sum_we, w, sum_w, pos, debiased, margin, x = ctx.saved_tensors
        synthetic, t, beta = ctx.synthetic, ctx.temperature, ctx.beta
        grad_margin = torch.sigmoid(margin).mul_(grad_loss)  # (A,)
        # d log Ng / d log R (0 on the floor); d log Ng / d log pos = 1 - that off the floor.
        active = debiased > ctx.log_floor
        if x is not None:
            d_log_r = torch.where(active, torch.expm1(x).reciprocal_().neg_(), 0.0)  # 1 / (1 - tau N pos / R)
        else:
            d_log_r = active.to(grad_margin.dtype)
        grad_log_r = d_log_r.mul_(grad_margin)
        grad_log_pos = torch.where(active, grad_log_r, grad_margin).neg_()
        # d log sum_v exp(c s_v / t) / d s_v = c / t * exp(c (s_v - shift) / t) / sum: the saved exps.
        grad = we.mul_((grad_log_r * ((1.0 + beta) / t) / sum_we)[:, None])  # (A, 2B + K), in place
        if beta:
            grad.addcmul_(w, (grad_log_r * (-beta / t) / sum_w)[:, None])
        real = grad[:, : ctx.n_real]  # (A, 2B)
        real.scatter_add_(1, pos[:, None], (grad_log_pos / t)[:, None])
        if ctx.all_anchors:
            # Every row is an anchor, and s(a, j) = <Z_a, Z_j> passes its gradient to
            # both rows, so (G + G^T) @ Z replaces the partners' own matmul.
            _add_transpose_(real)
            grad_z = None
        else:
            grad_z = real.T.to(z.dtype) @ z_anchor  # (2B, D): the anchors' partners
        if synthetic is not None:  # detached parents: the synthetic terms reach the anchor only
            grad_syn = grad[:, ctx.n_real :]  # (A, K)
            # Accumulated per pool member first: a small (A, P) target instead of (A, 2B).
            table = synthetic.table
            target = real if table is None else torch.zeros(table.shape, dtype=grad.dtype, device=grad.device)
            for index, weight in synthetic.parents:  # the weights are spent with the graph
                target.scatter_add_(1, index, grad_syn if weight is None else weight.mul_(grad_syn))
            if table is not None:
                real.scatter_add_(1, table, target)
        grad_anchor = real.to(z.dtype) @ z  # (A, D)
        return grad_anchor, grad_z, None, None, None, None, None, None, None


def _add_transpose_(g: torch.Tensor) -> torch.Tensor:
    """``g += g.T`` in place for a square (n, n) matrix, possibly a strided view.

    Adding a transposed view walks memory across rows, slower than the matmul it saves at
    n = 1024; tile pairs that fit in L2 keep it to a few streaming passes.
    """
    tile = 512 if g.element_size() <= 4 else 256
    n = g.shape[0]
    total = g.new_empty((min(tile, n), min(tile, n)))
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper, lower = g[i : i + tile, j : j + tile], g[j : j + tile, i : i + tile]
            both = torch.add(upper, lower.T, out=total[: upper.shape[0], : upper.shape[1]])
            upper.copy_(both)
            if j != i:
                lower.copy_(both.T)
    return g


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
    synthetic: _Synthetic | None = None,
    row_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor ``-log(pos / (pos + Ng))`` of ``method.md`` step 3 (consumes ``sims``).

    Args:
        sims: similarities of the local anchors.
        layout: where the anchors and positives are.
        synthetic: the synthetic negatives; None for K = 0.
        row_max: (A,) largest real-negative similarity per anchor, when already known.

    Returns:
        (A,) per-anchor loss.
    """
    if row_max is None:
        row_max = sims.values.amax(dim=1)
    return _DebiasedHardLoss.apply(
        sims.z_anchor, sims.z, sims, row_max, synthetic, layout.pos, temperature, beta, tau_plus
    )


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
    sims = _Similarities(z, layout, spare=beta > 0)
    per_anchor = _debiased_hard_loss(sims, layout, temperature=temperature, beta=beta, tau_plus=tau_plus)
    return _reduce(per_anchor, reduction)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers that sort exactly as the floats x (no NaN).

    A float's bit pattern read as a signed integer is ordered for x >= 0 and reversed for x < 0;
    flipping all but the sign bit of the negative ones restores the order.
    """
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    sign = bits >> (8 * bits.element_size() - 1)  # -1 for negative x, else 0
    return sign.bitwise_and_(torch.iinfo(bits.dtype).max).bitwise_xor_(bits)


def _rank_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """(A, k) column indices of the k largest entries of each row of x, in no particular order.

    Ranks integers rather than floats (topk then skips its NaN checks, ~1.5x faster on CPU). The
    bit patterns themselves are in float order for x >= 0 and below every such pattern for x < 0,
    so when every picked pattern is >= 0 the pick is exact (a row with fewer than k positive
    entries fails the check); otherwise the rows are ranked again on :func:`_order_keys`.
    """
    if x.device.type != "cpu":  # accelerators rank floats fast, and the check would synchronise
        return x.topk(k, dim=1, sorted=False).indices
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    picked, indices = bits.topk(k, dim=1, sorted=False)
    if picked.min() < 0:
        indices = _order_keys(x).topk(k, dim=1, sorted=False).indices
    return indices


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x (A, n): ``x.topk(k, dim=1, sorted=False)``, exactly.

    Rows are ranked on integer keys (:func:`_rank_top_k`). When k is small against n it takes two
    cheaper passes. The columns are dealt into m blocks of s (block b = columns b, b + m, ...,
    b + (s - 1) m; s ~ sqrt(n / k) divides n). Let tau be the k-th largest block maximum: the k
    blocks with the largest maxima hold k entries >= tau, so every top-k entry is >= tau, and an
    entry above tau lies in a block whose maximum is above tau, one of those k. The top k of their
    k * s entries is therefore a top k of the row (ties at tau aside, which topk also breaks
    arbitrarily), found by ranking m + k * s entries instead of n.

    Returns:
        values, indices: each (A, k), in no particular order.
    """
    n_anchors, n = x.shape
    s = next((d for d in range(math.isqrt(n // k) if k else 0, 2, -1) if n % d == 0), 0)
    if not s or x.device.type != "cpu":  # too few blocks to pay for the extra pass, or a GPU's topk
        indices = _rank_top_k(x, k)
        return x.gather(1, indices), indices
    m = n // s
    slices = x.unflatten(1, (s, m))  # (A, s, m): column i * m + b is entry i of block b
    blocks = _rank_top_k(slices.amax(dim=1), k)  # (A, k)
    candidates = slices.gather(2, blocks[:, None, :].expand(-1, s, -1)).view(n_anchors, s * k)
    picked = _rank_top_k(candidates, k)  # (A, k) positions i * k + (rank of the block)
    indices = torch.div(picked, k, rounding_mode="floor").mul_(m).add_(blocks.gather(1, picked % k))
    return candidates.gather(1, picked), indices


@dataclass(frozen=True)
class _Draw:
    """``method.md`` steps 1-2 for each anchor: its hard pool and K parent pairs drawn from it.

    Attributes:
        pool: (A, n_hard) global rows of the anchor's most similar real negatives, in no order.
        pool_sims: (A, n_hard) their similarities to the anchor.
        picks: (2, A, K) positions in the pool of ``j1`` and of ``j2``.
        alpha: (A, K) weights of ``j1``.
    """

    pool: torch.Tensor
    pool_sims: torch.Tensor
    picks: torch.Tensor
    alpha: torch.Tensor


def _draw(sims: _Similarities, n_hard: int, n_synthetic: int, generator: torch.Generator | None) -> _Draw:
    """Uniform draws with replacement from each anchor's pool, and ``alpha ~ U[0, 1)``.

    One 63-bit random integer per synthetic negative supplies all three values (21 bits each):
    a third of the generator calls of three separate draws, which dominate at large K on CPU. A
    pool position is ``floor(r * n_hard / 2^21)``: uniform up to a relative bias below
    ``n_hard / 2^21``; alpha has a resolution of ``2^-21``.
    """
    pool_sims, pool = _top_k(sims.values, n_hard)  # (A, n_hard) each
    n_anchors, device = pool.shape[0], pool.device
    draw_device = generator.device if generator is not None else device
    bits = torch.empty((n_anchors, n_synthetic), dtype=torch.int64, device=draw_device)
    bits = bits.random_(generator=generator).to(device)  # uniform on [0, 2^63)
    fields = bits >> sims.draw_shifts  # (2, A, K): bits 0-20 and 21-41 in the low bits
    picks = fields.bitwise_and_((1 << _DRAW_BITS) - 1).mul_(n_hard).bitwise_right_shift_(_DRAW_BITS)
    alpha = bits.bitwise_right_shift_(2 * _DRAW_BITS).to(pool_sims.dtype).mul_(2.0**-_DRAW_BITS)
    return _Draw(pool, pool_sims, picks, alpha)


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
        draw = _draw(_Similarities(z, layout), n_hard, n_synthetic, generator)
        return Mixing(draw.pool.gather(1, draw.picks[0]), draw.pool.gather(1, draw.picks[1]), draw.alpha)


@torch.no_grad()
def _synthetic(
    sims: _Similarities,
    layout: _Layout,
    mode: Mode,
    alpha: torch.Tensor,
    parents: tuple[torch.Tensor, torch.Tensor],
    draw: _Draw | None = None,
) -> _Synthetic:
    """Fills ``sims.synthetic`` with ``<Z_a, h>`` for every synthetic negative, from real entries.

    For unit rows, ``||alpha x + (1 - alpha) y||^2 = 1 - 2 alpha (1 - alpha) (1 - <x, y>)``, so
    ``<Z_a, h> = (alpha s(a, j1) + (1 - alpha) s(a, j2)) / ||.||``: no (A, K, D) tensor.

    Args:
        alpha: (A, K) weights of j1.
        parents: (j1, j2), each (A, K): global rows, or positions in ``draw.pool`` when drawn.
        draw: the draw the parents come from, if any.

    Returns:
        How the synthetic similarities depend on the real ones, for the backward.
    """
    p1, p2 = parents
    table = draw.pool if draw is not None else None
    with sims.unmasked() as values:  # a given recipe may name any row, and parents pair up freely
        if draw is None:
            s1, s2 = values.gather(1, p1), values.gather(1, p2)
        else:
            s1, s2 = draw.pool_sims.gather(1, p1), draw.pool_sims.gather(1, p2)
        if mode == "copy":
            sims.synthetic.copy_(s1)
            return _Synthetic(((p1, None),), table)
        if layout.distributed:
            # Parents may live on other ranks: their mutual similarity needs the full (2B, 2B).
            j1, j2 = (p1, p2) if draw is None else (draw.pool.gather(1, p1), draw.pool.gather(1, p2))
            s12 = _gram(sims.z, sims.z, layout.dtype)[j1, j2]
        else:  # every row is an anchor here: look the pair up in the table (row stride 2B + K)
            stride = sims.table.stride(0)
            if draw is None:
                flat = (p1 * stride).add_(p2)
            else:
                flat = (draw.pool * stride).gather(1, p1).add_(draw.pool.gather(1, p2))
            s12 = sims.table.view(-1).index_select(0, flat.view(-1)).view_as(flat)  # (A, K)
    # 1 / ||alpha x + (1 - alpha) y|| = (1 - 2 u (1 - <x, y>))^(-1/2), u = alpha (1 - alpha).
    u = torch.addcmul(alpha, alpha, alpha, value=-1.0)
    inv_norm = s12.sub_(1.0).mul_(u).mul_(2.0).add_(1.0).clamp_min_(1e-12).rsqrt_()
    w1 = alpha * inv_norm
    w2 = inv_norm.sub_(w1)  # (1 - alpha) / ||.||
    torch.mul(s1, w1, out=sims.synthetic).addcmul_(s2, w2)
    return _Synthetic(((p1, w1), (p2, w2)), table)


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
    sims = _Similarities(z, layout, n_synthetic, spare=beta > 0)
    synthetic = row_max = None
    if n_synthetic > 0:
        if mixing is None:
            draw = _draw(sims, n_hard, n_synthetic, generator)
            synthetic = _synthetic(sims, layout, mode, draw.alpha, tuple(draw.picks), draw)
            row_max = draw.pool_sims.amax(dim=1)
        else:
            j1, j2, alpha = (t.to(z.device) for t in _check_mixing(Mixing(*mixing), layout.rows.numel(), n_synthetic, n_rows))
            if j1.shape[0] != layout.rows.numel():  # global recipe: keep the local anchors
                j1, j2, alpha = j1[layout.rows], j2[layout.rows], alpha[layout.rows]
            synthetic = _synthetic(sims, layout, mode, alpha.to(sims.values.dtype), (j1, j2))
    per_anchor = _debiased_hard_loss(
        sims, layout, temperature=temperature, beta=beta, tau_plus=tau_plus, synthetic=synthetic, row_max=row_max
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
    sims = _Similarities(z, layout, n_synthetic)
    real = sims.values[torch.isfinite(sims.values)]
    if n_synthetic == 0:
        return real, real.new_empty(0)
    draw = _draw(sims, n_hard, n_synthetic, generator)
    _synthetic(sims, layout, mode, draw.alpha, tuple(draw.picks), draw)
    return real, sims.synthetic.flatten()
