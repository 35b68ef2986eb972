"""The offline dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes)
resized to 32x32 RGB uint8, so everything runs on a machine with no internet."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGITS_COUNT", "load_digits_images", "split_indices"]

DIGITS_COUNT = 1797  # images in scikit-learn's bundled digits


def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (1797, size, size, 3) and labels int64 (1797,).

    The 0-16 grey levels are scaled to 0-255 and upsampled bilinearly (antialias off: upsampling).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    images = x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous().numpy()
    return images, digits.target.astype(np.int64)


def split_indices(n: int, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train/test split of ``n`` items: (train indices, test indices)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])
