"""Dataset sources as lazy Ray Datasets: files are listed on the driver (paths only), read and
decoded in Ray tasks on the cluster, and streamed; no process ever holds a whole split's pixels.

Every source gives the same columns: ``image`` (uint8 (H, W, 3)) and ``label`` (int64, -1 when
unlabelled). Splits:

- ``pretrain``: what the encoder trains on, in a new file order every epoch (seeded);
- ``eval_train``: the labelled kNN bank and linear-probe training set, at most
  ``train.knn_max_images`` images;
- ``eval_test``: the labelled evaluation set: ``data.eval_root`` when set, the source's own test
  split (CIFAR, STL-10, digits), else a held-out fraction chosen by a hash of each file's path
  (image folders) or of each image's bytes (Parquet), so no listing pass has to be materialised.

Ray is imported inside the functions: the rest of ``sscl`` runs without it, and
``local_split`` reads the same splits in one process without Ray.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs
    import ray.data

    from sscl.config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "BadImages", "CorruptDataError", "DataError", "FolderListing", "LocalSplit",
           "Split", "build_dataset", "check_roots", "decode_image", "folder_classes", "held_out", "list_folder",
           "local_split", "read_cifar_file"]

SPLITS = ("pretrain", "eval_train", "eval_test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE
_STL_CHUNK = 1024  # images per STL-10 read task (about 28 MB)
_DECODE_BATCH = 64


class DataError(ValueError):
    """The data cannot give a meaningful run (too few images or classes, an empty split). The same data
    fails the same way every time: never retried."""


class CorruptDataError(DataError):
    """A data file exists but cannot be read: truncated, corrupt or undecodable."""


# ---------------------------------------------------------------------------- shared helpers


def held_out(key: str | bytes, fraction: float, salt: str = "test") -> bool:
    """Whether an item belongs to a held-out ``fraction``, decided by a hash of ``key`` alone.

    The same key lands on the same side in every process and execution, whatever the order or
    the number of files, so a split needs no listing pass and no materialisation.
    """
    data = key.encode() if isinstance(key, str) else key
    digest = hashlib.blake2b(data, digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _filesystem(root: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or a URI (s3://, gs://, ...).

    Raises:
        FileNotFoundError / ConnectionError: naming the root when it is missing or unreachable.
    """
    import pyarrow.fs as pafs

    uri = root if "://" in root else str(Path(root).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as err:  # pyarrow raises OSError for network and credential failures
        raise ConnectionError(f"cannot reach {root}: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {root}")
    return fs, path.rstrip("/")


def _missing(path: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source}: missing file {path}; put the dataset there or set data.download=true on a machine with internet"
    )


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

    def decode(self, values: list[Any], labels: list[int], where: list[str]) -> dict[str, np.ndarray]:
        if self.encoded:
            return self._passed_on(values, labels, where)
        images, kept = [], []
        for value, label, name in zip(values, labels, where):
            try:
                images.append(decode_image(value, self.size, name))
            except CorruptDataError as err:
                self.bad(err, name)
                continue
            kept.append(label)
        empty = np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return {"image": np.stack(images) if images else empty, "label": np.asarray(kept, dtype=np.int64)}

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


# ---------------------------------------------------------------------------- image folders and Parquet


@dataclass(frozen=True)
class _Selection:
    """Which images of a folder or Parquet source a split keeps.

    Attributes:
        labelled_only: drop unlabelled images (evaluation sets).
        test_fraction: hold out this fraction by hash (None: no held-out split).
        held_out_side: keep the held-out side (eval_test) rather than the rest.
        max_images: keep at most this many (0 = all).
    """

    labelled_only: bool = False
    test_fraction: float | None = None
    held_out_side: bool = False
    max_images: int = 0

    def keeps(self, key: str | bytes, label: int) -> bool:
        if self.labelled_only and label < 0:
            return False
        return self.test_fraction is None or held_out(key, self.test_fraction) == self.held_out_side


class _FolderFiles:
    """The files of an image tree a split reads, decided per path before anything is read.

    ``root/<class>/<file>`` is labelled by its class's index in ``classes`` (the training root's, so
    an evaluation tree's classes are matched by name); files directly under ``root`` are unlabelled
    (pretraining only).
    """

    def __init__(self, base: str, classes: list[str], selection: _Selection) -> None:
        self.base, self.index, self.selection = base + "/", {c: i for i, c in enumerate(classes)}, selection

    def relative(self, path: str) -> str:
        return path[len(self.base):] if path.startswith(self.base) else path

    def label(self, path: str) -> int:
        parts = self.relative(path).split("/")
        return self.index.get(parts[0], -1) if len(parts) >= 2 else -1

    def __call__(self, paths: list[str]) -> list[str]:
        kept = [p for p in paths if self.selection.keeps(self.relative(p), self.label(p))]
        limit = self.selection.max_images
        if limit and len(kept) > limit:
            # An exact, order-independent subset: the files with the smallest path hashes.
            kept = sorted(kept, key=lambda p: hashlib.blake2b(self.relative(p).encode(), digest_size=8).digest())[:limit]
        return kept


@dataclass(frozen=True)
class FolderListing:
    """The images of a tree, listed once with the rules every back-end (Ray and local) shares.

    Rules: a file counts when its extension is one of ``IMAGE_EXTENSIONS`` (any case) and no part of
    its path below the root starts with ``.`` (hidden files, macOS ``._x.jpg``); names starting with
    ``_`` count like any other. Symbolic links to files are read; links to folders are followed
    unless they lead to a folder already listed (a link back to a parent would list the tree again
    and again). Classes are the folders directly under the root that hold images.

    Attributes:
        fs, base: the pyarrow filesystem and the root's path in it.
        paths: every image's path, sorted.
        classes: the sorted class folder names.
    """

    fs: Any
    base: str
    paths: list[str]
    classes: list[str]

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for path in self.paths:
            parts = path[len(self.base) + 1:].split("/")
            if len(parts) >= 2:
                counts[parts[0]] += 1
        return counts


def _is_image(name: str) -> bool:
    return not name.startswith(".") and "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _walk_local(base: str) -> list[str]:
    """Image paths under a local ``base``. Real folders are listed first, then folder links, each to a
    folder not listed yet (no loops, no folder twice, the same result whatever the order on disk)."""
    import os

    found, seen, real, links = [], set(), [base], []
    while real or links:
        folder = real.pop() if real else links.pop(0)
        try:
            stat = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # a broken link or a folder that cannot be read
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    (links if entry.is_symlink() else real).append(entry.path)
                elif entry.is_file() and _is_image(entry.name):
                    found.append(entry.path)
            except OSError:
                continue
    return sorted(found)


def list_folder(root: str) -> FolderListing:
    """Lists the images of the tree at ``root`` (a local path or a URI) by :class:`FolderListing`'s rules.

    Raises:
        FileNotFoundError / ConnectionError: naming the root when it is missing or unreachable.
    """
    import pyarrow.fs as pafs

    fs, base = _filesystem(root)
    if isinstance(fs, pafs.LocalFileSystem):
        paths = _walk_local(base)
    else:
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        paths = sorted(e.path for e in listed if e.type == pafs.FileType.File and _is_image(e.base_name)
                       and not any(part.startswith(".") for part in e.path[len(base) + 1:].split("/")))
    classes = sorted({p[len(base) + 1:].split("/")[0] for p in paths if "/" in p[len(base) + 1:]})
    return FolderListing(fs, base, paths, classes)


def _folder_files(root: str, selection: _Selection, classes_root: str) -> tuple[FolderListing, _FolderFiles]:
    """The listing of ``root`` and the file selection of a split, labelled by ``classes_root``'s classes.

    Raises:
        DataError: naming the keys, classes and counts when evaluation would be meaningless: fewer
            than two classes, or evaluation classes that training does not have.
    """
    listing = list_folder(root)
    classes = list_folder(classes_root).classes if classes_root != root else listing.classes
    if selection.labelled_only:
        counts = ", ".join(f"{c}: {n}" for c, n in listing.class_counts().items()) or "none"
        if len(listing.classes) < 2 and root == classes_root:  # the kNN bank's tree (an eval_root may hold one)
            raise DataError(f"{root} has {len(listing.classes)} class folder(s) holding images ({counts}): evaluation "
                            "needs labelled images of at least two classes (root/<class>/<image>; with one class every "
                            "kNN and linear prediction is right), or set data.eval_root to such a tree")
        unknown = sorted(set(listing.classes) - set(classes))
        if unknown:
            raise DataError(f"data.eval_root={root!r} has class folder(s) that data.root={classes_root!r} lacks: "
                            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (classes are matched by "
                            f"name; data.root has {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})")
    return listing, _FolderFiles(listing.base, classes, selection)


def _selected(listing: FolderListing, files: _FolderFiles, root: str, selection: _Selection) -> list[str]:
    """The split's paths; an empty split is an error with the counts that explain it."""
    paths = files(listing.paths)
    if paths:
        return paths
    if not listing.paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root} (hidden files and folders, "
                        "starting with '.', are not read)")
    labelled = sum(files.label(p) >= 0 for p in listing.paths)
    if selection.test_fraction is None:
        raise DataError(f"no labelled images under {root}: of its {len(listing.paths)} images, none is in a class "
                        "folder (root/<class>/<image>)")
    side = "held-out" if selection.held_out_side else "training"
    raise DataError(f"the {side} side of {root} is empty: of its {len(listing.paths)} images, {labelled} are labelled "
                    f"and none falls on that side of data.test_fraction={selection.test_fraction}; use more images, "
                    "another data.test_fraction, or a labelled data.eval_root")


def _decode_files(batch: dict[str, Any], *, decoder: Decoder, files: _FolderFiles) -> dict[str, np.ndarray]:
    paths = list(batch["path"])
    return decoder.decode(list(batch["bytes"]), [files.label(p) for p in paths], paths)


def folder_classes(root: str) -> list[str]:
    """The sorted class folders directly under ``root`` that hold images (``list_folder``'s rules)."""
    return list_folder(root).classes


def _shuffle(seed: int | None):
    import ray.data

    return ray.data.FileShuffleConfig(seed=seed) if seed is not None else None


def _image_folder(root: str, selection: _Selection, decoder: Decoder, seed: int | None, classes_root: str) -> Split:
    import ray.data

    listing, files = _folder_files(root, selection, classes_root)
    paths = _selected(listing, files, root, selection)
    # The listing's own paths: Ray's directory listing has other rules (it drops top-level "_" names).
    read = ray.data.read_binary_files(paths, filesystem=listing.fs, include_paths=True, shuffle=_shuffle(seed))
    decoded = read.map_batches(_decode_files, fn_kwargs={"decoder": decoder, "files": files}, batch_size=_DECODE_BATCH)
    return Split(decoded, len(paths))


def _decode_rows(batch: dict[str, Any], *, decoder: Decoder, image_column: str, label_column: str,
                 selection: _Selection, keep_fraction: float) -> dict[str, np.ndarray]:
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


def _parquet(root: str, cfg: DataConfig, selection: _Selection, decoder: Decoder, seed: int | None) -> Split:
    import ray.data

    fs, base = _filesystem(root)
    try:
        read = ray.data.read_parquet(base, filesystem=fs, shuffle=_shuffle(seed))
        names = read.schema().names  # from one file's footer
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot read {root}: {err}") from None
    read = read.select_columns(_parquet_columns(names, root, cfg, selection))
    rows = read.count()  # from the files' footers
    decoded = read.map_batches(_decode_rows, batch_size=_DECODE_BATCH,
                               fn_kwargs=_parquet_decoding(cfg, selection, decoder, rows))
    return Split(decoded, rows)


def _parquet_columns(names: list[str], root: str, cfg: DataConfig, selection: _Selection) -> list[str]:
    """The image (and label) column to read, checked against the files' ``names``."""
    for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if column and column not in names:
            raise ValueError(f"{key}={column!r} is not a column of {root}; columns: {', '.join(names)}")
    if selection.labelled_only and not cfg.label_column:
        raise ValueError(f"data.label_column='': evaluation on {root} needs a label column, or set data.eval_root")
    return [cfg.image_column] + ([cfg.label_column] if cfg.label_column else [])


def _parquet_decoding(cfg: DataConfig, selection: _Selection, decoder: Decoder, rows: int) -> dict[str, Any]:
    """``_decode_rows`` keywords for a Parquet split of ``rows`` rows."""
    keep_fraction = 1.0
    if selection.max_images:
        expected = rows * (1 - selection.test_fraction if selection.test_fraction and not selection.held_out_side else 1)
        keep_fraction = min(1.0, selection.max_images / max(expected, 1))  # about max_images, by content hash
    return {"decoder": decoder, "image_column": cfg.image_column, "label_column": cfg.label_column,
            "selection": selection, "keep_fraction": keep_fraction}


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


def _unpickle_cifar(batch: dict[str, Any], *, label_key: bytes) -> dict[str, np.ndarray]:
    parts = [read_cifar_file(data, label_key=label_key, where=path) for data, path in zip(batch["bytes"], batch["path"])]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}


def _cifar_files(cfg: DataConfig, train: bool) -> tuple[list[Path], bytes]:
    """The pickles of a CIFAR split (fetched first with ``data.download``) and its label key.

    Raises:
        FileNotFoundError: naming a missing pickle.
    """
    folder, train_files, test_files, label_key = _CIFAR[cfg.source]
    root = Path(cfg.root).expanduser().resolve()
    files = [root / folder / f for f in (train_files if train else test_files)]
    if cfg.download and not all(f.is_file() for f in files):
        _download(cfg.source, root)
    for path in files:
        if not path.is_file():
            raise _missing(str(path), cfg.source)
    return files, label_key


def _cifar(cfg: DataConfig, train: bool) -> ray.data.Dataset:
    import ray.data

    files, label_key = _cifar_files(cfg, train)
    # One task per pickle (10,000 images each): the files are read and unpickled on the cluster.
    ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True, override_num_blocks=len(files))
    return ds.map_batches(_unpickle_cifar, fn_kwargs={"label_key": label_key}, batch_size=1)


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


def _read_stl_chunk(batch: dict[str, np.ndarray], *, x_path: str, y_path: str, n_images: int) -> dict[str, np.ndarray]:
    """Images ``[id * chunk, (id + 1) * chunk)`` of an STL-10 binary, read by byte range."""
    import pyarrow.fs as pafs

    out_images, out_labels = [], []
    for chunk in batch["id"]:
        first = int(chunk) * _STL_CHUNK
        count = min(_STL_CHUNK, n_images - first)
        fs, path = pafs.FileSystem.from_uri(x_path)
        with fs.open_input_file(path) as fh:
            raw = np.frombuffer(fh.read_at(count * _STL_BYTES, first * _STL_BYTES), dtype=np.uint8)
        # Stored column-major per channel: (3, 96, 96) with x fastest -> (H, W, 3).
        out_images.append(raw.reshape(count, 3, _STL_SIDE, _STL_SIDE).transpose(0, 3, 2, 1))
        if y_path:
            fs, path = pafs.FileSystem.from_uri(y_path)
            with fs.open_input_file(path) as fh:
                out_labels.append(np.frombuffer(fh.read_at(count, first), dtype=np.uint8).astype(np.int64) - 1)
        else:
            out_labels.append(np.full(count, -1, dtype=np.int64))
    return {"image": np.ascontiguousarray(np.concatenate(out_images)), "label": np.concatenate(out_labels)}


def _stl10_files(cfg: DataConfig, split: str) -> tuple[str, str, int]:
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


def _stl10_split(cfg: DataConfig, split: str) -> Split:
    import ray.data

    x_path, y_path, n_images = _stl10_files(cfg, split)
    n_chunks = -(-n_images // _STL_CHUNK)
    chunks = ray.data.range(n_chunks, override_num_blocks=n_chunks)  # one read task per chunk of the file
    return Split(chunks.map_batches(_read_stl_chunk, batch_size=1,
                                    fn_kwargs={"x_path": x_path, "y_path": y_path, "n_images": n_images}), n_images)


# ---------------------------------------------------------------------------- digits


def _digits_rows(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    from sscl.data.digits import load_digits_images

    images, labels = load_digits_images(size)  # bundled with scikit-learn: 1,797 images, read in the task
    index = np.asarray(batch["index"])
    return {"image": images[index], "label": labels[index]}


def _digits(cfg: DataConfig, split: str) -> tuple[ray.data.Dataset, int]:
    import ray.data

    from sscl.data.digits import DIGITS_COUNT, split_indices

    train_idx, test_idx = split_indices(DIGITS_COUNT, test_fraction=cfg.test_fraction)
    index = test_idx if split == "eval_test" else train_idx
    rows = ray.data.from_items([{"index": int(i)} for i in index], override_num_blocks=4)
    return rows.map_batches(_digits_rows, fn_kwargs={"size": cfg.image_size}, batch_size=512), len(index)


# ---------------------------------------------------------------------------- the splits


@dataclass(frozen=True)
class Split:
    """Attributes: dataset (lazy; columns ``image``, ``label``); num_images: how many it reads,
    from metadata where the source has it (files listed, Parquet footers, STL-10 file sizes), so
    undecodable images skipped later are still counted."""

    dataset: Any
    num_images: int


def _bounded(ds: ray.data.Dataset, max_images: int, total: int | None = None) -> Split:
    """At most about ``max_images`` rows, chosen by a hash of each image (the same every execution)."""
    if total is None:
        total = ds.count()  # CIFAR: unpickled in Ray tasks; only the count comes back
    if not max_images or total <= max_images:
        return Split(ds, total)
    return Split(ds.map_batches(_keep_by_hash, batch_size=_DECODE_BATCH, fn_kwargs={"fraction": max_images / total}),
                 max_images)


def _keep_by_hash(batch: dict[str, np.ndarray], *, fraction: float) -> dict[str, np.ndarray]:
    mask = np.array([held_out(img.tobytes(), fraction, salt="bank") for img in batch["image"]], dtype=bool)
    return {k: v[mask] for k, v in batch.items()}


def _check_split(cfg: DataConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.eval_root and cfg.source not in ("imagefolder", "parquet"):
        raise ValueError(f"data.eval_root={cfg.eval_root!r}: for imagefolder and parquet sources; {cfg.source} has its "
                         "own test split")
    if cfg.source not in ("imagefolder", "parquet", "stl10", "digits", *_CIFAR):
        raise ValueError(f"unknown data.source {cfg.source!r}")


def _files_of(cfg: DataConfig, split: str, max_images: int) -> tuple[str, _Selection]:
    """Image folders and Parquet: the root a split reads and which of its images it keeps."""
    evaluation = split != "pretrain"
    root = cfg.eval_root if split == "eval_test" and cfg.eval_root else cfg.root
    held = cfg.test_fraction if evaluation and not cfg.eval_root else None
    return root, _Selection(labelled_only=evaluation, test_fraction=held, held_out_side=split == "eval_test",
                            max_images=max_images if evaluation else 0)


def check_roots(cfg: DataConfig) -> None:
    """The data's roots and files exist (or will be downloaded), checked without Ray and without
    reading any image: called before a pipeline starts Ray or touches MLflow.

    Raises:
        FileNotFoundError, ConnectionError: naming the missing path or the unreachable bucket.
    """
    if cfg.source in ("imagefolder", "parquet"):
        for key, root in (("data.root", cfg.root), ("data.eval_root", cfg.eval_root)):
            if root:
                try:
                    _filesystem(root)
                except FileNotFoundError as err:
                    where = "" if "://" in root else f" ({Path(root).expanduser().resolve()})"
                    raise FileNotFoundError(f"{key}={root!r}{where}: {err}") from None
    elif cfg.source in _CIFAR and not cfg.download:
        for train in (True, False):
            _cifar_files(cfg, train)
    elif cfg.source == "stl10" and not cfg.download:
        for split in ("train", "test"):  # unlabeled: checked when a pretraining split is built
            _stl10_files(cfg, split)


def build_dataset(cfg: DataConfig, split: str, *, max_images: int = 0, seed: int | None = None,
                  bad_images: Any = None, encoded: bool = False) -> Split:
    """One split as a lazy Ray Dataset with columns ``image`` (uint8 (H, W, 3)) and ``label`` (int64),
    or with ``encoded`` (image folders and Parquet) ``bytes`` (as stored), ``label`` and ``where``.

    Only paths and metadata are read here; images are read and decoded in Ray tasks when the
    dataset runs, again each epoch.

    Args:
        cfg: the ``data`` section of the config.
        split: "pretrain", "eval_train" or "eval_test".
        max_images: evaluation sets: keep at most this many images (0 = all).
        seed: file-based pretraining sources: seeds the file order, a new order each epoch and the
            same sequence of orders after a restart; None keeps the listing order.
        bad_images: a ``BadImages`` actor handle told of every undecodable image.
        encoded: pass image folders' and Parquet's encoded images on undecoded (``placement.decode=device``).

    Raises:
        FileNotFoundError: naming a missing root or file, or a folder without images.
        ConnectionError: naming an unreachable bucket or server.
        ValueError: naming the config key of a missing column, or a split without labels.
        CorruptDataError: naming a file whose size is wrong (found before anything is read).
    """
    evaluation = split != "pretrain"
    source = cfg.source
    _check_split(cfg, split)
    if source in ("imagefolder", "parquet"):
        decoder = Decoder(cfg.image_size, cfg.skip_corrupt, bad_images, encoded=encoded)
        root, selection = _files_of(cfg, split, max_images)
        seed = None if evaluation else seed
        if source == "imagefolder":
            return _image_folder(root, selection, decoder, seed, classes_root=cfg.root)
        return _parquet(root, cfg, selection, decoder, seed)
    total = None
    if source in _CIFAR:
        ds = _cifar(cfg, train=split != "eval_test")
    elif source == "stl10":
        parts = ["unlabeled", "train"] if split == "pretrain" else ["train" if split == "eval_train" else "test"]
        splits = [_stl10_split(cfg, p) for p in parts]
        ds = splits[0].dataset.union(*[s.dataset for s in splits[1:]]) if len(splits) > 1 else splits[0].dataset
        total = sum(s.num_images for s in splits)
    elif source == "digits":
        ds, total = _digits(cfg, split)
    else:
        raise ValueError(f"unknown data.source {source!r}")
    return _bounded(ds, max_images if evaluation else 0, total)


# ---------------------------------------------------------------------------- without Ray

_LOCAL_UNIT = 256  # images per read unit of an image folder or digits


@dataclass(frozen=True)
class LocalSplit:
    """A split read in this process without Ray (``pipelines.train_local``): the same files, held-out
    sides, bounds, decoding and errors as ``build_dataset``, read unit by unit (a CIFAR pickle, 1,024
    STL-10 images, 256 files, a Parquet row group), never whole.

    Attributes:
        units: what one read covers; read: reads one unit into ``image``/``label`` arrays;
        num_images: as ``Split.num_images``.
    """

    units: list[Any]
    read: Callable[[Any], dict[str, np.ndarray]]
    num_images: int

    def batches(self, batch_size: int, *, seed: int | None = None, workers: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """``{"image": uint8 (N, H, W, 3), "label": int64 (N,)}`` batches of ``batch_size`` rows.

        Args:
            seed: shuffles the units and, within a buffer of a few batches, the rows (pretraining);
                None keeps the listing order.
            workers: DataLoader processes reading and decoding units (0: this process).
            drop_last: drop a last batch smaller than ``batch_size``.
        """
        import torch.utils.data

        rng = np.random.default_rng(seed) if seed is not None else None
        units = self.units if rng is None else [self.units[i] for i in rng.permutation(len(self.units))]
        loader = torch.utils.data.DataLoader(_Units(units, self.read), batch_size=None, num_workers=workers,
                                             collate_fn=lambda part: part)
        pending, held = [], 0
        for part in loader:
            if "error" in part:
                raise (CorruptDataError if part["corrupt"] else DataError)(part["error"])
            pending.append(part)
            held += len(part["label"])
            if held >= (4 if rng is not None else 1) * batch_size:
                rows = _concat(pending, rng)
                cut = len(rows["label"]) // batch_size * batch_size
                yield from _chunks(rows, batch_size, stop=cut)
                pending, held = [{k: v[cut:] for k, v in rows.items()}], len(rows["label"]) - cut
        if held >= (batch_size if drop_last else 1):
            yield from _chunks(_concat(pending, rng), batch_size)


def local_split(cfg: DataConfig, split: str, *, max_images: int = 0) -> LocalSplit:
    """One split for reading without Ray; only metadata is read here. Arguments and errors as
    :func:`build_dataset`."""
    _check_split(cfg, split)
    return _local_units(cfg, split, max_images)


class _Units:
    """A map-style dataset of read units for ``torch.utils.data.DataLoader``."""

    def __init__(self, units: list[Any], read: Callable[[Any], dict[str, np.ndarray]]) -> None:
        self.units, self.read = units, read

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.read(self.units[i])
        except DataError as err:  # carried as data: a DataLoader process would re-raise it with its traceback
            return {"error": str(err), "corrupt": isinstance(err, CorruptDataError)}


def _concat(parts: list[dict[str, np.ndarray]], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    rows = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}
    if rng is None:
        return rows
    order = rng.permutation(len(rows["label"]))
    return {k: v[order] for k, v in rows.items()}


def _chunks(rows: dict[str, np.ndarray], size: int, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    stop = len(rows["label"]) if stop is None else stop
    for start in range(0, stop, size):
        yield {k: v[start : min(start + size, stop)] for k, v in rows.items()}


def _local_units(cfg: DataConfig, split: str, max_images: int) -> LocalSplit:
    evaluation = split != "pretrain"
    bound = max_images if evaluation else 0
    if cfg.source in ("imagefolder", "parquet"):
        root, selection = _files_of(cfg, split, bound)
        decoder = Decoder(cfg.image_size, cfg.skip_corrupt)
        if cfg.source == "imagefolder":
            return _local_folder(root, selection, decoder, classes_root=cfg.root)
        return _local_parquet(root, cfg, selection, decoder)
    if cfg.source in _CIFAR:
        files, label_key = _cifar_files(cfg, train=split != "eval_test")
        units = [str(f) for f in files]
        read = functools.partial(_read_cifar_path, label_key=label_key)
        total = sum(len(read(f)["label"]) for f in units)  # as Ray's count: each pickle read once
    elif cfg.source == "stl10":
        parts = ["unlabeled", "train"] if split == "pretrain" else ["train" if split == "eval_train" else "test"]
        units, total = [], 0
        for part in parts:
            x_path, y_path, n_images = _stl10_files(cfg, part)
            units += [(chunk, x_path, y_path, n_images) for chunk in range(-(-n_images // _STL_CHUNK))]
            total += n_images
        read = _read_stl_unit
    else:
        from sscl.data.digits import DIGITS_COUNT, split_indices

        train_idx, test_idx = split_indices(DIGITS_COUNT, test_fraction=cfg.test_fraction)
        index = test_idx if split == "eval_test" else train_idx
        units, total = [index[i : i + _LOCAL_UNIT] for i in range(0, len(index), _LOCAL_UNIT)], len(index)
        read = functools.partial(_read_digits_unit, size=cfg.image_size)
    if bound and total > bound:
        return LocalSplit(units, functools.partial(_bounded_read, read=read, fraction=bound / total), bound)
    return LocalSplit(units, read, total)


def _read_cifar_path(path: str, *, label_key: bytes) -> dict[str, np.ndarray]:
    return read_cifar_file(Path(path).read_bytes(), label_key=label_key, where=path)


def _read_stl_unit(unit: tuple[int, str, str, int]) -> dict[str, np.ndarray]:
    chunk, x_path, y_path, n_images = unit
    return _read_stl_chunk({"id": np.array([chunk])}, x_path=x_path, y_path=y_path, n_images=n_images)


def _read_digits_unit(index: np.ndarray, *, size: int) -> dict[str, np.ndarray]:
    return _digits_rows({"index": index}, size=size)


def _bounded_read(unit: Any, *, read: Callable[[Any], dict[str, np.ndarray]], fraction: float) -> dict[str, np.ndarray]:
    return _keep_by_hash(read(unit), fraction=fraction)


def _local_folder(root: str, selection: _Selection, decoder: Decoder, classes_root: str) -> LocalSplit:
    listing, files = _folder_files(root, selection, classes_root)
    paths = _selected(listing, files, root, selection)
    units = [paths[i : i + _LOCAL_UNIT] for i in range(0, len(paths), _LOCAL_UNIT)]
    return LocalSplit(units, functools.partial(_read_folder_unit, fs=listing.fs, files=files, decoder=decoder),
                      len(paths))


def _read_folder_unit(paths: list[str], *, fs: Any, files: _FolderFiles, decoder: Decoder) -> dict[str, np.ndarray]:
    data = []
    for path in paths:
        with fs.open_input_file(path) as fh:
            data.append(fh.readall())
    return decoder.decode(data, [files.label(p) for p in paths], paths)


def _local_parquet(root: str, cfg: DataConfig, selection: _Selection, decoder: Decoder) -> LocalSplit:
    import pyarrow.dataset as pads

    fs, base = _filesystem(root)
    try:
        dataset = pads.dataset(base, filesystem=fs, format="parquet")
        fragments = [(f.path, group.id) for f in dataset.get_fragments() for group in f.row_groups]  # footers only
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot read {root}: {err}") from None
    columns = _parquet_columns(dataset.schema.names, root, cfg, selection)
    rows = dataset.count_rows()  # from the files' footers
    decoding = _parquet_decoding(cfg, selection, decoder, rows)
    return LocalSplit(fragments, functools.partial(_read_row_group, fs=fs, columns=columns, decoding=decoding), rows)


def _read_row_group(unit: tuple[str, int], *, fs: Any, columns: list[str], decoding: dict[str, Any]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    path, group = unit
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(group, columns=columns)
    return _decode_rows(table.to_pydict(), **decoding)
