"""MoCo's key side: a momentum (EMA) copy of the model and a queue of past keys, as training state.

MoCo (He et al., CVPR 2020; v2: Chen et al., arXiv 2003.04297) contrasts each query with its key, made by
a slowly moving copy of the model, and with a queue of earlier keys: many negatives at a small batch. Here
the queue is state like the weights: it is identical on every worker (each step's keys are gathered from
every rank and enqueued in rank order) and ``state_dict`` holds it, so a resumed run continues bit-exact.
The loss is ``sscl.losses.moco_loss``; ``sscl.train.train_one_epoch(..., moco=...)`` drives a step.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from sscl.losses import world_and_rank

__all__ = ["MomentumQueue", "momentum_at", "queue_digest"]


def momentum_at(step: int, *, base: float, total_steps: int) -> float:
    """EMA momentum at a global step: ``base`` rising to 1 on a half cosine over ``total_steps`` (BYOL's schedule)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere), concatenated in rank order; no gradient."""
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _full(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 keys (autocast) enter the queue in float32


def queue_digest(state: dict) -> str:
    """SHA-256 of a ``MomentumQueue.state_dict()``'s queue bytes and write position: equal digests,
    bit-identical queues."""
    return hashlib.sha256(state["queue"].cpu().numpy().tobytes() + str(state["pointer"]).encode()).hexdigest()


class MomentumQueue:
    """The momentum encoder and the queue of keys of one MoCo training run.

    Args:
        model: the query model (the unwrapped module, on its device, in its memory format): maps images
            to ``(features, z)`` with z L2-normalised. Copied once; later ``update`` follows it.
        queue_size: Q, keys kept. Each step enqueues the keys of both views of every image of the global batch.
        momentum: the EMA momentum at step 0; it rises to 1 over ``total_steps`` (``momentum_at``).
        total_steps: steps of the whole run.
        dim: key size (the projection's ``out_dim``).
        seed: the queue starts as random unit vectors drawn from it (the same on every rank).
    """

    def __init__(self, model: nn.Module, *, queue_size: int, momentum: float, total_steps: int, dim: int,
                 seed: int) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.query = model
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.base, self.total_steps = momentum, total_steps
        device = next(model.parameters()).device
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        start = torch.randn(queue_size, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        self.queue = F.normalize(start, dim=1).to(device)  # (Q, D), float32 (float64 for a float64 model)
        self.pointer = 0  # the next row written

    @torch.no_grad()
    def keys(self, views: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """This worker's keys (2N, D), float32 (or float64), of its views (2N, 3, H, W), in their order.

        The momentum model runs in training mode (BatchNorm on batch statistics, as in MoCo) on the views
        in a random order of the *global* batch (MoCo's shuffled BatchNorm): with several workers each
        encodes a random share of it; with ``model.bn_splits`` (:class:`sscl.models.SplitBatchNorm`) the
        parts of a share are random too. A key's BatchNorm statistics then come from other images than its
        query's, so the two cannot share a batch-level shortcut. The order is drawn on rank 0 and broadcast.
        """
        world, rank = world_and_rank()
        self.model.train()
        everyone = _gather(views, world) if world > 1 else views  # (world * 2N, 3, H, W)
        order = torch.randperm(len(everyone), device=views.device)
        if world > 1:
            torch.distributed.broadcast(order, src=0)
        share = order.view(world, -1)[rank]  # the rows of the global batch this rank encodes
        with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=amp):
            encoded = _full(self.model(everyone[share])[1])
        if world > 1:
            encoded = _gather(encoded, world)  # every share, in ``order``
        keys = torch.empty_like(encoded)
        keys[order] = encoded  # back to the global batch's order
        return keys.view(world, -1, keys.shape[1])[rank]

    @torch.no_grad()
    def update(self, keys: torch.Tensor, step: int) -> None:
        """After the optimiser step ``step`` (global): the momentum model moves towards the query model,
        and every worker's ``keys`` (2N, D) enter the queue, oldest rows overwritten."""
        m = momentum_at(step, base=self.base, total_steps=self.total_steps)
        for key_param, query_param in zip(self.model.parameters(), self.query.parameters()):
            key_param.lerp_(query_param.detach(), 1 - m)
        world, _ = world_and_rank()
        new = (_gather(keys, world) if world > 1 else keys)[-len(self.queue):]  # (2B, D) in rank order, at most Q
        rows = (self.pointer + torch.arange(len(new), device=new.device)) % len(self.queue)
        self.queue[rows] = new.to(self.queue.dtype)
        self.pointer = (self.pointer + len(new)) % len(self.queue)

    def state_dict(self) -> dict:
        """The momentum model, the queue and the write position: all a resumed run needs."""
        return {"model": self.model.state_dict(), "queue": self.queue.clone(), "pointer": self.pointer}

    def digest(self) -> str:
        """``queue_digest`` of this queue."""
        return queue_digest(self.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``; raises ValueError when the queue's shape differs from this run's."""
        if state["queue"].shape != self.queue.shape:
            raise ValueError(f"the checkpoint's queue has shape {tuple(state['queue'].shape)}, this run's "
                             f"{tuple(self.queue.shape)}: model.queue_size or model.out_dim changed")
        self.model.load_state_dict(state["model"])
        self.queue.copy_(state["queue"])
        self.pointer = int(state["pointer"])
