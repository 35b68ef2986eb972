"""SSCL's negatives on a MoCo key queue: ``shared/method.md`` steps 1-3 with the queue as the real negatives.

Notation as in :mod:`sscl.losses.two_view`; here a query ``q_a`` (B, D) has one positive, its key ``k_a``,
and the Q rows of the queue (made by the momentum encoder, :class:`sscl.moco.MomentumQueue`) as its real
negatives. The steps are the two-view loss's own, from :mod:`sscl.losses.steps`: the hard pool and the draw, the
synthetic similarities by the unit-norm identity, and step 3's hardness weights, debiasing and floor.

Papers:
    MoCo: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020.
    MoCHi: Kalantidis et al., "Hard Negative Mixing for Contrastive Learning", NeurIPS 2020.
"""

from __future__ import annotations

import torch

from sscl.losses.steps import (LossDiagnostics, Mixing, Mode, Reduction, debiased_hard_loss, draw_from_hard_pool,
                               hyperparameter_problems, loss_diagnostics, mixed_similarities)

__all__ = ["moco_loss", "queue_negative_similarities"]


def _queue_negatives(q: torch.Tensor, queue: torch.Tensor, *, n_hard: int, n_synthetic: int, mode: Mode,
                     mixing: Mixing | tuple[torch.Tensor, ...] | None, generator: torch.Generator | None
                     ) -> torch.Tensor:
    """Steps 1-2 on the queue: (B, Q + K) similarities of the queries ``q`` (B, D) to the real negatives,
    the queue (Q, D, detached), then to the K synthetic ones. Float32 (float64) also under autocast."""
    with torch.autocast(q.device.type, enabled=False):
        real = q @ queue.T  # (B, Q): step 1's candidates, all real negatives
    if not n_synthetic:
        return real
    if mixing is None:
        mixing = draw_from_hard_pool(real, n_hard, n_synthetic, generator)
    j1, j2, alpha = (t.to(q.device) for t in mixing)
    for name, t in (("j1", j1), ("j2", j2), ("alpha", alpha)):
        if t.shape != (q.shape[0], n_synthetic):
            raise ValueError(f"mixing {name} must have shape (B, n_synthetic) = ({q.shape[0]}, {n_synthetic}), "
                             f"got {tuple(t.shape)}")
    s1 = real.gather(1, j1)  # (B, K)
    if mode == "copy":
        return torch.cat([real, s1], dim=1)
    with torch.no_grad():  # (B, K) <queue[j1], queue[j2]>; the queue is detached, so (B, K, D) is cheap
        s12 = torch.linalg.vecdot(queue[j1], queue[j2])
    return torch.cat([real, mixed_similarities(s1, real.gather(1, j2), s12, alpha)], dim=1)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, *, temperature: float, beta: float = 0.0,
              tau_plus: float = 0.0, n_hard: int = 0, n_synthetic: int = 0, mode: Mode = "mix",
              mixing: Mixing | tuple[torch.Tensor, ...] | None = None, generator: torch.Generator | None = None,
              reduction: Reduction = "mean", return_diagnostics: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, LossDiagnostics]:
    """SSCL's negatives on a MoCo queue: ``method.md`` steps 1-3 with the queue as the real negatives.

    Query ``q_a``'s positive is its key ``k_a``; its real negatives are the Q queue entries, its hard pool
    the ``n_hard`` most similar of them, and its K synthetic negatives mix two pool members as in
    :func:`~sscl.losses.two_view.sscl_loss`; step 3 with ``N = Q + K``. Gradient flows to ``q`` only
    (``k`` and ``queue`` come from the momentum encoder). beta = tau_plus = 0, K = 0 is MoCo's InfoNCE;
    K = 0 is HCL on the queue. Each rank computes its own queries against the same queue, so the loss
    needs no gather: averaged over ranks (as DDP does) it equals one process's loss on the concatenated batch.

    Args:
        q: (B, D) L2-normalised queries. k: (B, D) their L2-normalised positive keys.
        queue: (Q, D) L2-normalised negatives.
        temperature, beta, tau_plus, n_hard (<= Q), n_synthetic, mode, generator, reduction,
        return_diagnostics: as :func:`~sscl.losses.two_view.sscl_loss`.
        mixing: optional ``(j1, j2, alpha)``, each (B, K): row indices into ``queue`` and weights of ``j1``.

    Returns:
        Scalar mean over the queries, or (B,) values; ``(loss, diagnostics)`` when asked.

    Raises:
        ValueError: naming the argument on bad shapes or values.
    """
    problems = [message for ok, message in [
        (q.ndim == 2 and q.shape == k.shape, f"q and k must have the same shape (B, D), got {tuple(q.shape)} "
                                             f"and {tuple(k.shape)}"),
        (queue.ndim == 2 and queue.shape[0] >= 1 and queue.shape[1:] == q.shape[1:],
         f"queue must have shape (Q, D) = (Q, {q.shape[-1]}) with Q >= 1, got {tuple(queue.shape)}"),
        (all(t.is_floating_point() for t in (q, k, queue)), f"q, k and queue must be floating, got {q.dtype}, "
                                                             f"{k.dtype}, {queue.dtype}"),
    ] if not ok]
    if problems:
        raise ValueError("; ".join(problems))
    problems = hyperparameter_problems(temperature=temperature, beta=beta, tau_plus=tau_plus, reduction=reduction,
                                       n_hard=n_hard, n_synthetic=n_synthetic, mode=mode, mixing=mixing,
                                       pool=queue.shape[0], pool_name="Q")
    if problems:
        raise ValueError("; ".join(problems))
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.to(dtype), k.detach().to(dtype), queue.detach().to(dtype)
        positive = (q * k).sum(dim=1)  # (B,) s(q_a, k_a)
    negatives = _queue_negatives(q, queue, n_hard=n_hard, n_synthetic=n_synthetic, mode=mode, mixing=mixing,
                                 generator=generator)  # (B, Q + K)
    n_real = queue.shape[0]
    per_query, on_floor = debiased_hard_loss(positive / temperature, negatives, n_real + n_synthetic,
                                              temperature=temperature, beta=beta, tau_plus=tau_plus)
    loss = per_query.mean() if reduction == "mean" else per_query
    if not return_diagnostics:
        return loss
    return loss, loss_diagnostics(on_floor, negatives[:, :n_real], negatives[:, n_real:] if n_synthetic else None)


@torch.no_grad()
def queue_negative_similarities(q: torch.Tensor, queue: torch.Tensor, *, n_hard: int, n_synthetic: int,
                                mode: Mode = "mix", generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-negative cosine similarities on the queue, for a histogram; arguments as in :func:`moco_loss`.

    Returns:
        (B * Q,) similarities to the queue's keys, (B * K,) to synthetic ones drawn as in the loss.
    """
    problems = hyperparameter_problems(n_hard=n_hard, n_synthetic=n_synthetic, mode=mode, pool=queue.shape[0],
                                       pool_name="Q")
    if problems:
        raise ValueError("; ".join(problems))
    dtype = torch.promote_types(q.dtype, torch.float32)
    negatives = _queue_negatives(q.to(dtype), queue.to(dtype), n_hard=n_hard, n_synthetic=n_synthetic, mode=mode,
                                 mixing=None, generator=generator)  # (B, Q + K)
    return negatives[:, :queue.shape[0]].flatten(), negatives[:, queue.shape[0]:].flatten()
