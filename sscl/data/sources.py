"""Dataset sources as lazy Ray Datasets: files are listed on the driver (paths only), read and
decoded in Ray tasks on the cluster, and streamed; no process ever holds a whole split's pixels.

Every source gives the same columns: ``image`` (uint8 (H, W, 3)) and ``label`` (int64, -1 when
unlabelled), and on request ``key``, each image's name within the source (``pipelines.embed``). Splits:

- ``pretrain``: what the encoder trains on, in a new file order every epoch (seeded);
- ``eval_train``: the labelled kNN bank and linear-probe training set, at most
  ``train.knn_max_images`` images;
- ``eval_test``: the labelled evaluation set: ``data.eval_root`` when set, the source's own test
  split (CIFAR, STL-10, digits), else a held-out fraction chosen by a hash of each file's path
  (image folders) or of each image's bytes (Parquet), so no listing pass has to be materialised.

What the files hold and which of them a split keeps is ``sscl.data.formats``, shared with
``sscl.data.local``, which reads the same splits in one process without Ray. Ray is imported inside
the functions: the rest of ``sscl`` runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sscl.data.decode import Decoder
from sscl.data.formats import (CIFAR, DECODE_BATCH, STL_CHUNK, Selection, check_split, cifar_files, decode_files,
                               decode_rows, digits_rows, files_of, filesystem, folder_files, keep_by_hash,
                               listing_notes, parquet_columns, parquet_decoding, read_stl_chunk, selected_paths,
                               stl10_files, unpickle_cifar)

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from sscl.config import DataConfig

__all__ = ["Split", "build_dataset", "check_roots"]


@dataclass(frozen=True)
class Split:
    """Attributes: dataset (lazy; columns ``image``, ``label``); num_images: how many it reads,
    from metadata where the source has it (files listed, Parquet footers, STL-10 file sizes), so
    undecodable images skipped later are still counted; notes: lines for the user on what the
    listing left out (``listing_notes``), printed by the pipeline that lists."""

    dataset: Any
    num_images: int
    notes: tuple[str, ...] = ()


def _bounded(ds: ray.data.Dataset, max_images: int, total: int | None = None) -> Split:
    """At most about ``max_images`` rows, chosen by a hash of each image (the same every execution)."""
    if total is None:
        total = ds.count()  # CIFAR: unpickled in Ray tasks; only the count comes back
    if not max_images or total <= max_images:
        return Split(ds, total)
    return Split(ds.map_batches(keep_by_hash, batch_size=DECODE_BATCH, fn_kwargs={"fraction": max_images / total}),
                 max_images)


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
                    filesystem(root)
                except FileNotFoundError as err:
                    where = "" if "://" in root else f" ({Path(root).expanduser().resolve()})"
                    raise FileNotFoundError(f"{key}={root!r}{where}: {err}") from None
    elif cfg.source in CIFAR and not cfg.download:
        for train in (True, False):
            cifar_files(cfg, train)
    elif cfg.source == "stl10" and not cfg.download:
        for split in ("train", "test"):  # unlabeled: checked when a pretraining split is built
            stl10_files(cfg, split)


def build_dataset(cfg: DataConfig, split: str, *, max_images: int = 0, seed: int | None = None,
                  bad_images: Any = None, encoded: bool = False, keyed: bool = False) -> Split:
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
        keyed: add a ``key`` column naming each image within the source: its path below the root (image
            folders), a digest of its cell (Parquet), ``<file>:<index>`` (CIFAR, STL-10), ``digits:<index>``.

    Raises:
        FileNotFoundError: naming a missing root or file, or a folder without images.
        ConnectionError: naming an unreachable bucket or server.
        ValueError: naming the config key of a missing column, or a split without labels.
        CorruptDataError: naming a file whose size is wrong (found before anything is read).
    """
    evaluation = split != "pretrain"
    source = cfg.source
    check_split(cfg, split)
    if source in ("imagefolder", "parquet"):
        decoder = Decoder(cfg.image_size, cfg.skip_corrupt, bad_images, encoded=encoded)
        root, selection = files_of(cfg, split, max_images)
        seed = None if evaluation else seed
        if source == "imagefolder":
            return _image_folder(root, selection, decoder, seed, classes_root=cfg.root, keyed=keyed)
        return _parquet(root, cfg, selection, decoder, seed, keyed=keyed)
    total = None
    if source in CIFAR:
        ds = _cifar(cfg, train=split != "eval_test", keyed=keyed)
    elif source == "stl10":
        parts = ["unlabeled", "train"] if split == "pretrain" else ["train" if split == "eval_train" else "test"]
        splits = [_stl10_split(cfg, p, keyed) for p in parts]
        ds = splits[0].dataset.union(*[s.dataset for s in splits[1:]]) if len(splits) > 1 else splits[0].dataset
        total = sum(s.num_images for s in splits)
    elif source == "digits":
        ds, total = _digits(cfg, split, keyed)
    else:
        raise ValueError(f"unknown data.source {source!r}")
    return _bounded(ds, max_images if evaluation else 0, total)


def _shuffle(seed: int | None):
    import ray.data

    return ray.data.FileShuffleConfig(seed=seed) if seed is not None else None


def _image_folder(root: str, selection: Selection, decoder: Decoder, seed: int | None, classes_root: str,
                  keyed: bool) -> Split:
    import ray.data

    listing, files = folder_files(root, selection, classes_root)
    paths = selected_paths(listing, files, root, selection)
    # The listing's own paths: Ray's directory listing has other rules (it drops top-level "_" names).
    read = ray.data.read_binary_files(paths, filesystem=listing.fs, include_paths=True, shuffle=_shuffle(seed))
    decoded = read.map_batches(decode_files, fn_kwargs={"decoder": decoder, "files": files, "keyed": keyed},
                               batch_size=DECODE_BATCH)
    return Split(decoded, len(paths), listing_notes(listing, root, classes_root))


def _parquet(root: str, cfg: DataConfig, selection: Selection, decoder: Decoder, seed: int | None,
             keyed: bool) -> Split:
    import ray.data

    fs, base = filesystem(root)
    try:
        read = ray.data.read_parquet(base, filesystem=fs, shuffle=_shuffle(seed))
        names = read.schema().names  # from one file's footer
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot read {root}: {err}") from None
    read = read.select_columns(parquet_columns(names, root, cfg, selection))
    rows = read.count()  # from the files' footers
    decoded = read.map_batches(decode_rows, batch_size=DECODE_BATCH,
                               fn_kwargs=parquet_decoding(cfg, selection, decoder, rows, keyed))
    return Split(decoded, rows)


def _cifar(cfg: DataConfig, train: bool, keyed: bool) -> ray.data.Dataset:
    import ray.data

    files, label_key = cifar_files(cfg, train)
    # One task per pickle (10,000 images each): the files are read and unpickled on the cluster.
    ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True, override_num_blocks=len(files))
    return ds.map_batches(unpickle_cifar, fn_kwargs={"label_key": label_key, "keyed": keyed}, batch_size=1)


def _stl10_split(cfg: DataConfig, split: str, keyed: bool) -> Split:
    import ray.data

    x_path, y_path, n_images = stl10_files(cfg, split)
    n_chunks = -(-n_images // STL_CHUNK)
    chunks = ray.data.range(n_chunks, override_num_blocks=n_chunks)  # one read task per chunk of the file
    return Split(chunks.map_batches(read_stl_chunk, batch_size=1,
                                    fn_kwargs={"x_path": x_path, "y_path": y_path, "n_images": n_images,
                                               "keyed": keyed}), n_images)


def _digits(cfg: DataConfig, split: str, keyed: bool) -> tuple[ray.data.Dataset, int]:
    import ray.data

    from sscl.data.digits import DIGITS_COUNT, split_indices

    train_idx, test_idx = split_indices(DIGITS_COUNT, test_fraction=cfg.test_fraction)
    index = test_idx if split == "eval_test" else train_idx
    rows = ray.data.from_items([{"index": int(i)} for i in index], override_num_blocks=4)
    return rows.map_batches(digits_rows, fn_kwargs={"size": cfg.image_size, "keyed": keyed}, batch_size=512), len(index)
