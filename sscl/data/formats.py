"""What is inside each source's files: CIFAR's python pickles, STL-10's binaries (read by byte
range) and Parquet cells (image and label columns); where the files of a split are, fetched first
with ``data.download``. Used by both back-ends through ``sscl.data.sources``."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sscl.data.decode import CorruptDataError, DataError, Decoder, held_out
from sscl.data.folders import Selection

if TYPE_CHECKING:  # pragma: no cover
    from sscl.config import DataConfig

__all__ = ["CIFAR", "STL_CHUNK", "cifar_files", "decode_rows", "parquet_columns", "parquet_decoding", "read_cifar_file",
           "read_stl_chunk", "stl10_files"]

CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
STL_CHUNK = 1024  # images per STL-10 read unit (about 28 MB)
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE


def _missing(path: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source}: missing file {path}; put the dataset there or set data.download=true on a machine with internet"
    )


# ---------------------------------------------------------------------------- CIFAR


def read_cifar_file(data: bytes, *, label_key: bytes, where: str) -> dict[str, np.ndarray]:
    """One CIFAR python pickle (``data_batch_1``, ``test``, ...) -> ``image`` (N, 32, 32, 3), ``label``.

    Raises:
        CorruptDataError: naming a truncated or malformed pickle.
    """
    try:
        entry = pickle.loads(data, encoding="bytes")
        images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - unpickling garbage can raise anything; each means the same
        raise CorruptDataError(f"{where} is truncated or not a CIFAR pickle ({type(err).__name__}: "
                               f"{str(err)[:200]})") from None
    if len(labels) != len(images):
        raise CorruptDataError(f"{where} has {len(images)} images but {len(labels)} labels")
    return {"image": np.ascontiguousarray(images.transpose(0, 2, 3, 1)), "label": labels}


def cifar_files(cfg: DataConfig, train: bool) -> tuple[list[Path], bytes]:
    """The pickles of a CIFAR split (fetched first with ``data.download``) and its label key.

    Raises:
        FileNotFoundError: naming a missing pickle.
    """
    folder, train_files, test_files, label_key = CIFAR[cfg.source]
    root = Path(cfg.root).expanduser().resolve()
    files = [root / folder / f for f in (train_files if train else test_files)]
    if cfg.download and not all(f.is_file() for f in files):
        _download(cfg.source, root)
    for path in files:
        if not path.is_file():
            raise _missing(str(path), cfg.source)
    return files, label_key


def _download(source: str, root: Path) -> None:
    """Fetches and unpacks the official archive (needs internet); nothing is decoded here."""
    import torchvision
    from torchvision.datasets.utils import download_and_extract_archive

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[source]
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError, ValueError) as err:  # urllib's URLError is an OSError
        raise ConnectionError(f"data.download=true: cannot download {source} from {cls.url} into {root} "
                              f"({getattr(err, 'reason', err)}); put the files there by hand, or download on a "
                              "machine with internet") from None


# ---------------------------------------------------------------------------- STL-10


def read_stl_chunk(x_path: str, y_path: str, n_images: int, chunk: int) -> dict[str, np.ndarray]:
    """Images ``[chunk * STL_CHUNK, (chunk + 1) * STL_CHUNK)`` of an STL-10 binary, read by byte range,
    as ``image`` (N, 96, 96, 3) and ``label`` (-1 when ``y_path`` is "": unlabelled)."""
    import pyarrow.fs as pafs

    first = chunk * STL_CHUNK
    count = min(STL_CHUNK, n_images - first)
    fs, path = pafs.FileSystem.from_uri(x_path)
    with fs.open_input_file(path) as fh:
        raw = np.frombuffer(fh.read_at(count * _STL_BYTES, first * _STL_BYTES), dtype=np.uint8)
    # Stored column-major per channel: (3, 96, 96) with x fastest -> (H, W, 3).
    images = np.ascontiguousarray(raw.reshape(count, 3, _STL_SIDE, _STL_SIDE).transpose(0, 3, 2, 1))
    if not y_path:
        return {"image": images, "label": np.full(count, -1, dtype=np.int64)}
    fs, path = pafs.FileSystem.from_uri(y_path)
    with fs.open_input_file(path) as fh:
        labels = np.frombuffer(fh.read_at(count, first), dtype=np.uint8).astype(np.int64) - 1
    return {"image": images, "label": labels}


def stl10_files(cfg: DataConfig, split: str) -> tuple[str, str, int]:
    """The image file of an STL-10 split, its label file ("" for ``unlabeled``) and its image count,
    checked from their sizes before anything is read."""
    folder = Path(cfg.root).expanduser().resolve() / "stl10_binary"
    x_path = folder / f"{split}_X.bin"
    if cfg.download and not x_path.is_file():
        _download("stl10", Path(cfg.root).expanduser().resolve())
    if not x_path.is_file():
        raise _missing(str(x_path), "stl10")
    size = x_path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise CorruptDataError(f"stl10: {x_path} is truncated ({size} bytes, not a multiple of {_STL_BYTES})")
    n_images = size // _STL_BYTES
    y_path = ""
    if split != "unlabeled":
        y = folder / f"{split}_y.bin"
        if not y.is_file():
            raise _missing(str(y), "stl10")
        if y.stat().st_size != n_images:
            raise CorruptDataError(f"stl10: {y} has {y.stat().st_size} labels for {n_images} images in {x_path}")
        y_path = str(y)
    return str(x_path), y_path, n_images


# ---------------------------------------------------------------------------- Parquet


def parquet_columns(names: list[str], root: str, cfg: DataConfig, selection: Selection) -> list[str]:
    """The image (and label) column to read, checked against the files' ``names``."""
    for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if column and column not in names:
            raise ValueError(f"{key}={column!r} is not a column of {root}; columns: {', '.join(names)}")
    if selection.labelled_only and not cfg.label_column:
        raise ValueError(f"data.label_column='': evaluation on {root} needs a label column, or set data.eval_root")
    return [cfg.image_column] + ([cfg.label_column] if cfg.label_column else [])


def parquet_decoding(cfg: DataConfig, selection: Selection, decoder: Decoder, rows: int) -> dict[str, Any]:
    """``decode_rows`` keywords for a Parquet split of ``rows`` rows (counted from the footers)."""
    keep_fraction = 1.0
    if selection.max_images:
        training_side = selection.test_fraction and not selection.held_out_side
        expected = rows * (1 - selection.test_fraction if training_side else 1)
        keep_fraction = min(1.0, selection.max_images / max(expected, 1))  # about max_images, by content hash
    return {"decoder": decoder, "image_column": cfg.image_column, "label_column": cfg.label_column,
            "selection": selection, "keep_fraction": keep_fraction}


def decode_rows(batch: dict[str, Any], *, decoder: Decoder, image_column: str, label_column: str,
                selection: Selection, keep_fraction: float) -> dict[str, np.ndarray]:
    """A batch of Parquet cells -> the rows ``selection`` keeps (held-out side, labels, about
    ``keep_fraction`` of them by a hash of each image's bytes), decoded by ``decoder``.

    Raises:
        DataError: naming the label column and a value that is not a class index.
        CorruptDataError: naming an undecodable image by its digest (unless skipped).
    """
    values = list(batch[image_column])
    labels = [_label(v, label_column) for v in batch[label_column]] if label_column else [-1] * len(values)
    keys = [v if isinstance(v, bytes) else b"" if v is None else np.asarray(v).tobytes() for v in values]
    chosen = [i for i, key in enumerate(keys) if selection.keeps(key, labels[i])
              and (keep_fraction >= 1 or held_out(key, keep_fraction, salt="bank"))]
    names = [f"{image_column} value with digest {hashlib.blake2b(keys[i], digest_size=6).hexdigest()}" for i in chosen]
    return decoder.decode([values[i] for i in chosen], [labels[i] for i in chosen], names)


def _label(value: Any, column: str) -> int:
    """A Parquet label cell: an integer class index, or null (unlabelled: -1).

    Raises:
        DataError: naming the column and the value when it is not an integer.
    """
    if value is None:
        return -1
    try:
        number = float(value) if not isinstance(value, (int, np.integer)) else value
        if number != int(number) or number < -1:
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"data.label_column={column!r} holds {value!r}: labels must be integer class indices "
                        "(>= 0; null for unlabelled)") from None

