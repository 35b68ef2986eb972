"""Batched two-view augmentation: each step against torchvision, shapes, randomness and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sscl.data import augment as A
from sscl.data.augment import CIFAR10_MEAN, CIFAR10_STD, TwoViewAugment


def images(n=8, size=32, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_default_is_simclr_cifar_recipe_and_output_contract():
    aug = TwoViewAugment(seed=0)
    assert (aug.crop_size, aug.crop_scale, aug.flip_p, aug.jitter_p, aug.grayscale_p) == (32, (0.08, 1.0), 0.5, 0.8, 0.2)
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.4, 0.4, 0.4, 0.1)
    batch = {"image": images(8, size=40), "label": np.arange(8), "path": np.array(["a"] * 8)}
    out = aug(batch)
    assert set(out) == {"view1", "view2", "label", "path"}
    assert out["view1"].shape == (8, 3, 32, 32) and out["view1"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], batch["label"])
    assert not np.allclose(out["view1"], out["view2"])  # independent views


def test_tensor_input_stays_tensor_and_grayscale_input_is_expanded():
    out = TwoViewAugment(seed=0)({"image": torch.from_numpy(images(4, channels=1))})
    assert isinstance(out["view1"], torch.Tensor) and out["view1"].shape == (4, 3, 32, 32)


def test_seeded_views_are_reproducible_and_fresh_on_each_call():
    x = {"image": images(16)}
    a, b = TwoViewAugment(seed=3), TwoViewAugment(seed=3)
    first_a, first_b = a(x), b(x)
    np.testing.assert_array_equal(first_a["view1"], first_b["view1"])
    second_a = a(x)  # the next epoch sees new views of the same images
    assert not np.allclose(first_a["view1"], second_a["view1"])


def identity_aug(**overrides):
    settings = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed=0)
    return TwoViewAugment(**(settings | overrides))


def test_full_crop_without_jitter_is_exact_identity_and_flip_mirrors():
    x = images(4)
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    v1, v2 = identity_aug().views(torch.from_numpy(x))
    torch.testing.assert_close(v1, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(v2, expected, atol=1e-6, rtol=0)
    f1, _ = identity_aug(flip_p=1.0).views(torch.from_numpy(x))
    torch.testing.assert_close(f1, expected.flip(-1), atol=1e-6, rtol=0)


def test_resize_matches_torchvision_antialiased_bilinear():
    # A full-image crop to a smaller size is torchvision's antialiased bilinear resize.
    x = images(3, size=64)
    v1, _ = identity_aug(crop_size=24).views(torch.from_numpy(x))
    ref = TF.resize(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, [24, 24], antialias=True)
    assert (v1 - ref).abs().max() < 2e-2  # torchvision rounds its filter weights; values agree closely
    # Upscaling uses the plain bilinear filter.
    up, _ = identity_aug(crop_size=48).views(torch.from_numpy(images(2, size=32)))
    ref_up = TF.resize(torch.from_numpy(images(2, size=32)).permute(0, 3, 1, 2).float() / 255, [48, 48], antialias=True)
    assert (up - ref_up).abs().max() < 1e-4


def test_crop_boxes_follow_random_resized_crop_bounds():
    aug = TwoViewAugment(crop_scale=(0.2, 0.6), crop_ratio=(0.5, 2.0), seed=0)
    boxes = aug._crop_boxes(4000, 50, 40)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 40).all()
    area = h * w / (50 * 40)
    assert area.min() > 0.15 and area.max() < 0.65  # within the scale range up to rounding
    assert (w / h).min() > 0.4 and (w / h).max() < 2.3


@pytest.mark.parametrize(
    "ours,theirs,factor",
    [
        (A._brightness, TF.adjust_brightness, 1.3),
        (A._contrast, TF.adjust_contrast, 0.6),
        (A._saturation, TF.adjust_saturation, 1.4),
        (A._hue, TF.adjust_hue, 0.08),
        (A._hue, TF.adjust_hue, -0.1),
    ],
)
def test_colour_ops_match_torchvision(ours, theirs, factor):
    x = torch.from_numpy(images(4)).permute(0, 3, 1, 2).float() / 255
    expected = torch.stack([theirs(img, factor) for img in x])
    got = x.clone()
    ours(got, torch.full((4, 1, 1, 1), factor))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_grayscale_and_blur_match_torchvision():
    x = torch.from_numpy(images(4)).permute(0, 3, 1, 2).float() / 255
    gray = identity_aug(grayscale_p=1.0)._grayscale(x.clone())
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    sigma = torch.full((4,), 1.3)
    m = A._blur_matrix(sigma, 7, 32)[:, None]
    torch.testing.assert_close(m @ x @ m.transpose(-1, -2), TF.gaussian_blur(x, [7, 7], [1.3, 1.3]), atol=1e-5, rtol=0)


def test_jitter_probability_and_normalisation():
    x = torch.from_numpy(images(64))
    plain = identity_aug(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    jittered = identity_aug(jitter_p=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    base, _ = plain.views(x)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR10_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(base, expected, atol=1e-5, rtol=0)
    changed, _ = jittered.views(x)
    assert ((changed - base).abs().amax(dim=(1, 2, 3)) > 1e-3).all()  # every image jittered


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"crop_size": 0}, "crop_size"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"flip_p": 1.5}, "flip_p"),
        ({"hue": 0.7}, "hue"),
        ({"brightness": -0.1}, "brightness"),
        ({"blur_kernel": 4}, "blur_kernel"),
        ({"std": (0.0, 1.0, 1.0)}, "std"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoViewAugment(**kwargs)


def test_bad_batches_are_rejected():
    with pytest.raises(ValueError, match="image"):
        TwoViewAugment()({"img": images(2)})
    with pytest.raises(ValueError, match="image"):
        TwoViewAugment()({"image": np.zeros((2, 32, 32), dtype=np.uint8)})
