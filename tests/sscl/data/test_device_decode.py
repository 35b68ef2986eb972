"""Decoding on the training device (placement.decode=device), run on the CPU: the task path's images
within one grey level, its errors word for word, its skips, and other formats through its decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sscl.data.device_decode import decode_batch
from sscl.data.decode import CorruptDataError, DataError, Decoder, decode_image


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    across, down = np.linspace(0, 1, width), np.linspace(0, 1, height)
    img = rng.uniform(0, 255, 3) + rng.uniform(-128, 128, 3) * down[:, None, None] + \
        rng.uniform(-128, 128, 3) * across[None, :, None] + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)).convert(mode)


def encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def on_task_path(data: list[bytes], size: int) -> np.ndarray:
    return np.stack([decode_image(d, size, f"img{i}") for i, d in enumerate(data)]).astype(int)


def test_jpegs_at_their_stored_size_equal_the_task_path_exactly():
    data = [encoded(photo(64, 64, seed)) for seed in range(6)]
    images, kept = decode_batch(data, [f"img{i}" for i in range(6)], size=64, device="cpu")
    assert kept == list(range(6)) and images.dtype == torch.uint8 and images.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(images.numpy(), on_task_path(data, 64))


@pytest.mark.parametrize("width,height,size", [(80, 60, 64), (500, 375, 256), (64, 64, 32), (30, 40, 48)])
def test_resized_jpegs_are_within_one_grey_level_of_the_task_path(width, height, size):
    # PIL's bilinear resize and torch's antialiased bilinear interpolation round differently.
    data = [encoded(photo(width, height, seed)) for seed in range(4)]
    images, _ = decode_batch(data, [f"img{i}" for i in range(4)], size=size, device="cpu")
    diff = np.abs(images.numpy().astype(int) - on_task_path(data, size))
    assert diff.max() <= 1 and diff.mean() < 0.25


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_become_rgb_as_on_the_task_path(mode):
    data = [encoded(photo(40, 48, 3, mode))]
    images, _ = decode_batch(data, ["img0"], size=40, device="cpu")
    assert images.shape == (1, 40, 40, 3)
    assert np.abs(images.numpy().astype(int) - on_task_path(data, 40)).max() <= 1


def test_png_and_other_formats_go_through_the_task_paths_decoder_in_place():
    data = [encoded(photo(50, 50, 0)), encoded(photo(50, 50, 1), "PNG"), encoded(photo(50, 50, 2), "BMP"),
            encoded(photo(50, 50, 3))]
    images, kept = decode_batch(data, [f"img{i}" for i in range(4)], size=50, device="cpu")
    assert kept == [0, 1, 2, 3]
    expected = on_task_path(data, 50)
    np.testing.assert_array_equal(images[1:3].numpy(), expected[1:3])  # the same code: exact
    np.testing.assert_array_equal(images[[0, 3]].numpy(), expected[[0, 3]])


def corrupt_batch() -> tuple[list[bytes], list[str]]:
    good = encoded(photo(32, 32, 0))
    return [good, good[: len(good) // 3], b"\xff\xd8\xff not a jpeg", good], ["a.jpg", "cut.jpg", "fake.jpg", "b.jpg"]


def test_a_corrupt_jpeg_is_named_as_on_the_task_path():
    data, where = corrupt_batch()
    with pytest.raises(CorruptDataError) as on_device:
        decode_batch(data, where, size=32, device="cpu", decoder=Decoder(32, skip_corrupt=False))
    with pytest.raises(CorruptDataError) as on_tasks:
        Decoder(32, skip_corrupt=False).decode(data, [0, 0, 0, 0], where)
    assert str(on_device.value) == str(on_tasks.value)
    assert "cut.jpg" in str(on_device.value) and "set data.skip_corrupt=true" in str(on_device.value)


def test_skipped_jpegs_leave_the_others_in_order():
    data, where = corrupt_batch()

    class Told:
        skipped: list[str] = []

        def bad(self, err, name):
            self.skipped.append(name)

    told = Told()
    images, kept = decode_batch(data, where, size=32, device="cpu", decoder=told)
    assert kept == [0, 3] and told.skipped == ["cut.jpg", "fake.jpg"]
    on_tasks = Decoder(32, skip_corrupt=True).decode(data, [0, 1, 2, 3], where)
    np.testing.assert_array_equal(images.numpy(), on_tasks["image"])
    assert on_tasks["label"].tolist() == [0, 3]


def test_the_task_side_passes_encoded_bytes_on_and_refuses_arrays():
    data, where = corrupt_batch()
    out = Decoder(32, skip_corrupt=False, encoded=True).decode(data, [1, 2, 3, 4], where)
    assert list(out["bytes"]) == data and out["label"].tolist() == [1, 2, 3, 4] and list(out["where"]) == where
    with pytest.raises(DataError, match="row 7 is an array, not encoded bytes: set placement.decode=tasks"):
        Decoder(32, skip_corrupt=False, encoded=True).decode([np.zeros((4, 4, 3))], [0], ["row 7"])
