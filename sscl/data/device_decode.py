"""Decoding on the training device (``placement.decode=device``): Ray Data ships the encoded bytes as
stored, and each training worker decodes its own batch where it trains.

JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on the batch's device (nvJPEG on CUDA,
libjpeg-turbo on the CPU: the same code), then resized to ``data.image_size`` with antialiased
bilinear interpolation; other formats (PNG, ...) and JPEGs the batched decoder refuses go through the
CPU decoder of the task path (``decode_image``), one by one, so a corrupt file is named, or skipped,
exactly as there.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sscl.data.decode import CorruptDataError, decode_image

_JPEG_START = b"\xff\xd8\xff"


def decode_batch(encoded: Sequence[bytes], where: Sequence[str], *, size: int, device: torch.device | str,
                 decoder: Any = None) -> tuple[torch.Tensor, list[int]]:
    """Decodes ``encoded`` images on ``device`` to uint8 (N, size, size, 3).

    Args:
        encoded: each image's bytes as stored (JPEG, PNG, ...).
        where: each image's name (its path), for errors.
        size: output side in pixels.
        device: where the JPEGs are decoded and the batch is returned.
        decoder: the task path's ``Decoder``, whose ``bad(err, name)`` raises (naming the file) or
            reports the image skipped; None raises.

    Returns:
        The decoded images and the indices into ``encoded`` they come from (all of them unless some
        were skipped).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    images: dict[int, torch.Tensor] = {}
    jpegs = [i for i, data in enumerate(encoded) if bytes(data[:3]) == _JPEG_START]
    if jpegs:
        data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: then one by one, the refused below
            decoded = [_jpeg_or_none(d, device) for d in data]
        for i, chw in zip(jpegs, decoded):
            if chw is not None:
                images[i] = _resized(chw, size)
    for i, data in enumerate(encoded):
        if i not in images:
            try:
                images[i] = torch.tensor(_decoded_on_cpu(data, size, where[i]), device=device)
            except CorruptDataError as err:
                if decoder is None:
                    raise
                decoder.bad(err, where[i])
    kept = sorted(images)
    if not kept:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), kept
    return torch.stack([images[i] for i in kept]), kept


def _jpeg_or_none(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _decoded_on_cpu(data: bytes, size: int, where: str) -> np.ndarray:
    return decode_image(bytes(data), size, where)


def _resized(chw: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (size, size, 3), antialiased bilinear (as PIL's ``resize``)."""
    if chw.shape[1:] != (size, size):
        scaled = F.interpolate(chw[None].float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0]
        chw = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return chw.permute(1, 2, 0).contiguous()
