"""The steps of ``shared/method.md`` that the two-view and the queue losses share.

Notation as in :mod:`sscl.losses.two_view`: A anchors (2B two-view rows, or B queries against a queue), each
with M candidate negatives in a row of similarities ``s(a, v)``; temperature ``t``. The callers build those
rows (from the batch, or from the queue) and hand them here for the draw (steps 1-2), the similarity to a
mixed negative (step 2) and the loss (step 3), so both losses compute them with one piece of code.

Papers:
    DCL: Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020.
    HCL: Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021.
    SSCL: Dong et al., "Synthetic Hard Negative Samples for Contrastive Learning", arXiv 2304.02971.
    MoCHi: Kalantidis et al., "Hard Negative Mixing for Contrastive Learning", NeurIPS 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

__all__ = ["LossDiagnostics", "MODES", "Mixing", "Mode", "REDUCTIONS", "Reduction", "debiased_hard_loss",
           "draw_from_hard_pool", "hyperparameter_problems", "loss_diagnostics", "mixed_similarities"]

Mode = Literal["mix", "copy"]
Reduction = Literal["mean", "none"]
MODES = ("mix", "copy")
REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class Mixing:
    """Synthetic-negative recipe for every anchor.

    Attributes:
        j1: (A, K) int64, indices of the first parent among the anchor's candidate negatives (for the
            two-view loss absolute rows of ``cat([z1, z2])``, for the queue loss rows of the queue).
        j2: (A, K) int64, indices of the second parent.
        alpha: (A, K) float, weight of ``j1``: ``h = unit(alpha * Z[j1] + (1 - alpha) * Z[j2])``.
    """

    j1: torch.Tensor
    j2: torch.Tensor
    alpha: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.j1, self.j2, self.alpha))


@dataclass(frozen=True)
class LossDiagnostics:
    """What the negatives did in one loss evaluation, over this process's anchors.

    Every field is a detached 0-dim tensor: reading it (``float(...)``) is the only synchronisation.

    Attributes:
        floor_fraction: fraction of anchors whose debiased negative term sits on the floor,
            ``Ng = N exp(-1/t)``: their negatives pass no gradient. Always 0 for NT-Xent (no floor).
        hardest_real: mean over anchors of the similarity of the anchor's hardest real negative.
        synthetic_mean: mean similarity of the synthetic negatives to their anchors; NaN when K = 0.
    """

    floor_fraction: torch.Tensor
    hardest_real: torch.Tensor
    synthetic_mean: torch.Tensor


def draw_from_hard_pool(real_negatives: torch.Tensor, n_hard: int, n_synthetic: int,
                        generator: torch.Generator | None) -> Mixing:
    """Steps 1-2: each anchor's hard pool, then K parent pairs drawn from it and their weights.

    ``P_a`` = the ``n_hard`` columns of row ``a`` with the largest similarity (ranked on detached values);
    ``j1, j2 ~ U(P_a)`` independently, with replacement, and ``alpha ~ U[0, 1)``.

    Args:
        real_negatives: (A, M) similarities ``s(a, j)`` to the candidate negatives, -inf at columns that
            are not real negatives (so they are never in the pool).
        n_hard: pool size, 1 <= n_hard <= the number of finite columns per row.
        n_synthetic: K >= 0, the pairs drawn per anchor.
        generator: optional RNG; the draw happens on its device, then moves to ``real_negatives``'.

    Returns:
        ``Mixing`` of (A, K) tensors: column indices into ``real_negatives`` and the weights of ``j1``.
    """
    pool = real_negatives.detach().topk(n_hard, dim=1, sorted=False).indices  # (A, n_hard) columns
    shape, device = (pool.shape[0], n_synthetic), pool.device
    draw_device = generator.device if generator is not None else device
    picks = torch.randint(n_hard, (2, *shape), generator=generator, device=draw_device).to(device)  # (2, A, K)
    alpha = torch.rand(shape, generator=generator, device=draw_device, dtype=real_negatives.dtype).to(device)
    return Mixing(pool.gather(1, picks[0]), pool.gather(1, picks[1]), alpha)  # (A, K) each


def mixed_similarities(s1: torch.Tensor, s2: torch.Tensor, s12: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Step 2: ``s(a, h)`` for ``h = unit(alpha x + (1 - alpha) y)`` without building any (A, K, D) tensor.

    For unit ``x, y``: ``||alpha x + (1 - alpha) y||^2 = 1 - 2 alpha (1 - alpha) (1 - <x, y>)``, so
    ``<a, h> = (alpha <a, x> + (1 - alpha) <a, y>) / ||alpha x + (1 - alpha) y||``. Gradient flows through
    ``s1`` and ``s2`` only (the synthetic vector is detached, its norm too).

    Args:
        s1: (A, K) ``<a, x>``, the similarity to the first parent. s2: (A, K) ``<a, y>``, to the second.
        s12: (A, K) ``<x, y>``, between the parents (detached). alpha: (A, K) weight of ``x`` in [0, 1).

    Returns:
        (A, K) ``<a, h>`` in the dtype of ``s1``.
    """
    with torch.no_grad():
        alpha = alpha.to(s1.dtype)
        norm = (1 - 2 * alpha * (1 - alpha) * (1 - s12.to(s1.dtype))).clamp_min_(1e-12).sqrt_()  # (A, K)
    return torch.lerp(s2, s1, alpha) / norm


def debiased_hard_loss(log_pos: torch.Tensor, negatives: torch.Tensor, n: int, *, temperature: float,
                       beta: float, tau_plus: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the per-anchor loss ``-log(pos / (pos + Ng))``, in log space, and whether Ng is on its floor.

    ``R = N sum_v(w_v e_v) / sum_v(w_v)``, ``e_v = exp(s_v / t)``, ``w_v = exp(beta s_v / t)`` over the
    negatives ``V_a`` of anchor ``a``, ``N = |V_a|``; ``Ng = max((R - tau_plus N pos) / (1 - tau_plus),
    N exp(-1/t))``. beta = 0 is DCL, beta = tau_plus = 0 InfoNCE over ``V_a`` plus the positive.

    Args:
        log_pos: (A,) ``s(a, p(a)) / t``, the positive's logit.
        negatives: (A, M) similarities ``s(a, v)``, -inf at the columns not in ``V_a``.
        n: ``N = |V_a|``, the same for every anchor.
        temperature: t > 0. beta: hardness concentration >= 0. tau_plus: class prior in [0, 1).

    Returns:
        ``(loss, on_floor)``: (A,) losses and (A,) bool, True where ``Ng`` is the floor ``N exp(-1/t)``.
    """
    m = negatives.detach().amax(dim=1, keepdim=True)  # (A, 1)

    def log_sum_exp(scale: float) -> torch.Tensor:  # (A,) log sum_v exp(scale s_v)
        # Shifted by the row's largest s_v, as logsumexp does: exponents <= 0, the largest 0.
        return torch.add(-scale * m, negatives, alpha=scale).exp_().sum(dim=1).log() + scale * m[:, 0]

    # Hardness weights: log R = log N + log sum_v w_v e_v - log sum_v w_v (= log N without them).
    log_r = log_sum_exp((1 + beta) / temperature)
    if beta > 0:
        log_r = log_r + math.log(n) - log_sum_exp(beta / temperature)
    # Debiasing: log(R - tau_plus N pos) = log R + log(1 - exp(y)), y = log(tau_plus N pos / R); for
    # y >= 0 it is <= 0 and Ng is the floor. The stand-in y = -1 keeps the unused branch's gradient
    # finite (torch.where passes it 0 * inf = NaN otherwise).
    log_floor = math.log(n) - 1 / temperature
    debiased = log_r
    if tau_plus > 0:
        y = log_pos + math.log(tau_plus * n) - log_r
        above = y < 0
        debiased = log_r + torch.log(-torch.expm1(torch.where(above, y, -1.0))) - math.log1p(-tau_plus)
        debiased = torch.where(above, debiased, log_floor)
    log_ng = debiased.clamp_min(log_floor)  # the floor N exp(-1/t)
    return torch.logaddexp(log_pos, log_ng) - log_pos, debiased <= log_floor


def loss_diagnostics(on_floor: torch.Tensor, real: torch.Tensor, synthetic: torch.Tensor | None) -> LossDiagnostics:
    """The diagnostics of one loss evaluation, detached.

    Args:
        on_floor: (A,) bool, from :func:`debiased_hard_loss`.
        real: (A, M) similarities to the real negatives, -inf off them.
        synthetic: (A, K) similarities to the synthetic negatives, or None when K = 0.

    Returns:
        Floor fraction, mean of each anchor's largest real similarity, mean synthetic similarity (NaN
        without synthetics).
    """
    with torch.no_grad():
        hardest = real.amax(dim=1).mean()
        synthetic_mean = synthetic.mean() if synthetic is not None else hardest.new_tensor(math.nan)
        return LossDiagnostics(on_floor.to(hardest.dtype).mean(), hardest, synthetic_mean)


def hyperparameter_problems(*, pool: int, pool_name: str, temperature: float = 1.0, beta: float = 0.0,
                            tau_plus: float = 0.0, reduction: str = "mean", n_hard: int = 0, n_synthetic: int = 0,
                            mode: str = "mix", mixing: object = None) -> list[str]:
    """Problems with the hyperparameters both losses take, each a message naming the argument.

    Args:
        pool: the number of real negatives, the largest allowed ``n_hard``; ``pool_name`` names it in the
            message ("2B - 2", "Q"). The others: as :func:`~sscl.losses.two_view.sscl_loss`.

    Returns:
        One message per problem; empty when all are valid.
    """
    return [message for ok, message in [
        (temperature > 0, f"temperature must be > 0, got {temperature}"),
        (0 <= tau_plus < 1, f"tau_plus must be in [0, 1), got {tau_plus}"),
        (beta >= 0, f"beta must be >= 0, got {beta}"),
        (reduction in REDUCTIONS, f"reduction must be one of {REDUCTIONS}, got {reduction!r}"),
        (n_synthetic >= 0, f"n_synthetic must be >= 0, got {n_synthetic}"),
        (0 <= n_hard <= pool, f"n_hard must be in [0, {pool_name} = {pool}] (the real negatives), got {n_hard}"),
        (n_synthetic <= 0 or n_hard >= 1, f"n_hard must be >= 1 when n_synthetic > 0, got {n_hard}"),
        (mode in MODES, f"mode must be one of {MODES}, got {mode!r}"),
        (mixing is None or len(tuple(mixing)) == 3, "mixing must be a triple (j1, j2, alpha)"),
    ] if not ok]
