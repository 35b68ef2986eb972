"""The data sources read in this process without Ray (``pipelines.train_local``): the same files,
held-out sides, bounds, decoding and errors as ``sscl.data.sources.build_dataset``, read unit by unit."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from sscl.data.decode import CorruptDataError, DataError, Decoder
from sscl.data.formats import (CIFAR, STL_CHUNK, FolderFiles, Selection, check_split, cifar_files, decode_rows,
                               digits_rows, files_of, filesystem, folder_files, keep_by_hash, listing_notes,
                               parquet_columns, parquet_decoding, read_cifar_file, read_stl_chunk, selected_paths,
                               stl10_files)

if TYPE_CHECKING:  # pragma: no cover
    from sscl.config import DataConfig

__all__ = ["LocalSplit", "local_split"]

_LOCAL_UNIT = 256  # images per read unit of an image folder or digits


@dataclass(frozen=True)
class LocalSplit:
    """A split read in this process without Ray (``pipelines.train_local``): the same files, held-out
    sides, bounds, decoding and errors as ``build_dataset``, read unit by unit (a CIFAR pickle, 1,024
    STL-10 images, 256 files, a Parquet row group), never whole.

    Attributes:
        units: what one read covers; read: reads one unit into ``image``/``label`` arrays;
        num_images, notes: as ``Split.num_images`` and ``Split.notes``.
    """

    units: list[Any]
    read: Callable[[Any], dict[str, np.ndarray]]
    num_images: int
    notes: tuple[str, ...] = ()

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
    check_split(cfg, split)
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
        root, selection = files_of(cfg, split, bound)
        decoder = Decoder(cfg.image_size, cfg.skip_corrupt)
        if cfg.source == "imagefolder":
            return _local_folder(root, selection, decoder, classes_root=cfg.root)
        return _local_parquet(root, cfg, selection, decoder)
    if cfg.source in CIFAR:
        files, label_key = cifar_files(cfg, train=split != "eval_test")
        units = [str(f) for f in files]
        read = functools.partial(_read_cifar_path, label_key=label_key)
        total = sum(len(read(f)["label"]) for f in units)  # as Ray's count: each pickle read once
    elif cfg.source == "stl10":
        parts = ["unlabeled", "train"] if split == "pretrain" else ["train" if split == "eval_train" else "test"]
        units, total = [], 0
        for part in parts:
            x_path, y_path, n_images = stl10_files(cfg, part)
            units += [(chunk, x_path, y_path, n_images) for chunk in range(-(-n_images // STL_CHUNK))]
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
    return read_stl_chunk({"id": np.array([chunk])}, x_path=x_path, y_path=y_path, n_images=n_images)


def _read_digits_unit(index: np.ndarray, *, size: int) -> dict[str, np.ndarray]:
    return digits_rows({"index": index}, size=size)


def _bounded_read(unit: Any, *, read: Callable[[Any], dict[str, np.ndarray]], fraction: float) -> dict[str, np.ndarray]:
    return keep_by_hash(read(unit), fraction=fraction)


def _local_folder(root: str, selection: Selection, decoder: Decoder, classes_root: str) -> LocalSplit:
    listing, files = folder_files(root, selection, classes_root)
    paths = selected_paths(listing, files, root, selection)
    units = [paths[i : i + _LOCAL_UNIT] for i in range(0, len(paths), _LOCAL_UNIT)]
    return LocalSplit(units, functools.partial(_read_folder_unit, fs=listing.fs, files=files, decoder=decoder),
                      len(paths), listing_notes(listing, root, classes_root))


def _read_folder_unit(paths: list[str], *, fs: Any, files: FolderFiles, decoder: Decoder) -> dict[str, np.ndarray]:
    data = []
    for path in paths:
        with fs.open_input_file(path) as fh:
            data.append(fh.readall())
    return decoder.decode(data, [files.label(p) for p in paths], paths)


def _local_parquet(root: str, cfg: DataConfig, selection: Selection, decoder: Decoder) -> LocalSplit:
    import pyarrow.dataset as pads

    fs, base = filesystem(root)
    try:
        dataset = pads.dataset(base, filesystem=fs, format="parquet")
        fragments = [(f.path, group.id) for f in dataset.get_fragments() for group in f.row_groups]  # footers only
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"parquet: cannot read {root}: {err}") from None
    columns = parquet_columns(dataset.schema.names, root, cfg, selection)
    rows = dataset.count_rows()  # from the files' footers
    decoding = parquet_decoding(cfg, selection, decoder, rows)
    return LocalSplit(fragments, functools.partial(_read_row_group, fs=fs, columns=columns, decoding=decoding), rows)


def _read_row_group(unit: tuple[str, int], *, fs: Any, columns: list[str], decoding: dict[str, Any]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    path, group = unit
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(group, columns=columns)
    return decode_rows(table.to_pydict(), **decoding)
