"""Dataset sources, each described once and read by two back-ends.

A split of a source is a :class:`Units`: its read units (image files, Parquet row groups, CIFAR
pickles, 1,024-image chunks of an STL-10 binary, chunks of digit indices: paths and numbers, never
pixels), how to read some of them, and how many images they hold. ``build_dataset`` turns it into a
lazy Ray Dataset whose units are read and decoded in Ray tasks, again each epoch, so no process
holds a whole split's pixels; ``local_split`` reads the same units in this process and its
DataLoader workers, without Ray (``pipelines.train_local``). Both see the same images: one listing,
one held-out split, one bound, one decoder and the same errors.

Columns: ``image`` (uint8 (H, W, 3)) and ``label`` (int64, -1 when unlabelled). Splits:

- ``pretrain``: what the encoder trains on, in a new unit order every epoch (seeded);
- ``eval_train``: the labelled kNN bank and linear-probe training set, at most
  ``train.knn_max_images`` images;
- ``eval_test``: the labelled evaluation set: ``data.eval_root`` when set, the source's own test
  split (CIFAR, STL-10, digits), else a held-out fraction chosen by a hash of each file's path
  (image folders) or of each image's bytes (Parquet), so no listing pass has to be materialised.

Ray is imported inside the functions: the rest of ``sscl`` runs without it.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from sscl.data.decode import BadImages, CorruptDataError, DataError, Decoder, decode_image, held_out, keep_by_hash
from sscl.data.folders import (IMAGE_EXTENSIONS, FolderFiles, FolderListing, check_roots_exist, folder_classes,
                               folder_files, list_folder, open_root, selected_paths, split_root)
from sscl.data.formats import (STL_CHUNK, cifar_files, decode_rows, parquet_columns, parquet_decoding,
                               read_cifar_file, read_stl_chunk, stl10_files)

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from sscl.config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "SPLITS", "BadImages", "CorruptDataError", "DataError", "Decoder",
           "FolderListing", "LocalSplit", "Source", "Split", "Units", "build_dataset", "check_roots", "decode_image",
           "folder_classes", "held_out", "list_folder", "local_split", "read_cifar_file"]

SPLITS = ("pretrain", "eval_train", "eval_test")
_DECODE_BATCH = 64  # encoded images per decoding call (Ray's map batches, a read's Arrow tables)
_FILES_PER_READ = 256  # image files per read: one Ray read task, one DataLoader item
_DIGITS_PER_UNIT = 256


@dataclass(frozen=True)
class Units:
    """One split of one source, as both back-ends read it.

    Attributes:
        name: the source's name in Ray's operator and task names (``ReadImageFolder``).
        units: what one read covers, in listing order: small and picklable (paths, row groups,
            chunk numbers), never pixels.
        read: reads a list of units, yielding batches: rows (``image``, ``label``) or, where
            ``decode`` is set, Arrow tables of encoded cells.
        num_images: how many images the split reads, from metadata where the source has it (files
            listed, Parquet footers, STL-10 file sizes), so images skipped as undecodable still count;
            None: counted by reading (CIFAR pickles).
        decode: a ``functools.partial`` turning a batch of ``read``'s columns into rows (or encoded
            rows, ``placement.decode=device``); None when ``read`` gives rows.
        max_images: bound the rows to about this many by a hash of their pixels (0: unbounded, or
            bounded when listed, as image folders and Parquet are).
        per_read: units per read (one Ray read task, one DataLoader item).
    """

    name: str
    units: list[Any]
    read: Callable[[list[Any]], Iterable[Any]]
    num_images: int | None
    decode: functools.partial | None = None
    max_images: int = 0
    per_read: int = 1

    def bounded(self, count: Callable[[Units], int]) -> Units:
        """These units counted (by ``count``, reading them, where metadata has no count) and bounded
        to ``max_images`` (the same rows in every execution and back-end)."""
        total = self.num_images if self.num_images is not None else count(self)
        if not self.max_images or total <= self.max_images:
            return replace(self, num_images=total, max_images=0)
        read = functools.partial(_keep_read, read=self.read, fraction=self.max_images / total)
        return replace(self, read=read, num_images=self.max_images, max_images=0)

    def groups(self, order: Iterable[int]) -> list[list[Any]]:
        """The units in ``order``, ``per_read`` at a time."""
        ordered = [self.units[i] for i in order]
        return [ordered[i : i + self.per_read] for i in range(0, len(ordered), self.per_read)]


def _keep_read(units: list[Any], *, read: Callable[[list[Any]], Iterable[Any]], fraction: float) -> Iterator[Any]:
    for rows in read(units):
        yield keep_by_hash(rows, fraction=fraction)


@dataclass(frozen=True)
class Source:
    """A data source: how a split of it is described, and what ``check_roots`` checks of it.

    Attributes:
        units: ``(cfg, split, max_images, decoder) -> Units``: lists the split (metadata only);
            ``max_images`` is 0 for pretraining.
        check: checks the root's files exist (or will be downloaded) without reading any image.
        own_test_split: the source has its own test split, so ``data.eval_root`` is refused.
    """

    units: Callable[[DataConfig, str, int, Decoder], Units]
    check: Callable[[DataConfig], None]
    own_test_split: bool


# ---------------------------------------------------------------------------- image folders


def _folder_units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    root, selection = split_root(cfg, split, max_images)
    listing, files = folder_files(root, selection, classes_root=cfg.root)
    paths = selected_paths(listing, files, root, selection)  # bounded here, by path hash
    return Units("ImageFolder", paths, functools.partial(_read_files, fs=listing.fs), len(paths),
                 decode=functools.partial(_decode_files, decoder=decoder, files=files), per_read=_FILES_PER_READ)


def _read_files(paths: list[str], *, fs: Any) -> Iterator[Any]:
    """Arrow tables of ``bytes`` and ``path``, ``_DECODE_BATCH`` files each."""
    import pyarrow as pa

    def read(path: str) -> bytes:
        with fs.open_input_file(path) as fh:
            return fh.readall()

    # Threads overlap the files' latency (object storage); Ray's own file reader uses 8 per task too.
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(paths), _DECODE_BATCH):
            part = paths[start : start + _DECODE_BATCH]
            yield pa.table({"bytes": pa.array(list(pool.map(read, part)), pa.binary()),
                            "path": pa.array(part, pa.string())})


def _decode_files(batch: dict[str, Any], *, decoder: Decoder, files: FolderFiles) -> dict[str, np.ndarray]:
    paths = list(batch["path"])
    return decoder.decode(list(batch["bytes"]), [files.label(p) for p in paths], paths)


# ---------------------------------------------------------------------------- Parquet


def _parquet_units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    import pyarrow.dataset as pads

    root, selection = split_root(cfg, split, max_images)
    fs, base = open_root(root)
    try:
        dataset = pads.dataset(base, filesystem=fs, format="parquet")
        groups = [(f.path, g.id, g.num_rows) for f in dataset.get_fragments() for g in f.row_groups]  # footers only
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot read {root}: {err}") from None
    columns = parquet_columns(dataset.schema.names, root, cfg, selection)
    rows = sum(n for _, _, n in groups)
    decoding = parquet_decoding(cfg, selection, decoder, rows)  # bounded when decoded, by content hash
    return Units("Parquet", [(path, group) for path, group, _ in groups],
                 functools.partial(_read_row_groups, fs=fs, columns=columns), rows,
                 decode=functools.partial(decode_rows, **decoding))


def _read_row_groups(units: list[tuple[str, int]], *, fs: Any, columns: list[str]) -> Iterator[Any]:
    """Arrow tables of the ``columns`` of Parquet row groups, ``_DECODE_BATCH`` rows each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path, group in units:
        with fs.open_input_file(path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=_DECODE_BATCH, row_groups=[group],
                                                         columns=columns):
                yield pa.Table.from_batches([batch])


# ---------------------------------------------------------------------------- CIFAR, STL-10, digits


def _cifar_units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    files, label_key = cifar_files(cfg, train=split != "eval_test")
    # One unit per pickle (10,000 images each): read and unpickled where the unit is read.
    return Units("CIFAR", [str(f) for f in files], functools.partial(_read_cifar, label_key=label_key), None,
                 max_images=max_images)


def _read_cifar(paths: list[str], *, label_key: bytes) -> Iterator[dict[str, np.ndarray]]:
    for path in paths:
        yield read_cifar_file(Path(path).read_bytes(), label_key=label_key, where=path)


def _check_cifar(cfg: DataConfig) -> None:
    if not cfg.download:
        for train in (True, False):
            cifar_files(cfg, train)


def _stl10_units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    parts = ["unlabeled", "train"] if split == "pretrain" else ["train" if split == "eval_train" else "test"]
    units, total = [], 0
    for part in parts:
        x_path, y_path, n_images = stl10_files(cfg, part)  # sizes checked here, before anything is read
        units += [(x_path, y_path, n_images, chunk) for chunk in range(-(-n_images // STL_CHUNK))]
        total += n_images
    return Units("STL10", units, _read_stl, total, max_images=max_images)


def _read_stl(units: list[tuple[str, str, int, int]]) -> Iterator[dict[str, np.ndarray]]:
    for unit in units:
        yield read_stl_chunk(*unit)


def _check_stl10(cfg: DataConfig) -> None:
    if not cfg.download:
        for part in ("train", "test"):  # unlabeled: checked when a pretraining split is described
            stl10_files(cfg, part)


def _digits_units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    from sscl.data.digits import DIGITS_COUNT, split_indices

    train_idx, test_idx = split_indices(DIGITS_COUNT, test_fraction=cfg.test_fraction)
    index = test_idx if split == "eval_test" else train_idx
    chunks = [index[i : i + _DIGITS_PER_UNIT] for i in range(0, len(index), _DIGITS_PER_UNIT)]
    return Units("Digits", chunks, functools.partial(_read_digits, size=cfg.image_size), len(index),
                 max_images=max_images)


def _read_digits(chunks: list[np.ndarray], *, size: int) -> Iterator[dict[str, np.ndarray]]:
    from sscl.data.digits import load_digits_images

    images, labels = load_digits_images(size)  # bundled with scikit-learn: 1,797 images, loaded where read
    for index in chunks:
        yield {"image": images[index], "label": labels[index]}


def _nothing_to_check(cfg: DataConfig) -> None:  # digits ship with scikit-learn
    pass


SOURCES: dict[str, Source] = {
    "imagefolder": Source(_folder_units, check_roots_exist, own_test_split=False),
    "parquet": Source(_parquet_units, check_roots_exist, own_test_split=False),
    "cifar10": Source(_cifar_units, _check_cifar, own_test_split=True),
    "cifar100": Source(_cifar_units, _check_cifar, own_test_split=True),
    "stl10": Source(_stl10_units, _check_stl10, own_test_split=True),
    "digits": Source(_digits_units, _nothing_to_check, own_test_split=True),
}


def _units(cfg: DataConfig, split: str, max_images: int, decoder: Decoder) -> Units:
    """The split's units (``max_images`` applies to evaluation sets only).

    Raises:
        ValueError: naming an unknown split or source, or a ``data.eval_root`` the source cannot use.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = SOURCES.get(cfg.source)
    if source is None:
        raise ValueError(f"unknown data.source {cfg.source!r}; one of {', '.join(SOURCES)}")
    if cfg.eval_root and source.own_test_split:
        raise ValueError(f"data.eval_root={cfg.eval_root!r}: for imagefolder and parquet sources; {cfg.source} has its "
                         "own test split")
    return source.units(cfg, split, max_images if split != "pretrain" else 0, decoder)


def check_roots(cfg: DataConfig) -> None:
    """The data's roots and files exist (or will be downloaded), checked without Ray and without
    reading any image: called before a pipeline starts Ray or touches MLflow.

    Raises:
        FileNotFoundError, ConnectionError: naming the missing path or the unreachable bucket.
    """
    source = SOURCES.get(cfg.source)
    if source is not None:
        source.check(cfg)


# ---------------------------------------------------------------------------- Ray back-end


@dataclass(frozen=True)
class Split:
    """Attributes: dataset (lazy; columns ``image``, ``label``); num_images: ``Units.num_images``."""

    dataset: Any
    num_images: int


def build_dataset(cfg: DataConfig, split: str, *, max_images: int = 0, seed: int | None = None,
                  bad_images: Any = None, encoded: bool = False) -> Split:
    """One split as a lazy Ray Dataset with columns ``image`` (uint8 (H, W, 3)) and ``label`` (int64),
    or with ``encoded`` (image folders and Parquet) ``bytes`` (as stored), ``label`` and ``where``.

    Only paths and metadata are read here (and, for CIFAR, the images counted in Ray tasks); images
    are read and decoded in Ray tasks when the dataset runs, again each epoch.

    Args:
        cfg: the ``data`` section of the config.
        split: "pretrain", "eval_train" or "eval_test".
        max_images: evaluation sets: keep at most this many images (0 = all).
        seed: pretraining: seeds the unit order, a new order each epoch and the same sequence of
            orders after a restart; None keeps the listing order.
        bad_images: a ``BadImages`` actor handle told of every undecodable image.
        encoded: pass image folders' and Parquet's encoded images on undecoded (``placement.decode=device``).

    Raises:
        FileNotFoundError: naming a missing root or file, or a folder without images.
        ConnectionError: naming an unreachable bucket or server.
        ValueError: naming the config key of a missing column, or a split without labels.
        CorruptDataError: naming a file whose size is wrong (found before anything is read).
    """
    units = _units(cfg, split, max_images, Decoder(cfg.image_size, cfg.skip_corrupt, bad_images, encoded=encoded))
    units = units.bounded(lambda unbounded: _ray_dataset(unbounded, None).count())  # CIFAR: counted in Ray tasks
    return Split(_ray_dataset(units, seed if split == "pretrain" else None), units.num_images)


def _ray_dataset(units: Units, seed: int | None) -> ray.data.Dataset:
    import ray.data

    ds = ray.data.read_datasource(_units_datasource()(units, seed))
    if units.decode is None:
        return ds
    # Decoding is a map of its own, as after Ray's own file reader: it fuses with the views that
    # follow (pipelines.datasets), and Ray names its tasks after the function (``_decode_files``).
    return ds.map_batches(units.decode.func, fn_kwargs=units.decode.keywords, batch_size=_DECODE_BATCH)


@functools.cache
def _units_datasource() -> type:
    """The Ray Datasource class reading ``Units`` (made on first use: ``sscl`` imports Ray only then)."""
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class UnitsDatasource(Datasource):
        """One read task per ``per_read`` units, in a seeded order that changes every execution."""

        def __init__(self, units: Units, seed: int | None) -> None:
            # The unit list travels as one object, not inside every copy of the dataset's plan.
            self._units, self._ref, self._seed = replace(units, units=[]), ray.put(units.units), seed

        def get_name(self) -> str:
            return self._units.name

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            units = replace(self._units, units=ray.get(self._ref))
            # Ray's own file shuffle (FileShuffleConfig) reseeds by the same execution index.
            execution = getattr(data_context, "_execution_idx", 0)
            n = len(units.units)
            order = range(n) if self._seed is None else np.random.default_rng([self._seed, execution]).permutation(n)
            unknown = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            read, tasks = units.read, []
            for group in units.groups(order):
                def read_units(group: list[Any] = group) -> Iterator[Any]:  # one group only, not every unit
                    return _blocks(read, group)

                tasks.append(ReadTask(read_units, unknown, per_task_row_limit=per_task_row_limit))
            return tasks

    return UnitsDatasource


def _blocks(read: Callable[[list[Any]], Iterable[Any]], units: list[Any]) -> Iterator[Any]:
    """Ray blocks (Arrow tables) of what ``read`` yields for ``units``."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    for batch in read(units):
        yield batch if isinstance(batch, pa.Table) else BlockAccessor.batch_to_block(batch)


# ---------------------------------------------------------------------------- local back-end


@dataclass(frozen=True)
class LocalSplit:
    """A split read in this process without Ray (``pipelines.train_local``): the units of
    ``build_dataset``, read ``per_read`` at a time, never whole.

    Attributes:
        source: the split's units, bounded and counted.
    """

    source: Units

    @property
    def num_images(self) -> int:
        """As ``Split.num_images``."""
        return self.source.num_images

    def batches(self, batch_size: int, *, seed: int | None = None, workers: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """``{"image": uint8 (N, H, W, 3), "label": int64 (N,)}`` batches of ``batch_size`` rows.

        Args:
            seed: shuffles the units and, within a buffer of a few batches, the rows (pretraining);
                None keeps the listing order.
            workers: DataLoader processes reading and decoding units (0: this process).
            drop_last: drop a last batch smaller than ``batch_size``.

        Raises:
            CorruptDataError, DataError: as the Ray dataset's tasks raise them.
        """
        import torch.utils.data

        rng = np.random.default_rng(seed) if seed is not None else None
        order = range(len(self.source.units)) if rng is None else rng.permutation(len(self.source.units))
        reads = _Reads(self.source, self.source.groups(order))
        loader = torch.utils.data.DataLoader(reads, batch_size=None, num_workers=workers, collate_fn=lambda part: part)
        pending, held = [], 0
        for part in loader:
            if part is None:  # nothing read (an empty row group)
                continue
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
    """One split for reading without Ray; only metadata is read here (and CIFAR's pickles, one at a
    time, to count them). Arguments and errors as :func:`build_dataset`."""
    units = _units(cfg, split, max_images, Decoder(cfg.image_size, cfg.skip_corrupt))
    return LocalSplit(units.bounded(lambda whole: sum(len(rows["label"]) for rows in _read_rows(whole, whole.units))))


def _read_rows(units: Units, group: list[Any]) -> Iterator[dict[str, np.ndarray]]:
    """What the Ray dataset's tasks give for ``group``: ``read``, then ``decode`` (given the table's
    columns as Python lists; Ray's batches hold the same values in NumPy arrays)."""
    for batch in units.read(group):
        yield batch if units.decode is None else units.decode(batch.to_pydict())


class _Reads:
    """A map-style dataset of reads (``per_read`` units each) for ``torch.utils.data.DataLoader``."""

    def __init__(self, source: Units, groups: list[list[Any]]) -> None:
        self.source, self.groups = source, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            parts = list(_read_rows(self.source, self.groups[i]))
        except DataError as err:  # carried as data: a DataLoader process would re-raise it with its traceback
            return {"error": str(err), "corrupt": isinstance(err, CorruptDataError)}
        return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")} if parts else None


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
