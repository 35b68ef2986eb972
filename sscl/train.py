"""The per-epoch training step, optimisers and the learning-rate schedule; no Ray here.

``train_one_epoch`` consumes any iterable of batches: dicts with ``view1``/``view2`` (augmented on
the CPU beforehand, e.g. by Ray Data) or with ``image`` (uint8, augmented on the training device by
``augment``). It works the same in one process or inside a DDP worker.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from sscl.moco import MomentumQueue

__all__ = ["LARS", "OPTIMIZERS", "EpochResult", "build_optimizer", "lr_at", "train_one_epoch"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR.

    Each parameter's update is scaled by ``trust_coefficient * ||w|| / ||g + wd * w||``; parameter
    groups with ``lars_exclude=True`` (biases, norm layers) skip both the scaling and weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and normalisation parameters (1-D) get no weight decay and no LARS scaling.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def _fused(groups) -> bool | None:
    """PyTorch's fused kernels (one launch for every parameter) when all parameters are on a GPU;
    None lets PyTorch choose (its multi-tensor ``foreach`` path)."""
    params = [p for g in groups for p in g["params"]]
    return True if params and all(p.is_cuda for p in params) else None


def _sgd(groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=_fused(groups))


def _adamw(groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=_fused(groups))


def _lars(groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "lars": _lars, "adamw": _adamw}


def build_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """Builds a registered optimiser; biases and norm parameters are excluded from weight decay.

    Args:
        model: the module whose parameters are optimised.
        name: one of ``OPTIMIZERS`` (sgd, lars, adamw).
        lr: base learning rate (the schedule scales it per step).
        momentum: SGD/LARS momentum, or AdamW's beta1.
        weight_decay: decoupled for AdamW, L2 for SGD/LARS.

    Raises:
        ValueError: on an unknown name (listing the valid ones) or a negative value.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return OPTIMIZERS[name](_param_groups(model, weight_decay), lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_lr``.

    A pure function of the step, so a resumed run continues the same curve.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EpochResult:
    """Attributes: loss (mean over steps), images_per_second, steps, lr (last step's), next_step, and
    ``diagnostics``: the loss's ``LossDiagnostics`` fields averaged over steps (empty unless asked for)."""

    loss: float
    images_per_second: float
    steps: int
    lr: float
    next_step: int
    diagnostics: dict[str, float] = field(default_factory=dict)


def _to_tensor(value: Any, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    lr_schedule: Callable[[int], float],
    start_step: int = 0,
    device: torch.device | str = "cpu",
    augment: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    amp: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    diagnostics: bool = False,
    channels_last: bool = False,
    moco: MomentumQueue | None = None,
) -> EpochResult:
    """Runs one pass of contrastive training.

    Args:
        model: maps (N, 3, H, W) to ``(features, z)`` with z L2-normalised (``ContrastiveModel``).
        batches: dicts with ``view1``/``view2`` float (N, 3, H, W), or ``image`` uint8 (N, H, W, C)
            when ``augment`` is given.
        loss_fn: ``(z1, z2) -> scalar``, e.g. ``sscl.losses.get_loss(...)`` (with ``moco``: see there).
        optimizer: its learning rate is set from ``lr_schedule`` before every step.
        lr_schedule: global step -> learning rate.
        start_step: global step of the first batch (for the schedule after a resume).
        device: training device.
        augment: images (N, H, W, C) uint8 on ``device`` -> two float views, e.g.
            ``TwoViewAugment(...).views``: augmentation on the training device.
        amp: bf16 autocast for the forward pass (the loss computes in float32 internally).
        max_steps: stop after this many steps (for a fixed number of steps per epoch).
        on_step: called with (step index in epoch, detached loss tensor) after each step (e.g. a
            progress bar): reading the tensor waits for the device, so read it only to print it.
        diagnostics: call ``loss_fn(z1, z2, return_diagnostics=True)`` and average its diagnostics.
        channels_last: feed the views in NHWC layout (for a model converted with
            ``model.to(memory_format=torch.channels_last)``).
        moco: train MoCo-style: each view's queries against the other view's keys from this momentum
            encoder and its queue; ``loss_fn`` is then ``(q, k, queue) -> scalar`` (``get_loss(name,
            "moco", ...)``). After each optimiser step the momentum model follows and the keys are enqueued.

    Returns:
        ``EpochResult``; loss is the mean over steps.

    Raises:
        ValueError: if the iterable is empty or a batch lacks the needed keys.
    """
    device = torch.device(device)
    model.train()
    total_loss, steps, images, lr = torch.zeros((), device=device), 0, 0, 0.0
    totals: dict[str, torch.Tensor] = {}  # diagnostics summed on the device: no host sync per step
    start = time.perf_counter()
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            break
        if augment is not None:
            if "image" not in batch:
                raise ValueError(f"augment on the device needs batches with 'image'; got keys {sorted(batch)}")
            view1, view2 = augment(_to_tensor(batch["image"], device))
        else:
            if "view1" not in batch or "view2" not in batch:
                raise ValueError(f"batches need 'view1' and 'view2' (or pass augment=); got keys {sorted(batch)}")
            view1, view2 = _to_tensor(batch["view1"], device), _to_tensor(batch["view2"], device)
        lr = lr_schedule(start_step + steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # One forward over both views: BatchNorm sees the whole two-view batch, as in SimCLR.
        views = torch.cat([view1, view2])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, z = model(views)
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # the loss in float32 also under bf16 autocast
        if moco is None:
            pair = z.chunk(2)  # (z1, z2)
        else:  # queries of both views, each with the other view's key: (q1; q2), (k2; k1), the queue
            keys = moco.keys(views, amp)
            pair = (z, keys.roll(view1.shape[0], dims=0), moco.queue)
        if diagnostics:
            loss, found = loss_fn(*pair, return_diagnostics=True)
            for name, value in asdict(found).items():
                totals[name] = totals.get(name, 0) + value
        else:
            loss = loss_fn(*pair)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if moco is not None:
            moco.update(keys, start_step + steps)
        total_loss += loss.detach()
        steps += 1
        images += view1.shape[0]
        if on_step is not None:
            on_step(steps, loss.detach())
    if steps == 0:
        raise ValueError("the epoch had no batches: the dataset is empty or smaller than one batch")
    mean_loss = float(total_loss) / steps  # waits for the device's last step
    elapsed = time.perf_counter() - start
    return EpochResult(loss=mean_loss, images_per_second=images / elapsed, steps=steps, lr=lr,
                       next_step=start_step + steps, diagnostics={k: float(v) / steps for k, v in totals.items()})
