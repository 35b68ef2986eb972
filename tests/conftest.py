"""Shared test set-up: deterministic torch on the 2-core machines CI runs on."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
