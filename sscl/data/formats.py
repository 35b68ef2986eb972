"""What each source's files hold and the rules for reading them, shared by the Ray back-end
(``sscl.data.sources``) and the in-process one (``sscl.data.local``): an image folder's listing and
labels, which files or rows a split keeps (a hash of each path or image: no listing pass), Parquet's
columns, CIFAR's pickles, STL-10's binaries read by byte range, the bundled digits.

Nothing here imports Ray: each reader takes a batch (a dict of arrays) and returns ``image``
(uint8 (N, H, W, 3)) and ``label`` (int64, -1 when unlabelled).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sscl.data.decode import CorruptDataError, DataError, Decoder

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

    from sscl.config import DataConfig

SPLITS = ("pretrain", "eval_train", "eval_test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE
STL_CHUNK = 1024  # images per STL-10 read task (about 28 MB)
DECODE_BATCH = 64


def held_out(key: str | bytes, fraction: float, salt: str = "test") -> bool:
    """Whether an item belongs to a held-out ``fraction``, decided by a hash of ``key`` alone.

    The same key lands on the same side in every process and execution, whatever the order or
    the number of files, so a split needs no listing pass and no materialisation.
    """
    data = key.encode() if isinstance(key, str) else key
    digest = hashlib.blake2b(data, digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def filesystem(root: str) -> tuple[pyarrow.fs.FileSystem, str]:
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


# ---------------------------------------------------------------------------- image folders and Parquet


@dataclass(frozen=True)
class Selection:
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


class FolderFiles:
    """The files of an image tree a split reads, decided per path before anything is read.

    ``root/<class>/<file>`` is labelled by its class's index in ``classes`` (the training root's, so
    an evaluation tree's classes are matched by name); files directly under ``root`` are unlabelled
    (pretraining only).
    """

    def __init__(self, base: str, classes: list[str], selection: Selection) -> None:
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
    ``_`` count like any other. Symbolic links to files are read wherever they point (a subset of a
    dataset made of links to its files): a file link cannot bring in a tree. A link to a folder is
    followed only when it resolves to a folder inside the root that is not listed yet; one that leads
    outside the root, or to an ancestor of it, is left out and counted (followed, ``root/b/up -> ../..``
    would make every sibling of the root a part of class ``b``); one to the root itself or to a folder
    already listed adds nothing and is skipped. Broken links are skipped. Classes are the folders
    directly under the root that hold images. Object stores have no links.

    Attributes:
        fs, base: the pyarrow filesystem and the root's path in it.
        paths: every image's path, sorted.
        classes: the sorted class folder names.
        links_left_out: how many folder links leading outside the root were not followed.
        first_link_left_out: the first of them, ``<path below the root> -> <where it leads>`` ("" when none).
    """

    fs: Any
    base: str
    paths: list[str]
    classes: list[str]
    links_left_out: int = 0
    first_link_left_out: str = ""

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for path in self.paths:
            parts = path[len(self.base) + 1:].split("/")
            if len(parts) >= 2:
                counts[parts[0]] += 1
        return counts


def _is_image(name: str) -> bool:
    return not name.startswith(".") and "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _walk_local(base: str) -> tuple[list[str], list[str]]:
    """Image paths under a local ``base``, and the folder links left out (``<link> -> <target>``).

    Real folders are listed first, then folder links, each to a folder inside the root not listed yet
    (no loops, no folder twice, the same result whatever the order on disk).
    """
    import os

    root = os.path.realpath(base)
    inside = os.path.join(root, "")  # with its trailing separator: /data/a is not inside /data/ab
    found, seen, real, links, left_out = [], set(), [base], [], []
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
                if entry.is_dir() and entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if target.startswith(inside):
                        links.append(entry.path)
                    elif target != root:  # outside, or an ancestor; the root itself adds nothing
                        left_out.append(f"{entry.path[len(base) + 1:]} -> {target}")
                elif entry.is_dir():
                    real.append(entry.path)
                elif entry.is_file() and _is_image(entry.name):
                    found.append(entry.path)
            except OSError:
                continue
    return sorted(found), sorted(left_out)


def list_folder(root: str) -> FolderListing:
    """Lists the images of the tree at ``root`` (a local path or a URI) by :class:`FolderListing`'s rules.

    Raises:
        FileNotFoundError / ConnectionError: naming the root when it is missing or unreachable.
    """
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    left_out: list[str] = []
    if isinstance(fs, pafs.LocalFileSystem):
        paths, left_out = _walk_local(base)
    else:  # object stores and the like have no links
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        paths = sorted(e.path for e in listed if e.type == pafs.FileType.File and _is_image(e.base_name)
                       and not any(part.startswith(".") for part in e.path[len(base) + 1:].split("/")))
    classes = sorted({p[len(base) + 1:].split("/")[0] for p in paths if "/" in p[len(base) + 1:]})
    return FolderListing(fs, base, paths, classes, len(left_out), left_out[0] if left_out else "")


def folder_files(root: str, selection: Selection, classes_root: str) -> tuple[FolderListing, FolderFiles]:
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
    return listing, FolderFiles(listing.base, classes, selection)


def listing_notes(listing: FolderListing, root: str, classes_root: str) -> tuple[str, ...]:
    """What the user is told about ``root``'s listing: one line when it left folder links out, else none.

    Args:
        listing: ``root``'s listing.
        root, classes_root: as given to :func:`folder_files` (``root`` is ``data.eval_root`` when they differ).
    """
    count = listing.links_left_out
    if not count:
        return ()
    key = "data.root" if root == classes_root else "data.eval_root"
    more = f", and {count - 1} more" if count > 1 else ""
    return (f"{key}={root}: left out {count} folder link(s) leading outside the root ({listing.first_link_left_out}"
            f"{more}); to read those images, copy them into the root or link each file",)


def selected_paths(listing: FolderListing, files: FolderFiles, root: str, selection: Selection) -> list[str]:
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


def decode_files(batch: dict[str, Any], *, decoder: Decoder, files: FolderFiles, keyed: bool = False
                 ) -> dict[str, np.ndarray]:
    """An image folder's read batch (``bytes``, ``path``) decoded; ``keyed``: with each image's path
    below the root as its ``key``."""
    paths = list(batch["path"])
    keys = [files.relative(p) for p in paths] if keyed else None
    return decoder.decode(list(batch["bytes"]), [files.label(p) for p in paths], paths, keys)


def folder_classes(root: str) -> list[str]:
    """The sorted class folders directly under ``root`` that hold images (``list_folder``'s rules)."""
    return list_folder(root).classes


def decode_rows(batch: dict[str, Any], *, decoder: Decoder, image_column: str, label_column: str,
                selection: Selection, keep_fraction: float, keyed: bool = False) -> dict[str, np.ndarray]:
    """Parquet rows decoded; ``keyed``: with a digest of each image cell as its ``key`` (the same
    image stored twice has one key)."""
    values = list(batch[image_column])
    labels = [_label(v, label_column) for v in batch[label_column]] if label_column else [-1] * len(values)
    keys = [v if isinstance(v, bytes) else b"" if v is None else np.asarray(v).tobytes() for v in values]
    chosen = [i for i, key in enumerate(keys) if selection.keeps(key, labels[i])
              and (keep_fraction >= 1 or held_out(key, keep_fraction, salt="bank"))]
    names = [f"{image_column} value with digest {hashlib.blake2b(keys[i], digest_size=6).hexdigest()}" for i in chosen]
    digests = [hashlib.blake2b(keys[i], digest_size=8).hexdigest() for i in chosen] if keyed else None
    return decoder.decode([values[i] for i in chosen], [labels[i] for i in chosen], names, digests)


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


def parquet_columns(names: list[str], root: str, cfg: DataConfig, selection: Selection) -> list[str]:
    """The image (and label) column to read, checked against the files' ``names``."""
    for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if column and column not in names:
            raise ValueError(f"{key}={column!r} is not a column of {root}; columns: {', '.join(names)}")
    if selection.labelled_only and not cfg.label_column:
        raise ValueError(f"data.label_column='': evaluation on {root} needs a label column, or set data.eval_root")
    return [cfg.image_column] + ([cfg.label_column] if cfg.label_column else [])


def parquet_decoding(cfg: DataConfig, selection: Selection, decoder: Decoder, rows: int, keyed: bool = False
                     ) -> dict[str, Any]:
    """``decode_rows`` keywords for a Parquet split of ``rows`` rows."""
    keep_fraction = 1.0
    if selection.max_images:
        expected = rows * (1 - selection.test_fraction if selection.test_fraction and not selection.held_out_side else 1)
        keep_fraction = min(1.0, selection.max_images / max(expected, 1))  # about max_images, by content hash
    return {"decoder": decoder, "image_column": cfg.image_column, "label_column": cfg.label_column,
            "selection": selection, "keep_fraction": keep_fraction, "keyed": keyed}


# ---------------------------------------------------------------------------- CIFAR, STL-10, digits


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


def unpickle_cifar(batch: dict[str, Any], *, label_key: bytes, keyed: bool = False) -> dict[str, np.ndarray]:
    """CIFAR pickles read; ``keyed``: with ``<file>:<index in it>`` as each image's ``key``."""
    parts = [read_cifar_file(data, label_key=label_key, where=path) for data, path in zip(batch["bytes"], batch["path"])]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}
    if keyed:
        out["key"] = np.asarray([f"{Path(path).name}:{i}" for path, part in zip(batch["path"], parts)
                                 for i in range(len(part["label"]))], dtype=object)
    return out


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


def read_stl_chunk(batch: dict[str, np.ndarray], *, x_path: str, y_path: str, n_images: int,
                   keyed: bool = False) -> dict[str, np.ndarray]:
    """Images ``[id * chunk, (id + 1) * chunk)`` of an STL-10 binary, read by byte range; ``keyed``:
    with ``<file>:<index in it>`` as each image's ``key``."""
    import pyarrow.fs as pafs

    out_images, out_labels, out_keys = [], [], []
    for chunk in batch["id"]:
        first = int(chunk) * STL_CHUNK
        count = min(STL_CHUNK, n_images - first)
        out_keys += [f"{x_path.rsplit('/', 1)[-1]}:{i}" for i in range(first, first + count)]
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
    out = {"image": np.ascontiguousarray(np.concatenate(out_images)), "label": np.concatenate(out_labels)}
    return out | ({"key": np.asarray(out_keys, dtype=object)} if keyed else {})


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


def digits_rows(batch: dict[str, np.ndarray], *, size: int, keyed: bool = False) -> dict[str, np.ndarray]:
    """The bundled digits at ``batch["index"]``; ``keyed``: with ``digits:<index>`` as each image's ``key``."""
    from sscl.data.digits import load_digits_images

    images, labels = load_digits_images(size)  # bundled with scikit-learn: 1,797 images, read in the task
    index = np.asarray(batch["index"])
    out = {"image": images[index], "label": labels[index]}
    return out | ({"key": np.asarray([f"digits:{i}" for i in index], dtype=object)} if keyed else {})


# ---------------------------------------------------------------------------- the splits


def keep_by_hash(batch: dict[str, np.ndarray], *, fraction: float) -> dict[str, np.ndarray]:
    mask = np.array([held_out(img.tobytes(), fraction, salt="bank") for img in batch["image"]], dtype=bool)
    return {k: v[mask] for k, v in batch.items()}


def check_split(cfg: DataConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.eval_root and cfg.source not in ("imagefolder", "parquet"):
        raise ValueError(f"data.eval_root={cfg.eval_root!r}: for imagefolder and parquet sources; {cfg.source} has its "
                         "own test split")
    if cfg.source not in ("imagefolder", "parquet", "stl10", "digits", *CIFAR):
        raise ValueError(f"unknown data.source {cfg.source!r}")


def files_of(cfg: DataConfig, split: str, max_images: int) -> tuple[str, Selection]:
    """Image folders and Parquet: the root a split reads and which of its images it keeps."""
    evaluation = split != "pretrain"
    root = cfg.eval_root if split == "eval_test" and cfg.eval_root else cfg.root
    held = cfg.test_fraction if evaluation and not cfg.eval_root else None
    return root, Selection(labelled_only=evaluation, test_fraction=held, held_out_side=split == "eval_test",
                            max_images=max_images if evaluation else 0)
