"""Slow, obviously-correct loop references for the losses, written from ``shared/method.md``.

Every anchor is handled on its own with explicit Python loops over its negatives; nothing is shared
with ``sscl.losses``.
"""

from __future__ import annotations

import math

import torch


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    beta: float = 0.0,
    tau_plus: float = 0.0,
    mixing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mode: str = "mix",
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-anchor SSCL/HCL/DCL loss by the formulas; ``mixing=None`` means no synthetic negatives."""
    z = torch.cat([z1, z2])
    two_b = z.shape[0]
    b = two_b // 2
    t = temperature
    losses = []
    for a in range(two_b):
        p = (a + b) % two_b
        pos = torch.exp(torch.dot(z[a], z[p]) / t)
        sims = [torch.dot(z[a], z[v]) for v in range(two_b) if v not in (a, p)]
        if mixing is not None:
            j1, j2, alpha = mixing
            for k in range(j1.shape[1]):
                x, y = z[int(j1[a, k])].detach(), z[int(j2[a, k])].detach()
                al = float(alpha[a, k])
                h = x if mode == "copy" else _unit(al * x + (1 - al) * y)
                sims.append(torch.dot(z[a], h))
        n = len(sims)
        weighted = sum(torch.exp(beta * s / t) * torch.exp(s / t) for s in sims)
        weights = sum(torch.exp(beta * s / t) for s in sims)
        r = n * weighted / weights
        ng = torch.clamp((r - tau_plus * n * pos) / (1 - tau_plus), min=n * math.exp(-1 / t))
        losses.append(-torch.log(pos / (pos + ng)))
    out = torch.stack(losses)
    return out.mean() if reduction == "mean" else out


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent by its own formula: the denominator holds the positive once."""
    z = torch.cat([z1, z2])
    two_b = z.shape[0]
    losses = []
    for a in range(two_b):
        p = (a + two_b // 2) % two_b
        denom = sum(torch.exp(torch.dot(z[a], z[v]) / temperature) for v in range(two_b) if v != a)
        losses.append(-torch.log(torch.exp(torch.dot(z[a], z[p]) / temperature) / denom))
    return torch.stack(losses).mean()


def reference_pool(z1: torch.Tensor, z2: torch.Tensor, n_hard: int) -> list[set[int]]:
    """Each anchor's ``n_hard`` most similar real negatives, by sorting a Python list."""
    z = torch.cat([z1, z2]).detach()
    two_b = z.shape[0]
    pools = []
    for a in range(two_b):
        p = (a + two_b // 2) % two_b
        ranked = sorted((v for v in range(two_b) if v not in (a, p)), key=lambda v: -float(torch.dot(z[a], z[v])))
        pools.append(set(ranked[:n_hard]))
    return pools


def reference_moco(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    beta: float = 0.0,
    tau_plus: float = 0.0,
    mixing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mode: str = "mix",
) -> torch.Tensor:
    """Mean over queries of the SSCL loss on a queue, by the formulas: positive ``k_a`` (detached), real
    negatives every queue row (detached), synthetic ones mixed from the queue rows in ``mixing``."""
    t = temperature
    losses = []
    for a in range(q.shape[0]):
        pos = torch.exp(torch.dot(q[a], k[a].detach()) / t)
        negatives = [queue[v].detach() for v in range(queue.shape[0])]
        if mixing is not None:
            j1, j2, alpha = mixing
            for c in range(j1.shape[1]):
                x, y, al = queue[int(j1[a, c])].detach(), queue[int(j2[a, c])].detach(), float(alpha[a, c])
                negatives.append(x if mode == "copy" else _unit(al * x + (1 - al) * y))
        sims = [torch.dot(q[a], h) for h in negatives]
        n = len(sims)
        weighted = sum(torch.exp(beta * s / t) * torch.exp(s / t) for s in sims)
        weights = sum(torch.exp(beta * s / t) for s in sims)
        ng = torch.clamp((n * weighted / weights - tau_plus * n * pos) / (1 - tau_plus), min=n * math.exp(-1 / t))
        losses.append(-torch.log(pos / (pos + ng)))
    return torch.stack(losses).mean()
