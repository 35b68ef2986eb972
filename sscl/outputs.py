"""The one rule for what a command writes: an output belongs to its job.

A command deletes or replaces only what it can show a job of its kind wrote (the files its own
record or manifest names, and its markers), never anything else, with or without ``--overwrite``; a
folder holding other files is refused, naming a few of them. A one-file output is replaced only with
``--overwrite`` and is never a folder. No output may be, lie inside, or hold one of the command's
inputs (data roots, feature folders, the MLflow store, checkpoints): that is refused before anything
is read or written.

Paths are compared after ``~`` and links are resolved; ``file://`` URIs are local paths; other URIs
(``s3://bucket/x``) are compared by scheme and path, without reaching the store.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["OWNER_MARKER", "claim_folder", "check_apart", "check_file_out", "data_paths", "few", "location", "mlflow_store_paths",
           "replace_file"]

# The marker a command leaves in a folder it created for itself (benchmarks' work folders,
# ``train_local``'s output): JSON ``{"written_by": <command>, "files": [...]}``.
OWNER_MARKER = "_SSCL_OUTPUT"


def location(path_or_uri: str) -> tuple[str, str]:
    """``(scheme, path)`` to compare outputs with inputs: ``("file", absolute resolved path)`` for local
    paths and ``file://`` URIs, else the URI's scheme and ``netloc/path`` without a trailing ``/``."""
    if "://" not in path_or_uri:
        return "file", str(Path(path_or_uri).expanduser().resolve())
    parts = urllib.parse.urlsplit(path_or_uri)
    if parts.scheme == "file":
        return "file", str(Path(urllib.parse.unquote(parts.path)).resolve())
    return parts.scheme, f"{parts.netloc}{parts.path}".rstrip("/")


def _relation(out: tuple[str, str], other: tuple[str, str]) -> str:
    """How ``out`` stands to ``other``: "is", "lies inside", "holds" or "" (apart)."""
    if out[0] != other[0]:
        return ""
    a, b = out[1].rstrip("/") or "/", other[1].rstrip("/") or "/"
    if a == b:
        return "is"
    if a.startswith(b.rstrip("/") + "/"):
        return "lies inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "holds"
    return ""


def check_apart(out: str, flag: str, inputs: Mapping[str, str]) -> None:
    """Refuses an output at, inside or above any of ``inputs`` (name -> path or URI; empty ones skipped).

    Raises:
        ValueError: naming ``flag``, the output as given, the input and how they overlap.
    """
    where = location(out)
    problems = []
    for name, path in inputs.items():
        if not path:
            continue
        relation = _relation(where, location(path))
        if relation:
            problems.append(f"{relation} {name} ({path})")
    if problems:
        raise ValueError(f"{flag} {out}: {'; '.join(problems)}; an output must lie apart from what the command reads "
                         "(nothing was read or written); choose another path")


def mlflow_store_paths(tracking_uri: str) -> dict[str, str]:
    """The local files of an MLflow store that outputs must keep apart from: a sqlite store's database
    file and the ``mlruns`` folder beside it (where its artifacts are kept); none for a server."""
    if not tracking_uri.startswith("sqlite:///"):
        return {}
    path = tracking_uri[len("sqlite:///"):]
    if path in ("", ":memory:"):
        return {}
    db = Path(path).expanduser().resolve()
    return {"the MLflow store": str(db), "the MLflow store's artifacts": str(db.parent / "mlruns")}


def few(names: Iterable[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a few sorted names for an error message."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_file_out(out: str, flag: str, *, overwrite: bool, suffix: str = "",
                   inputs: Mapping[str, str] | None = None) -> Path:
    """A one-file output as the user gave it: not a folder, its folder present, an existing file kept
    unless ``overwrite``, ending in ``suffix`` when one is needed, apart from ``inputs``.

    Returns:
        The path, as a ``Path`` (written by ``replace_file``).

    Raises:
        ValueError, IsADirectoryError, FileNotFoundError, FileExistsError: naming ``flag`` and ``out``.
    """
    path = Path(out).expanduser()
    check_apart(out, flag, inputs or {})
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {out}: is a folder; give the path of the file to write (a folder is "
                                "never replaced)")
    if suffix and path.suffix != suffix:
        raise ValueError(f"{flag} {out}: must end in {suffix} (the file is written exactly as named)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {out}: its folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {out}: exists; pass --overwrite to replace it, or choose another path")
    return path


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temporary file beside it, moved into place once ``write`` returned, so
    an interrupted write leaves the old file (or none), never half a file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def claim_folder(folder: Path, flag: str, command: str, *, may_hold: Iterable[str] = (),
                 overwrite: bool = True) -> list[str]:
    """Makes ``folder`` this command's: it must be missing, empty, or hold only what ``command`` wrote
    there earlier (the files its ``OWNER_MARKER`` names, and the marker). ``may_hold`` adds names the
    command writes this time. The marker is written (created with the folder when missing).

    Args:
        overwrite: whether an earlier output of ``command`` may be replaced (else it is refused,
            naming ``--overwrite``).

    Returns:
        The names the earlier run of ``command`` left there (which it may reuse or replace).

    Raises:
        NotADirectoryError: when ``folder`` is a file. FileExistsError: naming a few of the files
            that ``command`` did not write, a marker that is not ours or cannot be read, or the
            earlier output when ``overwrite`` is not set.
    """
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder}: a file, not a folder")
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    ours: set[str] = set()
    if OWNER_MARKER in names:
        record = _record(folder / OWNER_MARKER)
        if not isinstance(record.get("files"), list):
            raise FileExistsError(f"{flag} {folder}: its {OWNER_MARKER} cannot be read as a record of this project; "
                                  "nothing was changed: choose another folder")
        if record.get("written_by") != command:
            raise FileExistsError(f"{flag} {folder}: written by {record.get('written_by')!r}, not {command}; nothing "
                                  "was changed: choose another folder")
        ours = {str(n) for n in record["files"]} | {OWNER_MARKER}
        ours |= {n for n in names if any(n.startswith(f".{o}.") and n.endswith(".partial") for o in ours)}
    foreign = names - ours
    if foreign:
        raise FileExistsError(f"{flag} {folder}: holds files {command} did not write ({few(foreign)}); nothing was "
                              "changed: choose an empty or new folder")
    earlier = sorted(n for n in (ours & names) - {OWNER_MARKER} if not n.endswith(".partial"))
    if earlier and not overwrite:
        raise FileExistsError(f"{flag} {folder}: holds the output of an earlier {command} ({few(earlier)}); pass "
                              "--overwrite to replace it, or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ours & names:
        if name.endswith(".partial"):  # a killed write's temporary file (``replace_file``)
            (folder / name).unlink()
    files = sorted({n for n in ours - {OWNER_MARKER} if not n.endswith(".partial")} | set(may_hold))
    (folder / OWNER_MARKER).write_text(json.dumps({"written_by": command, "files": files}, indent=1) + "\n")
    return earlier


def data_paths(data: Any) -> dict[str, str]:
    """The roots a ``DataConfig`` reads, by key (none for digits, which come with scikit-learn)."""
    if data.source == "digits":
        return {}
    return {"data.root": data.root, "data.eval_root": data.eval_root}


def _record(path: Path) -> dict:
    """A JSON object read from ``path``; {} when it cannot be read or is not an object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}

