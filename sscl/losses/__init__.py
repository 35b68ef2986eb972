"""The contrastive losses and their registry.

- :mod:`sscl.losses.two_view`: NT-Xent, DCL, HCL and SSCL on two views of a batch, the steps of ``method.md``.
- :mod:`sscl.losses.queue`: the same steps with a MoCo key queue as the negatives (``moco_loss``).
- :mod:`sscl.losses.steps`: the steps both share (the draw, the mixed similarity, step 3's loss).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from sscl.losses.queue import moco_loss, queue_negative_similarities
from sscl.losses.steps import LossDiagnostics, Mixing
from sscl.losses.two_view import (dcl_loss, draw_mixing, hcl_loss, negative_similarities, nt_xent, sscl_loss,
                                  world_and_rank)

__all__ = ["LOSSES", "Family", "LossDiagnostics", "Mixing", "dcl_loss", "draw_mixing", "get_loss", "hcl_loss", "moco_loss",
           "negative_similarities", "nt_xent", "queue_negative_similarities", "sscl_loss", "world_and_rank"]

class Family(NamedTuple):
    """A loss family: its two-view function and the hyperparameters it takes (its keywords, which are
    also the ``loss`` config section's field names)."""

    fn: Callable[..., torch.Tensor]
    keys: tuple[str, ...]


LOSSES: dict[str, Family] = {
    "simclr": Family(nt_xent, ("temperature",)),
    "dcl": Family(dcl_loss, ("temperature", "tau_plus")),
    "hcl": Family(hcl_loss, ("temperature", "beta", "tau_plus")),
    "sscl": Family(sscl_loss, ("temperature", "beta", "tau_plus", "n_hard", "n_synthetic", "mode")),
}


def get_loss(name: str, method: str = "simclr", **hyper: object) -> Callable[..., torch.Tensor]:
    """Binds loss family ``name`` (one of ``LOSSES``) to its keywords ``hyper`` (``LossConfig.kwargs()``).

    ``method="simclr"``: the two-view loss; ``method="moco"``: :func:`moco_loss` with the family's
    keywords (simclr: InfoNCE; dcl, hcl: K = 0; sscl: all).

    Returns:
        ``fn(z1, z2, **extra)`` (``fn(q, k, queue, **extra)`` for moco) ``-> loss``; extra keywords pass
        through (e.g. ``return_diagnostics=True``).

    Raises:
        ValueError: on an unknown name or method, listing the valid ones, or a missing hyperparameter or
            one the family does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    if method not in ("simclr", "moco"):
        raise ValueError(f"unknown method {method!r}; valid: simclr, moco")
    fn, keys = LOSSES[name]
    missing, extra = [k for k in keys if k not in hyper], [k for k in hyper if k not in keys]
    if missing or extra:
        raise ValueError(f"loss {name!r} takes {', '.join(keys)}" + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; does not take {', '.join(extra)}" if extra else ""))
    return functools.partial(moco_loss if method == "moco" else fn, **hyper)
