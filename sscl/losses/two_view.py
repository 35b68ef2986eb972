"""Two-view contrastive losses: NT-Xent, DCL, HCL and SSCL, written as the steps of ``shared/method.md``.

Notation: a batch of B images gives two L2-normalised views ``z1, z2`` (B, D), stacked as ``Z = [z1; z2]``
(2B, D). Row ``a`` is an anchor, its positive is row ``p(a) = (a + B) mod 2B``, its real negatives are the
other 2B - 2 rows; ``s(a, j) = <Z_a, Z_j>``, temperature ``t``. Similarities are float32 (float64 for
float64 inputs), also under bf16 autocast, and sums over negatives are taken in log space.

Under ``torch.distributed`` with more than one rank, ``z1``/``z2`` are gathered from every rank (gradient
flows back to the local part), B and N count *global* rows, and each rank computes the loss of its own A
anchors: averaged over ranks (as DDP does), it equals the single-process loss on the concatenated batch.

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

import torch
import torch.nn.functional as F

from sscl.losses.steps import (LossDiagnostics, Mixing, Mode, Reduction, debiased_hard_loss,
                                draw_from_hard_pool, hyperparameter_problems, loss_diagnostics, mixed_similarities)

__all__ = ["dcl_loss", "draw_mixing", "hcl_loss", "negative_similarities", "nt_xent", "sscl_loss", "world_and_rank"]


@dataclass(frozen=True)
class _Batch:
    """This process's anchors in the global ``Z`` (2B, D), in float32 (float64 for float64 inputs).

    ``anchors`` (A, D): the rows of ``z`` whose loss this process computes (``z`` itself in one process),
    at global ``rows`` (A,); ``pos`` (A,): their positives' rows; ``positive`` (A,): ``s(a, p(a))``;
    ``self_mask``/``negative_mask`` (A, 2B): -inf at the anchor's own column (and its positive's), else 0.
    """

    z: torch.Tensor
    anchors: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    positive: torch.Tensor
    self_mask: torch.Tensor
    negative_mask: torch.Tensor


@functools.lru_cache(maxsize=16)
def _masks(local_b: int, world: int, rank: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # Once per (batch size, rank, device): training asks for the same every step. The masks are
    # additive, so that the similarity matmul (addmm) applies them for free, forward and backward.
    b = local_b * world
    local = torch.arange(local_b, device=device) + rank * local_b
    rows = torch.cat([local, local + b])  # (A,)
    pos = (rows + b) % (2 * b)  # (A,)
    columns = torch.arange(2 * b, device=device)  # (2B,)
    is_self, is_pos = columns == rows[:, None], columns == pos[:, None]  # (A, 2B) each
    zero = torch.zeros(is_self.shape, dtype=dtype, device=device)
    return rows, pos, zero.masked_fill(is_self, -math.inf), zero.masked_fill(is_self | is_pos, -math.inf)


def world_and_rank() -> tuple[int, int]:
    """``(world size, rank)`` of the ``torch.distributed`` group, ``(1, 0)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _batch(z1: torch.Tensor, z2: torch.Tensor) -> _Batch:
    """Stacks the views, gathered from every rank with gradient to the local part."""
    world, rank = world_and_rank()
    dtype = torch.promote_types(z1.dtype, torch.float32)
    positive = (z1.to(dtype) * z2.to(dtype)).sum(dim=1).repeat(2)  # (A,): both rows of a pair are local
    rows, pos, self_mask, negative_mask = _masks(z1.shape[0], world, rank, z1.device, dtype)
    if world > 1:
        from torch.distributed.nn.functional import all_gather  # differentiable gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still supported
            warnings.simplefilter("ignore", FutureWarning)
            z1, z2 = torch.cat(all_gather(z1.contiguous())), torch.cat(all_gather(z2.contiguous()))
    z = torch.cat([z1, z2]).to(dtype)  # (2B, D)
    return _Batch(z, z if world == 1 else z[rows], rows, pos, positive, self_mask, negative_mask)


def _similarities(batch: _Batch, anchor_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s(a, j)`` (A, 2B), -inf off the real negatives, outside autocast.

    With ``anchor_only`` also ``s(a, j)`` unmasked whose gradient reaches the anchor only, for the synthetic
    negatives (their parents are detached). Autograd cannot send some entries of one product to one side
    only, so the first then takes the other row's gradient from a second product of the same value."""
    anchors, z, mask = batch.anchors, batch.z, batch.negative_mask
    with torch.autocast(z.device.type, enabled=False):
        if not anchor_only:
            return torch.addmm(mask, anchors, z.T), None
        to_fixed = anchors @ z.detach().T
        partner = torch.addmm(mask, anchors.detach(), z.T)
    return partner.add_(to_fixed - to_fixed.detach()), to_fixed  # the value of partner, gradient to both rows


def _synthetic_similarities(to_fixed: torch.Tensor, batch: _Batch, mixing: Mixing, mode: Mode) -> torch.Tensor:
    """Step 2: ``s(a, h)`` (A, K), from the similarities to the parents by :func:`mixed_similarities`'s
    identity: no (A, K, D) tensor. ``to_fixed`` (A, 2B): ``s(a, j)`` with gradient to the anchor only."""
    j1, j2, alpha = mixing
    s1, s2 = to_fixed.gather(1, torch.cat([j1, j2], dim=1)).chunk(2, dim=1)  # (A, K) each
    if mode == "copy":
        return s1
    with torch.no_grad(), torch.autocast(to_fixed.device.type, enabled=False):
        gram = to_fixed if batch.anchors is batch.z else batch.z @ batch.z.T  # (2B, 2B): <Z_i, Z_j> of all rows
        s12 = gram.take(j1 * gram.shape[1] + j2)  # (A, K) <Z[j1], Z[j2]>
    return mixed_similarities(s1, s2, s12, alpha)


def _local_mixing(mixing: Mixing, batch: _Batch, n_synthetic: int) -> Mixing:
    n_anchors, n = batch.anchors.shape[0], batch.z.shape[0]
    for name, t in zip(("j1", "j2", "alpha"), mixing):
        if t.shape not in ((n_anchors, n_synthetic), (n, n_synthetic)):
            raise ValueError(f"mixing {name} must have shape (2B, n_synthetic) = ({n}, {n_synthetic}), "
                             f"got {tuple(t.shape)}")
    local = Mixing(*(t.to(batch.z.device) for t in mixing))
    return local if local.j1.shape[0] == n_anchors else Mixing(*(t[batch.rows] for t in local))


def _negatives(batch: _Batch, *, n_hard: int, n_synthetic: int, mode: Mode, mixing: Mixing | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Steps 1-2: (A, 2B + K) similarities to the real negatives (-inf at the anchor's own column and its
    positive's), then to the K synthetic ones."""
    real_negatives, to_fixed = _similarities(batch, anchor_only=n_synthetic > 0)  # (A, 2B) each
    if n_synthetic == 0:
        return real_negatives
    if mixing is None:
        mixing = draw_from_hard_pool(real_negatives, n_hard, n_synthetic, generator)
    else:
        mixing = _local_mixing(Mixing(*mixing), batch, n_synthetic)
    return torch.cat([real_negatives, _synthetic_similarities(to_fixed, batch, mixing, mode)], dim=1)


def _check(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.0, tau_plus: float = 0.0,
           reduction: str = "mean", n_hard: int = 0, n_synthetic: int = 0, mode: str = "mix", mixing: object = None
           ) -> None:
    if z1.ndim != 2:
        raise ValueError(f"z1 must have shape (B, D), got {tuple(z1.shape)}")
    b = z1.shape[0] * world_and_rank()[0]  # global
    problems = [message for ok, message in [
        (z1.shape == z2.shape, f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"),
        (z1.is_floating_point() and z2.is_floating_point(), f"z1 and z2 must be floating, got {z1.dtype}, {z2.dtype}"),
        (b >= 2, f"z1 must hold a batch of B >= 2 (over all ranks), got B = {b}"),
    ] if not ok] + hyperparameter_problems(temperature=temperature, beta=beta, tau_plus=tau_plus,
                                           reduction=reduction, n_hard=n_hard, n_synthetic=n_synthetic, mode=mode,
                                           mixing=mixing, pool=2 * b - 2, pool_name="2B - 2")
    if problems:
        raise ValueError("; ".join(problems))


def sscl_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, beta: float, tau_plus: float, n_hard: int,
              n_synthetic: int, mode: Mode = "mix", mixing: Mixing | tuple[torch.Tensor, ...] | None = None,
              generator: torch.Generator | None = None, reduction: Reduction = "mean",
              return_diagnostics: bool = False) -> torch.Tensor | tuple[torch.Tensor, LossDiagnostics]:
    """SSCL (Dong et al., arXiv 2304.02971): HCL+DCL over real plus K synthetic hard negatives.

    Each anchor gets K detached synthetic negatives mixed from pairs of its ``n_hard`` hardest real
    negatives (``mode="mix"``: ``h = unit(alpha Z[j1] + (1 - alpha) Z[j2])``, the paper) or copied
    from one of them (``mode="copy"``: ``h = Z[j1]``, the released code). With ``N = 2B - 2 + K``:
    ``R = N sum(w e) / sum(w)``, ``Ng = max((R - tau_plus N pos) / (1 - tau_plus), N e^{-1/t})``,
    loss ``= -log(pos / (pos + Ng))``. K = 0 is HCL.

    Args:
        z1: (B, D), L2-normalised projections of the first view. z2: (B, D), of the second view.
        temperature: t > 0. beta: hardness concentration >= 0. tau_plus: class prior in [0, 1).
        n_hard: size of each anchor's hard pool, <= 2B - 2. n_synthetic: K >= 0. mode: "mix" or "copy".
        mixing: optional ``(j1, j2, alpha)``, each (2B, K): absolute row indices into ``cat([z1, z2])``
            (global under distributed training) and the weight of ``j1``. None: drawn as by
            :func:`draw_mixing` with ``generator``.
        generator: RNG for that draw. reduction: "mean" or "none".
        return_diagnostics: also return a :class:`LossDiagnostics`.

    Returns:
        Scalar mean over the anchors, or (A,) per-anchor values; ``(loss, diagnostics)`` when asked.

    Raises:
        ValueError: naming the argument on bad shapes or values.
    """
    _check(z1, z2, temperature=temperature, beta=beta, tau_plus=tau_plus, reduction=reduction, n_hard=n_hard,
           n_synthetic=n_synthetic, mode=mode, mixing=mixing)
    batch = _batch(z1, z2)
    negatives = _negatives(batch, n_hard=n_hard, n_synthetic=n_synthetic, mode=mode, mixing=mixing,
                           generator=generator)  # (A, 2B + K)
    n_rows = batch.z.shape[0]
    per_anchor, on_floor = debiased_hard_loss(batch.positive / temperature, negatives, n_rows - 2 + n_synthetic,
                                               temperature=temperature, beta=beta, tau_plus=tau_plus)  # step 3
    loss = per_anchor.mean() if reduction == "mean" else per_anchor
    synthetic = negatives[:, n_rows:] if n_synthetic else None  # (A, K)
    return (loss, loss_diagnostics(on_floor, negatives[:, :n_rows], synthetic)) if return_diagnostics else loss


def hcl_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, beta: float, tau_plus: float,
             reduction: Reduction = "mean", return_diagnostics: bool = False) -> torch.Tensor | tuple:
    """Hard-negative contrastive loss (Robinson et al. 2021): ``method.md`` step 3 with K = 0.

    ``R = N * sum_v(w_v e_v) / sum_v(w_v)`` with ``w_v = exp(beta * s_v / t)``, then debiased as DCL.
    Args, Returns, Raises: as :func:`sscl_loss`.
    """
    return sscl_loss(z1, z2, temperature=temperature, beta=beta, tau_plus=tau_plus, n_hard=0, n_synthetic=0,
                     reduction=reduction, return_diagnostics=return_diagnostics)


def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, tau_plus: float,
             reduction: Reduction = "mean", return_diagnostics: bool = False) -> torch.Tensor | tuple:
    """Debiased contrastive loss (Chuang et al. 2020): ``method.md`` step 3 with beta = 0, K = 0.

    ``Ng = max((sum_v e_v - tau_plus * N * pos) / (1 - tau_plus), N * exp(-1/t))``, N = 2B - 2.
    Args, Returns, Raises: as :func:`sscl_loss`.
    """
    return hcl_loss(z1, z2, temperature=temperature, beta=0.0, tau_plus=tau_plus, reduction=reduction,
                    return_diagnostics=return_diagnostics)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, reduction: Reduction = "mean",
            return_diagnostics: bool = False) -> torch.Tensor | tuple[torch.Tensor, LossDiagnostics]:
    """NT-Xent (SimCLR): ``-log(pos_a / sum_{v != a} e_v)``: the denominator holds the positive once.

    Args, Returns, Raises: as :func:`sscl_loss`; the diagnostics' floor fraction is 0.
    """
    _check(z1, z2, temperature=temperature, reduction=reduction)
    batch = _batch(z1, z2)
    with torch.autocast(batch.z.device.type, enabled=False):  # (A, 2B) s(a, j) / t, -inf at the anchor's column
        logits = torch.addmm(batch.self_mask, batch.anchors, batch.z.T, alpha=1 / temperature)
    loss = F.cross_entropy(logits, batch.pos, reduction=reduction)  # class p(a): the positive
    if not return_diagnostics:
        return loss
    no_floor = torch.zeros_like(batch.pos, dtype=torch.bool)
    return loss, loss_diagnostics(no_floor, logits.detach() * temperature + batch.negative_mask, None)


def draw_mixing(z1: torch.Tensor, z2: torch.Tensor, *, n_hard: int, n_synthetic: int,
                generator: torch.Generator | None = None) -> Mixing:
    """Draws the synthetic-negative recipe of ``method.md`` steps 1-2 for this process's anchors.

    Each anchor's pool is its ``n_hard`` most similar real negatives (ranked on detached values); ``j1``,
    ``j2`` are drawn uniformly with replacement from it, ``alpha ~ U[0, 1)``. ``sscl_loss(...,
    mixing=None, generator=g)`` performs exactly this draw.

    Args:
        z1, z2: (B, D), L2-normalised. n_hard: pool size, 1 <= n_hard <= 2B - 2. n_synthetic: K >= 0.
        generator: optional RNG for reproducible draws (its device is used for the draw).

    Returns:
        ``Mixing`` with (A, K) tensors of global row indices and weights (A = 2B in one process).
    """
    _check(z1, z2, n_hard=n_hard, n_synthetic=n_synthetic)
    with torch.no_grad():
        return draw_from_hard_pool(_similarities(_batch(z1, z2))[0], n_hard, n_synthetic, generator)


@torch.no_grad()
def negative_similarities(z1: torch.Tensor, z2: torch.Tensor, *, n_hard: int, n_synthetic: int, mode: Mode = "mix",
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-negative cosine similarities, for a histogram; arguments as in :func:`sscl_loss`.

    Returns:
        (A * (2B - 2),) similarities to the real negatives, (A * K,) to synthetic ones drawn as in the loss.
    """
    _check(z1, z2, n_hard=n_hard, n_synthetic=n_synthetic, mode=mode)
    batch = _batch(z1, z2)
    negatives = _negatives(batch, n_hard=n_hard, n_synthetic=n_synthetic, mode=mode, mixing=None, generator=generator)
    n_rows = batch.z.shape[0]
    return negatives[:, :n_rows][torch.isfinite(batch.negative_mask)], negatives[:, n_rows:].flatten()
