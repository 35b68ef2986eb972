"""Decoding images, wherever it happens (a Ray task, a local reader, the training device's fallback),
and the errors bad data raises: undecodable images are named, or skipped and counted."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BadImages", "CorruptDataError", "DataError", "Decoder", "decode_image"]


class DataError(ValueError):
    """The data cannot give a meaningful run (too few images or classes, an empty split). The same data
    fails the same way every time: never retried."""


class CorruptDataError(DataError):
    """A data file exists but cannot be read: truncated, corrupt or undecodable."""


def decode_image(data: bytes | np.ndarray, size: int, where: str) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) or an array -> uint8 (size, size, 3), resized bilinearly.

    Raises:
        CorruptDataError: naming ``where`` when the image cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if data is None:
            raise ValueError("the cell is empty (null)")
        if isinstance(data, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(data))) as img:
                img = _eight_bit(img).convert("RGB")  # greyscale, palette, CMYK, alpha -> RGB
        else:
            arr = np.asarray(data)
            if arr.dtype == np.uint16:  # 16-bit pixels: scaled, not wrapped around
                arr = np.round(arr * (255 / 65535))
            arr = arr.astype(np.uint8)
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
                raise ValueError(f"array of shape {arr.shape} is not an (H, W), (H, W, 1) or (H, W, 3) image")
            img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, TypeError) as err:
        raise CorruptDataError(f"cannot decode image {where}: {err}") from None


def _eight_bit(img: Any) -> Any:
    """16-bit (and 32-bit integer) greyscale scaled to 8 bits: PIL's RGB conversion would clip it."""
    if not img.mode.startswith("I"):
        return img
    from PIL import Image

    wide = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.round(wide * (255 / 65535)).clip(0, 255).astype(np.uint8))


class BadImages:
    """A Ray actor's class: what the decoding tasks, wherever they run, met that could not be
    decoded: the distinct files (or rows) skipped with ``data.skip_corrupt=true``, and the error
    that stopped the stream otherwise (Ray Train truncates a worker's traceback, so the driver asks
    here which file it was)."""

    def __init__(self) -> None:
        self.skipped: set[str] = set()
        self.errors: list[str] = []

    def skip(self, where: str) -> None:
        self.skipped.add(where)

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def count(self) -> int:
        return len(self.skipped)

    def examples(self, n: int = 5) -> list[str]:
        return sorted(self.skipped)[:n]

    def first_error(self) -> str | None:
        return self.errors[0] if self.errors else None


@dataclass(frozen=True)
class Decoder:
    """Decodes a batch of encoded images into ``image``/``label``, naming or skipping bad ones.

    Attributes:
        size: output side in pixels.
        skip_corrupt: skip undecodable images instead of failing.
        bad_images: a ``BadImages`` actor handle told of each skipped image or failure, or None.
        encoded: pass the encoded bytes on as stored (``bytes``, ``label``, ``where`` columns), for
            decoding on the training device (``placement.decode=device``, ``sscl.data.device_decode``).
    """

    size: int
    skip_corrupt: bool
    bad_images: Any = None
    encoded: bool = False

    def decode(self, values: list[Any], labels: list[int], where: list[str],
               keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """``image`` and ``label`` of the decodable ``values`` (``where`` names each in errors), and
        their ``key`` column when ``keys`` are given (one per value)."""
        if self.encoded:
            return self._passed_on(values, labels, where)
        images, kept = [], []
        for i, (value, name) in enumerate(zip(values, where)):
            try:
                images.append(decode_image(value, self.size, name))
            except CorruptDataError as err:
                self.bad(err, name)
                continue
            kept.append(i)
        empty = np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        out = {"image": np.stack(images) if images else empty,
               "label": np.asarray([labels[i] for i in kept], dtype=np.int64)}
        if keys is not None:
            out["key"] = np.asarray([keys[i] for i in kept], dtype=object)
        return out

    def bad(self, err: CorruptDataError, name: str) -> None:
        """An undecodable image, wherever it was decoded: raises, naming it, or reports it skipped."""
        # Reported and waited for (rare: only bad images), so the driver's question that follows
        # (which file stopped the run, how many were skipped this epoch) finds it recorded.
        if not self.skip_corrupt:
            message = f"{err} (set data.skip_corrupt=true to skip such images)"
            self._tell("fail", message)
            raise CorruptDataError(message) from None
        self._tell("skip", name)

    def _passed_on(self, values: list[Any], labels: list[int], where: list[str]) -> dict[str, np.ndarray]:
        encoded = np.empty(len(values), dtype=object)
        for i, (value, name) in enumerate(zip(values, where)):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise DataError(f"placement.decode=device ships encoded images as stored, but {name} is "
                                f"{'empty (null)' if value is None else 'an array, not encoded bytes'}: set "
                                "placement.decode=tasks")
            encoded[i] = bytes(value)
        return {"bytes": encoded, "label": np.asarray(labels, dtype=np.int64), "where": np.asarray(where, dtype=object)}

    def _tell(self, what: str, text: str) -> None:
        """Reports to the ``BadImages`` actor, if any, and waits for it."""
        if self.bad_images is not None:
            import ray

            ray.get(getattr(self.bad_images, what).remote(text))
