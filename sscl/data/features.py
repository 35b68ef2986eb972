"""Stored features: the Parquet dataset an embedding job writes (``pipelines.embed``), how a job
claims, clears and completes its output folder, and how it is read back.

One row per image: ``key`` (string: the image's name within its source, ``build_dataset(keyed=True)``),
``label`` (int64, null when the source has none) and ``features`` (fixed-size list of float32).
The folder (local, NFS or an object-store URI) holds the job's ``*.parquet`` files and two markers,
which Parquet readers skip (names starting with ``_``):

- ``_STARTED``: written first (JSON: the job's token and MLflow run). A folder with it and without
  ``_SUCCESS`` is the output of a job that did not finish: the next job clears it.
- ``_SUCCESS``: written last (JSON manifest: files, rows, feature size, model, data). Only a folder
  with it is complete; readers refuse the rest. Object stores have no atomic folder rename, so
  completeness is this marker, not a move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from sscl.data.decode import DataError

__all__ = ["COMPLETE", "STARTED", "Features", "Output", "feature_table", "read_features"]

STARTED, COMPLETE = "_STARTED", "_SUCCESS"


def feature_table(keys: Any, labels: Any, features: np.ndarray) -> Any:
    """A ``pyarrow.Table`` of the stored layout: ``keys`` (N,), ``labels`` (N,) int (-1: none, stored
    null), ``features`` (N, F) float32 as a fixed-size list column."""
    import pyarrow as pa

    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    return pa.table({
        "key": pa.array([str(k) for k in keys], type=pa.string()),
        "label": pa.array(labels, type=pa.int64(), mask=labels < 0),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1]),
    })


@dataclass(frozen=True)
class Output:
    """An embedding job's output folder: ``fs`` and ``path`` as pyarrow sees them, ``uri`` as given."""

    uri: str
    fs: Any
    path: str

    @classmethod
    def at(cls, uri: str, flag: str = "--out") -> Output:
        """The folder at ``uri`` (local path or URI), which may not exist yet; errors name ``flag``.

        Raises:
            ConnectionError: when its filesystem cannot be reached.
            NotADirectoryError: when a local path runs through a file (missing folders are created
                when the job starts).
        """
        from pathlib import Path

        import pyarrow.fs as pafs

        if "://" not in uri:
            local = Path(uri).expanduser().resolve()
            existing = next(p for p in (local, *local.parents) if p.exists())
            if existing != local and not existing.is_dir():
                raise NotADirectoryError(f"{flag} {uri}: {existing} is a file, not a folder")
            uri = str(local)
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            fs.get_file_info(path)
        except (OSError, ValueError) as err:
            raise ConnectionError(f"{flag} {uri}: cannot reach it ({err})") from None
        return cls(uri, fs, path.rstrip("/"))

    def _entries(self) -> list[Any]:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise FileExistsError(f"--out {self.uri}: a file, not a folder; choose a folder path")
        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))

    def _read(self, name: str) -> dict[str, Any]:
        with self.fs.open_input_stream(f"{self.path}/{name}") as fh:
            return json.loads(fh.read().decode())

    def _write(self, name: str, content: dict[str, Any]) -> None:
        with self.fs.open_output_stream(f"{self.path}/{name}") as fh:
            fh.write(json.dumps(content, indent=2).encode())

    def check_free(self, overwrite: bool) -> tuple[str, dict[str, Any]]:
        """Whether a job may write here (nothing is changed): a complete output, or a folder no job
        wrote, is replaced only with ``overwrite``; an unfinished job's output always is (nothing in
        it is complete).

        Returns:
            What is there ("" when nothing; the job clears it, ``clear``), and the unfinished job's
            ``_STARTED`` record ({} when none).

        Raises:
            FileExistsError: naming ``--overwrite`` and what the folder holds.
        """
        names = {e.base_name for e in self._entries()}
        if not names:
            return "", {}
        unfinished = self._read(STARTED) if STARTED in names and COMPLETE not in names else {}
        if COMPLETE in names:
            found = self._read(COMPLETE)
            what = f"a complete embedding ({found.get('rows')} images of {found.get('model')})"
        elif STARTED in names:
            what = "the partial output of an embedding job that did not finish"
        else:
            what = f"{len(names)} other file(s) or folder(s)"
        if not overwrite and not unfinished:
            raise FileExistsError(f"--out {self.uri} already holds {what}; pass --overwrite to replace it, or choose "
                                  "another --out")
        return what, unfinished

    def clear(self) -> None:
        """Deletes what the folder holds (after ``check_free`` allowed it)."""
        self.fs.delete_dir_contents(self.path)

    def start(self, token: str, **about: Any) -> None:
        """Writes ``_STARTED`` (the folder is created when missing)."""
        self.fs.create_dir(self.path, recursive=True)
        self._write(STARTED, {"token": token, **about})

    def finish(self, token: str, expected_rows: int | None = None, **manifest: Any) -> dict[str, Any]:
        """Completes the output: removes any Parquet file another job left (a killed job's write that
        landed late), counts this job's rows from the files' footers and writes ``_SUCCESS``.

        Returns:
            The manifest written, with ``files``, ``rows`` and ``stray_files_removed``.

        Raises:
            RuntimeError: when the rows are not ``expected_rows`` (the output stays incomplete).
        """
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        ours, stray = [], []
        for entry in self._entries():
            if entry.type == pafs.FileType.File and entry.base_name.endswith(".parquet"):
                (ours if entry.base_name.startswith(f"{token}_") else stray).append(entry.path)
        for path in stray:
            self.fs.delete_file(path)
        rows = pads.dataset(ours, filesystem=self.fs, format="parquet").count_rows() if ours else 0
        if expected_rows is not None and rows != expected_rows:
            raise RuntimeError(f"{self.uri}: the job wrote {rows} rows for {expected_rows} images; left incomplete "
                               "(no _SUCCESS); please report it")
        content = {**manifest, "files": sorted(p.rsplit("/", 1)[-1] for p in ours), "rows": rows,
                   "stray_files_removed": len(stray)}
        self._write(COMPLETE, content)
        self.fs.delete_file(f"{self.path}/{STARTED}")
        return content

    def manifest(self) -> dict[str, Any]:
        """The ``_SUCCESS`` manifest of a complete output.

        Raises:
            FileNotFoundError: when there is nothing at the URI. DataError: when it is not complete.
        """
        names = {e.base_name for e in self._entries()}
        if not names:
            raise FileNotFoundError(f"{self.uri}: no such folder (or it is empty)")
        if COMPLETE not in names:
            why = ("the embedding job that wrote it did not finish" if STARTED in names
                   else "not the output of python -m pipelines.embed")
            raise DataError(f"{self.uri} is not a complete embedding (no {COMPLETE}: {why}); run the embedding "
                            "job again")
        return self._read(COMPLETE)


@dataclass(frozen=True)
class Features:
    """Stored features read back: ``keys`` (N,) str, ``labels`` (N,) int64 (-1: none), ``features``
    (N, F) float32, and the job's ``manifest``."""

    keys: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    manifest: dict[str, Any]


def read_features(uri: str, flag: str = "--features") -> Features:
    """A complete embedding output, the files its manifest lists, in key order.

    Raises:
        FileNotFoundError, DataError: naming ``flag`` and the URI when it is missing or incomplete.
    """
    import pyarrow.dataset as pads

    output = Output.at(uri, flag)
    try:
        manifest = output.manifest()
    except (FileNotFoundError, DataError) as err:
        raise type(err)(f"{flag}: {err}") from None
    table = pads.dataset([f"{output.path}/{name}" for name in manifest["files"]], filesystem=output.fs,
                         format="parquet").to_table(columns=["key", "label", "features"])
    if table.num_rows != manifest["rows"]:
        raise DataError(f"{flag}: {uri} holds {table.num_rows} rows but its manifest says {manifest['rows']}: the "
                        "folder was changed after the job; run the embedding job again")
    table = table.sort_by("key")
    width = table.schema.field("features").type.list_size
    flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return Features(np.asarray(table.column("key").to_pylist(), dtype=object), labels,
                    flat.astype(np.float32).reshape(-1, width), manifest)
