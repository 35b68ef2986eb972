"""Batched two-view augmentation (SimCLR's recipe), vectorised over the batch with per-sample
random parameters; the same code runs on CPU or GPU tensors.

Semantics follow torchvision: ``RandomResizedCrop`` (10 attempts, centre-crop fallback; the crop
is resized separably with a bilinear filter that widens when shrinking, like ``antialias=True``),
horizontal flip, ``ColorJitter`` applied with probability ``jitter_p`` in a random order per image
(brightness, contrast, saturation, HSV hue shift, each clamped to [0, 1]), ``RandomGrayscale``,
optional ``GaussianBlur``, then normalisation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "TwoViewAugment", "normalize_images"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma with torchvision's rounding
_CROP_ATTEMPTS = 10


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


class TwoViewAugment:
    """Makes two independently augmented views of every image in a batch.

    Args:
        crop_size: output side in pixels.
        crop_scale: (min, max) fraction of the image area kept by the random crop.
        crop_ratio: (min, max) aspect ratio of the crop.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation: jitter strengths s, factors drawn from [1 - s, 1 + s].
        hue: hue shift drawn from [-hue, hue], in [0, 0.5].
        grayscale_p: probability of converting to grayscale (3 equal channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: (min, max) of the blur's sigma in pixels.
        blur_kernel: odd kernel side; default about 10% of ``crop_size`` (SimCLR).
        mean, std: per-channel normalisation applied last.
        seed: seeds the parameter generator, for reproducible views.

    Calling it on ``{"image": uint8 (N, H, W, C)}`` (numpy or torch, C in {1, 3}) returns
    ``{"view1": float32 (N, 3, S, S), "view2": ...}`` plus every other key unchanged; the output is
    numpy for numpy input and a tensor on the input's device otherwise.
    """

    def __init__(
        self,
        *,
        crop_size: int = 32,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel: int | None = None,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        seed: int | None = None,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {tuple(crop_ratio)}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            _check_range(name, p, 0.0, 1.0)
        for name, strength in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            _check_range(name, strength, 0.0, 1.0)
        _check_range("hue", hue, 0.0, 0.5)
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
        if blur_kernel is None:
            blur_kernel = max(3, int(0.1 * crop_size) // 2 * 2 + 1)
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {blur_kernel}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must have 3 entries with std > 0, got mean={mean}, std={std}")
        self.crop_size = crop_size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma, self.blur_kernel = tuple(blur_sigma), blur_kernel
        self.mean, self.std = tuple(mean), tuple(std)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)

    # ------------------------------------------------------------------ public

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Args: batch with "image" uint8 (N, H, W, C). Returns the batch with view1/view2 instead."""
        if "image" not in batch:
            raise ValueError(f"batch has no 'image' key (keys: {sorted(batch)})")
        images = batch["image"]
        as_numpy = not isinstance(images, torch.Tensor)
        if as_numpy:
            images = np.ascontiguousarray(images)
            x = torch.from_numpy(images if images.flags.writeable else images.copy())  # Ray hands read-only arrays
        else:
            x = images
        view1, view2 = self.views(x)
        out = {k: v for k, v in batch.items() if k != "image"}
        if as_numpy:
            view1, view2 = view1.numpy(), view2.numpy()
        out["view1"], out["view2"] = view1, view2
        return out

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: images uint8 (N, H, W, C). Returns two float32 (N, 3, S, S) views."""
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"image must have shape (N, H, W, C) with C in (1, 3), got {tuple(images.shape)}")
        n = images.shape[0]
        x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (N, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self._crop_flip(x, n_views=2)  # (2N, 3, S, S): both views from here on in one pass
        x = self._color_jitter(x)
        x = self._grayscale(x)
        if self.blur_p > 0:
            x = self._blur(x)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        return x[:n], x[n:]

    # ------------------------------------------------------------------ steps

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def _coin(self, p: float, n: int, device: torch.device) -> torch.Tensor:
        return (self._rand(n) < p).to(device)

    def _crop_boxes(self, n: int, height: int, width: int) -> torch.Tensor:
        """(n, 4) crop boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop."""
        area = height * width
        lo, hi = self.crop_scale
        log_r = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        target = area * (lo + (hi - lo) * self._rand(n, _CROP_ATTEMPTS))
        ratio = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * self._rand(n, _CROP_ATTEMPTS))
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)  # (n, attempts)
        first = ok.float().argmax(dim=1, keepdim=True)  # first valid attempt
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        # Fallback when no attempt fits: the largest centred crop within the ratio range.
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            fw, fh = width, round(width / self.crop_ratio[0])
        elif in_ratio > self.crop_ratio[1]:
            fw, fh = round(height * self.crop_ratio[1]), height
        else:
            fw, fh = width, height
        any_ok = ok.any(dim=1)
        w = torch.where(any_ok, w, torch.full_like(w, fw))
        h = torch.where(any_ok, h, torch.full_like(h, fh))
        top = torch.where(any_ok, torch.floor(self._rand(n) * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
        left = torch.where(any_ok, torch.floor(self._rand(n) * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
        return torch.stack([top, left, h, w], dim=1)

    def _crop_flip(self, x: torch.Tensor, n_views: int) -> torch.Tensor:
        """(N, 3, H, W) -> (n_views * N, 3, S, S): a random crop of each image per view, resized."""
        n, _, height, width = x.shape
        top, left, h, w = self._crop_boxes(n_views * n, height, width).to(x.device).unbind(1)
        flip = self._coin(self.flip_p, n_views * n, x.device)
        size = self.crop_size
        rows = _resize_weights(top, h, height, size, torch.zeros_like(flip))  # (V*N, S, H)
        cols = _resize_weights(left, w, width, size, flip)  # (V*N, S, W)
        rows = rows.view(n_views, n, 1, size, height)
        cols_t = cols.view(n_views, n, 1, size, width).transpose(-1, -2)
        out = rows @ x.unsqueeze(0) @ cols_t  # (V, N, 3, S, S); the views share x
        return out.view(n_views * n, 3, size, size)

    def _color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        apply = self._coin(self.jitter_p, n, x.device)
        factors = [
            1 + self.brightness * (2 * self._rand(n) - 1),
            1 + self.contrast * (2 * self._rand(n) - 1),
            1 + self.saturation * (2 * self._rand(n) - 1),
            self.hue * (2 * self._rand(n) - 1),
        ]
        factors = [f.to(x.device) for f in factors]
        n_ops = len(_JITTER_OPS)
        order = self._rand(n, n_ops).argsort(dim=1).to(x.device)  # a random order per image
        order = torch.where(apply[:, None], order, n_ops)  # n_ops = "no jitter"
        # Stage s applies to each image the op its order puts at s. Sorting the batch by that op
        # makes every op's images a contiguous slice: one gather per stage instead of many.
        perm = torch.arange(n, device=x.device)
        for stage in range(n_ops):
            op_of, by_op = order[:, stage].sort(stable=True)
            x, order, perm = x[by_op], order[by_op], perm[by_op]
            factors = [f[by_op] for f in factors]
            bounds = torch.bucketize(torch.arange(n_ops + 1, device=x.device), op_of).tolist()
            for op, fn in enumerate(_JITTER_OPS):
                lo, hi = bounds[op], bounds[op + 1]
                if hi > lo:
                    fn(x[lo:hi], factors[op][lo:hi].view(-1, 1, 1, 1))
        out = torch.empty_like(x)
        out[perm] = x  # back to the batch order
        return out

    def _grayscale(self, x: torch.Tensor) -> torch.Tensor:
        to_gray = self._coin(self.grayscale_p, x.shape[0], x.device).view(-1, 1, 1, 1)
        return torch.where(to_gray, _gray(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        lo, hi = self.blur_sigma
        sigma = (lo + (hi - lo) * self._rand(n)).to(x.device)
        idx = torch.nonzero(self._coin(self.blur_p, n, x.device)).squeeze(1)
        if idx.numel() == 0:
            return x
        sub = x[idx]
        rows = _blur_matrix(sigma[idx], self.blur_kernel, height)[:, None]  # (m, 1, H, H)
        cols = _blur_matrix(sigma[idx], self.blur_kernel, width)[:, None]  # (m, 1, W, W)
        x[idx] = rows @ sub @ cols.transpose(-1, -2)  # separable: blur columns, then rows
        return x


def _blur_matrix(sigma: torch.Tensor, kernel: int, size: int) -> torch.Tensor:
    """(m, size, size) Gaussian blur along one axis with reflect padding folded into the matrix.

    A blur with per-sample sigma as a batched matmul is several times faster on CPU than a grouped
    convolution with one group per image and channel.
    """
    half = kernel // 2
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (m, k)
    src = torch.arange(size, device=sigma.device)[:, None] + taps.long()[None, :]  # (size, k)
    period = 2 * (size - 1) if size > 1 else 1
    src = torch.remainder(src, period)
    src = torch.where(src >= size, period - src, src)  # reflect without repeating the edge
    matrix = torch.zeros(sigma.shape[0], size, size, device=sigma.device)
    return matrix.scatter_add_(2, src.expand(sigma.shape[0], -1, -1), weights[:, None, :].expand(-1, size, -1))


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, out: int, flip: torch.Tensor) -> torch.Tensor:
    """(n, out, size) interpolation matrices taking pixels [start, start + length) to ``out`` pixels.

    Bilinear (triangle) filter; when shrinking, its support widens by the scale factor, as in
    PIL's and torchvision's antialiased resize. Rows are normalised over the pixels inside the image.
    """
    scale = (length / out).clamp_min(1.0)[:, None, None]  # (n, 1, 1) filter support
    u = torch.arange(out, device=start.device, dtype=torch.float32)
    u = torch.where(flip[:, None], out - 1 - u, u)  # (n, out): mirrored sampling for flips
    centre = start[:, None] + (u + 0.5) * (length[:, None] / out) - 0.5  # (n, out), pixel coords
    pixels = torch.arange(size, device=start.device, dtype=torch.float32)
    weights = (1 - ((pixels[None, None, :] - centre[:, :, None]) / scale).abs()).clamp_(min=0)
    return weights / weights.sum(dim=2, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------- colour ops on (n, 3, H, W)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]  # (n, 1, H, W)


# Each op overwrites its (n, 3, H, W) slice of the batch in place: no copy back.


def _brightness(x: torch.Tensor, f: torch.Tensor) -> None:
    x.mul_(f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> None:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> None:
    gray = _gray(x)
    x.mul_(f).addcmul_(gray, 1 - f).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> None:
    """Shifts the HSV hue by ``shift`` (a fraction of the circle), as torchvision's adjust_hue."""
    maxc = x.amax(dim=1, keepdim=True)
    delta = maxc - x.amin(dim=1, keepdim=True)  # chroma = v * s
    inv_delta = 1.0 / delta.clamp_min(1e-12)  # gray pixels: every difference below is 0
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hue6 = torch.where(
        maxc == r, (g - b) * inv_delta, torch.where(maxc == g, (b - r) * inv_delta + 2, (r - g) * inv_delta + 4)
    )  # in [-1, 5)
    # HSV -> RGB: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + hue6 + 6 * shift, 6)
    torch.addcmul(maxc, delta, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1, out=x)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def normalize_images(
    images: torch.Tensor | np.ndarray, *, mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD
) -> torch.Tensor:
    """The evaluation transform: uint8 (N, H, W, C) -> float32 (N, 3, H, W), normalised, no augmentation."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def two_views(batch: dict[str, np.ndarray], *, augment: dict[str, Any]) -> dict[str, np.ndarray]:
    """A Ray Data task's step: ``TwoViewAugment`` (cheap to build) on a batch of decoded images.
    Lives here, with torch as its only heavy import, so a fresh task worker starts quickly."""
    return TwoViewAugment(**augment)(batch)
