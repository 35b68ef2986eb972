"""The config's objects that need more than one section: the model, the momentum queue, the
evaluation transform, and where the data path's stages run (``placement``).

Sections whose fields are one callee's keywords are passed whole where they are used:
``TwoViewAugment(**asdict(cfg.augment))``, ``get_loss(cfg.loss.name, ..., **cfg.loss.kwargs())``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sscl.config import Config
from sscl.evaluate import extract_features
from sscl.models import build_model
from sscl.moco import MomentumQueue


def model_from_config(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    return build_model(m.encoder, stem=m.stem, width=m.width, hidden_dim=m.hidden_dim, out_dim=m.out_dim,
                       head_batchnorm=m.head_batchnorm, bn_splits=m.bn_splits)


def momentum_queue(cfg: Config, model: torch.nn.Module, total_steps: int) -> MomentumQueue | None:
    """moco's momentum encoder and queue for ``model`` (the unwrapped module on its device); None for simclr."""
    m = cfg.model
    if m.method != "moco":
        return None
    return MomentumQueue(model, queue_size=m.queue_size, momentum=m.momentum, total_steps=total_steps, dim=m.out_dim,
                         seed=cfg.train.seed)


def eval_transform(cfg: Config, image_size: int | None = None) -> dict[str, Any]:
    """``extract_features`` keywords: the training crop size (or ``image_size``, e.g. an exported
    encoder's) and normalisation."""
    return dict(image_size=image_size or cfg.augment.crop_size, mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std))


def encode(encoder: torch.nn.Module, images: np.ndarray, cfg: Config, device: torch.device | str = "cpu", *,
           image_size: int | None = None) -> torch.Tensor:
    """Frozen features (N, F) on the CPU of uint8 (N, H, W, 3) images held in memory (e.g. a user's
    ``.npy`` batch), under the evaluation transform (resized to ``image_size``, a registered encoder's
    own, when given)."""
    step = cfg.data.eval_batch_size
    batches = ({"image": images[i : i + step], "label": np.zeros(len(images[i : i + step]), dtype=np.int64)}
               for i in range(0, len(images), step))
    features, _ = extract_features(encoder, batches, device=device, **eval_transform(cfg, image_size))
    return features.cpu()


def views_in_trainer(cfg: Config) -> bool:
    """Whether the two views are made inside the training loop on the training device
    (``placement.views``: trainer, or auto on GPUs or when the images are decoded there) rather than
    in the Ray Data tasks that decode."""
    views = cfg.placement.views
    return views == "trainer" or (views == "auto" and (cfg.scaling.use_gpu or decodes_on_device(cfg)))


def decodes_on_device(cfg: Config) -> bool:
    """Whether each training worker decodes its batches on its device from the encoded bytes
    (``placement.decode``: device, or auto for image folders on GPUs) rather than the Ray Data tasks."""
    decode = cfg.placement.decode
    return decode == "device" or (decode == "auto" and cfg.scaling.use_gpu and cfg.data.source == "imagefolder")


def for_training(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The step options of ``train``: NHWC layout (``channels_last``); call before moving to the device."""
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def compiled(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """``torch.compile(model)`` when ``train.compile``; call on the final (device, DDP) model."""
    return torch.compile(model) if cfg.train.compile else model
