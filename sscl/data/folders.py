"""Image trees: one listing with one set of rules for every back-end (what counts as an image, hidden
files, links, class folders), and which of a tree's files a split reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sscl.data.decode import DataError, held_out

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

    from sscl.config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "FolderFiles", "FolderListing", "Selection", "folder_classes", "folder_files",
           "check_roots_exist", "list_folder", "open_root", "selected_paths", "split_root"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")


def open_root(root: str) -> tuple[pyarrow.fs.FileSystem, str]:
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

    def _hash(self, path: str) -> bytes:
        return hashlib.blake2b(self.relative(path).encode(), digest_size=8).digest()

    def __call__(self, paths: list[str]) -> list[str]:
        kept = [p for p in paths if self.selection.keeps(self.relative(p), self.label(p))]
        limit = self.selection.max_images
        if limit and len(kept) > limit:
            # An exact, order-independent subset: the files with the smallest path hashes.
            kept = sorted(kept, key=self._hash)[:limit]
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

    fs, base = open_root(root)
    if isinstance(fs, pafs.LocalFileSystem):
        paths = _walk_local(base)
    else:
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        paths = sorted(e.path for e in listed if e.type == pafs.FileType.File and _is_image(e.base_name)
                       and not any(part.startswith(".") for part in e.path[len(base) + 1:].split("/")))
    classes = sorted({p[len(base) + 1:].split("/")[0] for p in paths if "/" in p[len(base) + 1:]})
    return FolderListing(fs, base, paths, classes)


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


def folder_classes(root: str) -> list[str]:
    """The sorted class folders directly under ``root`` that hold images (``list_folder``'s rules)."""
    return list_folder(root).classes


def split_root(cfg: DataConfig, split: str, max_images: int) -> tuple[str, Selection]:
    """Image folders and Parquet: the root a split reads and which of its images it keeps
    (``max_images``: 0 = all)."""
    evaluation = split != "pretrain"
    root = cfg.eval_root if split == "eval_test" and cfg.eval_root else cfg.root
    held = cfg.test_fraction if evaluation and not cfg.eval_root else None
    return root, Selection(labelled_only=evaluation, test_fraction=held, held_out_side=split == "eval_test",
                           max_images=max_images)


def check_roots_exist(cfg: DataConfig) -> None:
    """``data.root`` and ``data.eval_root`` exist (image folders and Parquet), nothing read.

    Raises:
        FileNotFoundError, ConnectionError: naming the key, the root and the resolved path.
    """
    for key, root in (("data.root", cfg.root), ("data.eval_root", cfg.eval_root)):
        if root:
            try:
                open_root(root)
            except FileNotFoundError as err:
                where = "" if "://" in root else f" ({Path(root).expanduser().resolve()})"
                raise FileNotFoundError(f"{key}={root!r}{where}: {err}") from None
