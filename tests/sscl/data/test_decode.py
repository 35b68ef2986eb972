"""Images in the formats users have: converted to 8-bit RGB correctly, or named when undecodable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sscl.data.decode import CorruptDataError, decode_image


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped():
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64,512
    for data in (encoded(Image.fromarray(wide)), wide):  # a 16-bit PNG and a uint16 array (Parquet)
        out = decode_image(data, 8, "x")
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], np.round(wide * (255 / 65535)).astype(np.uint8))


@pytest.mark.parametrize("mode,colour,expected", [
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
    ("L", 128, (128, 128, 128)),
    ("LA", (200, 0), (200, 200, 200)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
])
def test_other_modes_become_rgb(mode, colour, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encoded(Image.new(mode, (4, 4), colour), fmt), 4, "x")
    np.testing.assert_allclose(out[0, 0], expected, atol=2)  # JPEG rounds


def test_palette_images_keep_their_colours():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 250, 10, 5] + [0] * 762)
    np.testing.assert_array_equal(decode_image(encoded(img), 4, "x")[0, 0], (250, 10, 5))


@pytest.mark.parametrize("data", [b"not an image at all", encoded(Image.new("RGB", (32, 32)))[:40]],
                         ids=["not an image", "truncated"])
def test_undecodable_bytes_are_named(data):
    with pytest.raises(CorruptDataError, match=r"cannot decode image folder/cat/0\.png"):
        decode_image(data, 8, "folder/cat/0.png")


def test_a_decompression_bomb_is_named_not_decoded(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    with pytest.raises(CorruptDataError, match="cannot decode image big.png.*decompression bomb"):
        decode_image(encoded(Image.new("RGB", (64, 64))), 8, "big.png")
