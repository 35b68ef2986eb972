"""Dataset sources: readers of the real on-disk formats into uint8 (N, H, W, 3) arrays and labels,
and the Ray Datasets built from them (Ray is imported only inside those functions).

Splits: ``pretrain`` (what the encoder trains on), ``eval_train`` and ``eval_test`` (the labelled
sets kNN and the linear probe use). Labels are -1 where a source has none.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sscl.data.digits import load_digits_images, split_indices

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from sscl.config import DataConfig

__all__ = ["SPLITS", "CorruptDataError", "ImageSet", "build_dataset", "read_cifar", "read_image_files", "read_split",
           "read_stl10"]

SPLITS = ("pretrain", "eval_train", "eval_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_STL_SIDE = 96


class CorruptDataError(ValueError):
    """A data file exists but cannot be read: truncated, corrupt or undecodable."""


@dataclass(frozen=True)
class ImageSet:
    """Attributes: images uint8 (N, H, W, 3); labels int64 (N,), -1 when unlabelled; skipped files."""

    images: np.ndarray
    labels: np.ndarray
    skipped: int = 0


def _missing(path: Path, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source}: missing file {path}; put the dataset there or set data.download=true on a machine with internet"
    )


# ---------------------------------------------------------------------------- CIFAR


def _download(source: str, root: Path) -> None:
    import torchvision

    if source in _CIFAR:
        cls = torchvision.datasets.CIFAR10 if source == "cifar10" else torchvision.datasets.CIFAR100
        for train in (True, False):
            cls(str(root), train=train, download=True)
    else:
        for split in ("train", "test", "unlabeled"):
            torchvision.datasets.STL10(str(root), split=split, download=True)


def read_cifar(root: str | Path, *, name: str, train: bool, download: bool = False) -> ImageSet:
    """Reads CIFAR-10/100 from the python-pickle layout (``cifar-10-batches-py/data_batch_1``...).

    Raises:
        FileNotFoundError: naming the missing file.
        CorruptDataError: naming a truncated or malformed pickle.
    """
    folder, train_files, test_files, label_key = _CIFAR[name]
    root = Path(root)
    files = [root / folder / f for f in (train_files if train else test_files)]
    if download and not all(f.is_file() for f in files):
        _download(name, root)
    images, labels = [], []
    for path in files:
        if not path.is_file():
            raise _missing(path, name)
        try:
            with path.open("rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(entry[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise CorruptDataError(f"{name}: {path} is truncated or not a CIFAR pickle ({type(err).__name__}: {err})") from None
        if len(label) != len(data):
            raise CorruptDataError(f"{name}: {path} has {len(data)} images but {len(label)} labels")
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(label)
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


# ---------------------------------------------------------------------------- STL-10


def read_stl10(root: str | Path, *, split: str, download: bool = False) -> ImageSet:
    """Reads STL-10's binary layout (``stl10_binary/{train,test,unlabeled}_X.bin`` and ``_y.bin``).

    Images are stored column-major per channel (3, 96, 96); labels are 1-10 on disk, 0-9 here.
    """
    root = Path(root)
    x_path = root / "stl10_binary" / f"{split}_X.bin"
    if download and not x_path.is_file():
        _download("stl10", root)
    if not x_path.is_file():
        raise _missing(x_path, "stl10")
    raw = np.fromfile(x_path, dtype=np.uint8)
    per_image = 3 * _STL_SIDE * _STL_SIDE
    if raw.size == 0 or raw.size % per_image:
        raise CorruptDataError(f"stl10: {x_path} is truncated ({raw.size} bytes, not a multiple of {per_image})")
    images = raw.reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 3, 2, 1)  # column-major -> HWC
    if split == "unlabeled":
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        y_path = root / "stl10_binary" / f"{split}_y.bin"
        if not y_path.is_file():
            raise _missing(y_path, "stl10")
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if len(labels) != len(images):
            raise CorruptDataError(f"stl10: {y_path} has {len(labels)} labels for {len(images)} images in {x_path}")
    return ImageSet(np.ascontiguousarray(images), labels)


# ---------------------------------------------------------------------------- encoded images


def decode_image(data: bytes | np.ndarray, size: int, where: str) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) or an array -> uint8 (size, size, 3).

    Raises:
        CorruptDataError: naming ``where`` when the image cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(data))) as img:
                img = img.convert("RGB")
        else:
            arr = np.asarray(data, dtype=np.uint8)
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
                raise ValueError(f"array of shape {arr.shape} is not an (H, W), (H, W, 1) or (H, W, 3) image")
            img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CorruptDataError(f"cannot decode image {where}: {err}") from None


def _list_image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def read_image_files(root: str | Path, *, size: int, skip_corrupt: bool = False) -> tuple[ImageSet, list[str]]:
    """Reads an image tree; labels are the sorted sub-directory names of ``root`` when every image
    sits in one, else -1.

    Returns:
        The images and the class names (empty when unlabelled).

    Raises:
        CorruptDataError: naming the first undecodable file, unless ``skip_corrupt``.
    """
    root = Path(root)
    files = _list_image_files(root)
    labelled = all(len(f.relative_to(root).parts) >= 2 for f in files)
    classes = sorted({f.relative_to(root).parts[0] for f in files}) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    images, labels, skipped = [], [], 0
    for f in files:
        try:
            images.append(decode_image(f.read_bytes(), size, str(f)))
        except CorruptDataError:
            if not skip_corrupt:
                raise
            skipped += 1
            continue
        labels.append(index[f.relative_to(root).parts[0]] if labelled else -1)
    if not images:
        raise CorruptDataError(f"imagefolder: none of the {len(files)} images under {root} could be decoded")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), skipped), classes


def read_parquet_images(paths: str, *, image_column: str, label_column: str, size: int,
                        skip_corrupt: bool = False) -> ImageSet:
    """Reads Parquet files (a local path or any filesystem pyarrow opens, e.g. s3://) holding a
    column of encoded image bytes or arrays, and an optional label column."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(paths, format="parquet")
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot open {paths}: {err}") from None
    names = dataset.schema.names
    if image_column not in names:
        raise ValueError(f"data.image_column={image_column!r} is not a column of {paths}; columns: {', '.join(names)}")
    if label_column and label_column not in names:
        raise ValueError(f"data.label_column={label_column!r} is not a column of {paths}; columns: {', '.join(names)}")
    images, labels, skipped = [], [], 0
    for file_fragment in dataset.get_fragments():
        table = file_fragment.to_table(columns=[image_column] + ([label_column] if label_column else []))
        column = table.column(image_column).to_pylist()
        label_values = table.column(label_column).to_pylist() if label_column else [-1] * len(column)
        for row, (value, label) in enumerate(zip(column, label_values)):
            try:
                images.append(decode_image(value, size, f"{file_fragment.path} row {row}"))
            except CorruptDataError:
                if not skip_corrupt:
                    raise
                skipped += 1
                continue
            labels.append(-1 if label is None else int(label))
    if not images:
        raise CorruptDataError(f"parquet: no decodable images in {paths}")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), skipped)


# ---------------------------------------------------------------------------- splits


def _held_out(full: ImageSet, split: str, test_fraction: float, seed: int = 0) -> ImageSet:
    """Pretrain on everything; evaluate on a fixed, seeded split of the labelled images."""
    if split == "pretrain":
        return full
    labelled = np.flatnonzero(full.labels >= 0)
    if len(labelled) < 2:
        raise ValueError("this dataset has no labels: evaluation needs labelled images (class sub-directories or a "
                         "label column)")
    train_idx, test_idx = split_indices(len(labelled), test_fraction=test_fraction, seed=seed)
    chosen = labelled[train_idx if split == "eval_train" else test_idx]
    return ImageSet(full.images[chosen], full.labels[chosen], full.skipped)


def read_split(cfg: DataConfig, split: str) -> ImageSet:
    """Reads one split of the configured source into memory.

    Args:
        cfg: the ``data`` section of the config.
        split: "pretrain", "eval_train" or "eval_test".
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = cfg.source
    if source == "digits":
        images, labels = load_digits_images(cfg.image_size)
        train_idx, test_idx = split_indices(len(images), test_fraction=cfg.test_fraction)
        idx = test_idx if split == "eval_test" else train_idx
        return ImageSet(images[idx], labels[idx])
    if source in _CIFAR:
        return read_cifar(cfg.root, name=source, train=split != "eval_test", download=cfg.download)
    if source == "stl10":
        if split == "pretrain":
            parts = [read_stl10(cfg.root, split=s, download=cfg.download) for s in ("unlabeled", "train")]
            return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        return read_stl10(cfg.root, split="train" if split == "eval_train" else "test", download=cfg.download)
    if source == "imagefolder":
        full, _ = read_image_files(cfg.root, size=cfg.image_size, skip_corrupt=cfg.skip_corrupt)
        return _held_out(full, split, cfg.test_fraction)
    if source == "parquet":
        full = read_parquet_images(cfg.root, image_column=cfg.image_column, label_column=cfg.label_column,
                                   size=cfg.image_size, skip_corrupt=cfg.skip_corrupt)
        return _held_out(full, split, cfg.test_fraction)
    raise ValueError(f"unknown data.source {source!r}")


def build_dataset(cfg: DataConfig, split: str, *, rows_per_block: int = 4096) -> ray.data.Dataset:
    """The split as a Ray Dataset with columns ``image`` (uint8 HWC tensor) and ``label`` (int64)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    data = read_split(cfg, split)
    blocks = [
        pa.table({"image": ArrowTensorArray.from_numpy(data.images[i : i + rows_per_block]),
                  "label": data.labels[i : i + rows_per_block]})
        for i in range(0, len(data.images), rows_per_block)
    ]
    return ray.data.from_arrow(blocks)

