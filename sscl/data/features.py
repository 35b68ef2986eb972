"""Stored features: the Parquet dataset an embedding job writes (``pipelines.embed``), how a job
claims, clears and completes its output folder, and how it is read back.

One row per image: ``key`` (string: the image's name within its source, ``build_dataset(keyed=True)``),
``label`` (int64, null when the source has none) and ``features`` (fixed-size list of float32).
The folder (local, NFS or an object-store URI) holds the job's ``*.parquet`` files and two markers,
which Parquet readers skip (names starting with ``_``):

- ``_STARTED``: written first (JSON: the job's token, MLflow run, and what of an earlier job it
  replaces). A folder with it and without ``_SUCCESS`` is the output of a job that did not finish:
  the next job clears it.
- ``_SUCCESS``: written last (JSON manifest: files, rows, feature size, model, data). Only a folder
  with it is complete; readers refuse the rest. Object stores have no atomic folder rename, so
  completeness is this marker, not a move.

A job removes only what embedding jobs wrote there (the markers, the files a ``_SUCCESS`` lists, the
Parquet files named after a job's token); a folder holding anything else is refused
(``sscl.outputs``'s rule for every command).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

import pyarrow.fs as pafs

from sscl.data.decode import DataError
from sscl.outputs import few

__all__ = ["COMPLETE", "STARTED", "Claim", "Features", "Output", "feature_table", "read_features"]

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
class Claim:
    """What a job found at its output folder (``Output.check_free``): ``what`` it holds ("" when
    nothing), the unfinished job's ``_STARTED`` record ({} when none), the names of the earlier jobs'
    ``files`` (markers included) and their ``tokens``."""

    what: str
    unfinished: dict[str, Any]
    files: tuple[str, ...]
    tokens: tuple[str, ...]


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
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise FileExistsError(f"--out {self.uri}: a file, not a folder; choose a folder path")
        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))

    def _marker(self, name: str, required: str) -> dict[str, Any]:
        """The JSON object in marker ``name``, which must hold the key ``required``.

        Raises:
            FileExistsError: naming the marker when it is not one this project writes (a user's file
                of that name, an empty or damaged one): nothing in the folder is then ours to touch.
        """
        text = None
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as fh:
                text = fh.read().decode()
            record = json.loads(text)
        except (OSError, ValueError) as err:
            why = "it is empty" if text is not None and not text.strip() else str(err)
            record, problem = {}, f"cannot be read as JSON ({why})"
        else:
            problem = "" if isinstance(record, dict) and required in record else f"holds no {required!r}"
        if problem:
            raise FileExistsError(f"--out {self.uri}: its {name} {problem}, so it is not a marker written by python -m "
                                  "pipelines.embed; nothing was changed: move it away or choose another --out")
        return record

    def _write(self, name: str, content: dict[str, Any]) -> None:
        with self.fs.open_output_stream(f"{self.path}/{name}") as fh:
            fh.write(json.dumps(content, indent=2).encode())

    def check_free(self, overwrite: bool) -> Claim:
        """Whether a job may write here (nothing is changed). The folder must be missing, empty or hold
        only what embedding jobs wrote: their markers, the files a ``_SUCCESS`` lists and the Parquet
        files named after a job's token; anything else is refused, with or without ``overwrite``. A
        complete output is replaced only with ``overwrite``; an unfinished job's output always is.

        Raises:
            FileExistsError: naming a few of the files no embedding job wrote, a marker that is not
                ours, or ``--overwrite`` when the folder holds a complete output.
        """
        entries = {e.base_name: e for e in self._entries()}
        if not entries:
            return Claim("", {}, (), ())
        started = self._marker(STARTED, "token") if STARTED in entries else {}
        complete = self._marker(COMPLETE, "files") if COMPLETE in entries else {}
        tokens = {str(t) for t in (started.get("token"), *started.get("replaces", ()), complete.get("token")) if t}
        listed = {str(n) for n in (*complete.get("files", ()), *started.get("replaces_files", ()))}
        ours = {n for n, e in entries.items()
                if n in (STARTED, COMPLETE) or n in listed or e.type == pafs.FileType.File
                and n.endswith(".parquet") and any(n.startswith(f"{t}_") for t in tokens)}
        foreign = set(entries) - ours
        if foreign:
            raise FileExistsError(f"--out {self.uri} holds files python -m pipelines.embed did not write "
                                  f"({few(foreign)}); nothing was changed (they are never deleted, with or without "
                                  "--overwrite): choose an empty or new folder")
        if complete:
            what = f"a complete embedding ({complete.get('rows')} images of {complete.get('model')})"
            if not overwrite:
                raise FileExistsError(f"--out {self.uri} already holds {what}; pass --overwrite to replace it, or "
                                      "choose another --out")
        else:
            what = "the partial output of an embedding job that did not finish"
        return Claim(what, {} if complete else started, tuple(sorted(ours)), tuple(sorted(tokens)))

    def start(self, token: str, claim: Claim, **about: Any) -> None:
        """Claims the folder (created when missing): writes this job's ``_STARTED``, naming what the
        earlier job left (so a job killed while clearing is still known to be ours), then deletes those
        files, ``_SUCCESS`` first so that no reader takes a half-cleared folder for complete."""
        self.fs.create_dir(self.path, recursive=True)
        left = [n for n in claim.files if n not in (STARTED, COMPLETE)]
        self._write(STARTED, {"token": token, "replaces": list(claim.tokens), "replaces_files": left, **about})
        for name in ([COMPLETE] if COMPLETE in claim.files else []) + left:
            self.fs.delete_file(f"{self.path}/{name}")

    def finish(self, token: str, expected_rows: int | None = None, **manifest: Any) -> dict[str, Any]:
        """Completes the output: removes any Parquet file of the jobs this one replaced (a killed job's
        write that landed late), counts this job's rows from the files' footers and writes ``_SUCCESS``.

        Returns:
            The manifest written, with ``token``, ``files``, ``rows`` and ``stray_files_removed``.

        Raises:
            RuntimeError: when the rows are not ``expected_rows`` (the output stays incomplete).
        """
        import pyarrow.dataset as pads

        replaced = self._marker(STARTED, "token").get("replaces", ())
        ours, stray = [], []
        for entry in self._entries():
            if entry.type == pafs.FileType.File and entry.base_name.endswith(".parquet"):
                if entry.base_name.startswith(f"{token}_"):
                    ours.append(entry.path)
                elif any(entry.base_name.startswith(f"{t}_") for t in replaced):
                    stray.append(entry.path)
        for path in stray:
            self.fs.delete_file(path)
        rows = pads.dataset(ours, filesystem=self.fs, format="parquet").count_rows() if ours else 0
        if expected_rows is not None and rows != expected_rows:
            raise RuntimeError(f"{self.uri}: the job wrote {rows} rows for {expected_rows} images; left incomplete "
                               "(no _SUCCESS); please report it")
        content = {**manifest, "token": token, "files": sorted(p.rsplit("/", 1)[-1] for p in ours), "rows": rows,
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
        try:
            return self._marker(COMPLETE, "files")
        except FileExistsError as err:
            raise DataError(str(err).replace("--out ", "", 1)) from None


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
