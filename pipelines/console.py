"""What a run shows on the console: its own lines only, unless ``--verbose``.

By default the console gets the resolved key settings, one line per quarter epoch and per epoch
(loss, lr, img/s, kNN), the result and the commands to use it. Ray's INFO lines, Ray Data's
progress bars, the workers' own output and library warnings go to log files: Ray's session logs
(``/tmp/ray/session_latest/logs``) and the driver's ``log_file`` (``logs/``). ``--verbose`` shows all of it.

The workers' progress lines reach the driver through a small actor (``ProgressLines``) that the
driver polls, so they print without Ray's ``(RayTrainWorker pid=...)`` prefixes and also when the
workers' output is not forwarded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

verbose = False  # set once by ``setup`` (the ``--verbose`` flag)
log_file: Path | None = None  # the driver's log file, once ``setup`` ran


def setup(is_verbose: bool, path: Path) -> None:
    """Library warnings (and, unless ``is_verbose``, MLflow's INFO lines) go to the file ``path``
    only; ``--verbose`` also shows them. Call before importing Ray or MLflow."""
    global verbose, log_file
    path = path.resolve()  # the process may change directory later
    verbose, log_file = is_verbose, path
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)  # warnings become records of the "py.warnings" logger
    warned = logging.getLogger("py.warnings")
    warned.addHandler(to_file)
    warned.propagate = is_verbose
    if not is_verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when MLflow is imported
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model read from a server
        # Ray prints a repeated notice once and holds the repeats, to print them from the main thread
        # when the driver exits; printed at once, they all come from its relay thread (below).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when Ray is imported
        if not isinstance(sys.stdout, _RayletNoticesToLog):
            sys.stdout = _RayletNoticesToLog(sys.stdout)


class _RayletNoticesToLog(io.TextIOBase):
    """The process's ``sys.stdout`` without ``--verbose``: what Ray's driver thread that relays the
    raylet's notices prints (e.g. "N PYTHON worker processes have been started", which can come at
    any moment of a run, also outside ``library_output``) goes to the log file; all else to ``console``."""

    RAY_NOTICE_THREAD = "ray_listen_error_messages"  # ray._private.worker starts it in every driver

    def __init__(self, console: TextIO) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if threading.current_thread().name == self.RAY_NOTICE_THREAD and log_file is not None:
            with open(log_file, "a") as sink:
                return sink.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()

    @property
    def encoding(self) -> str:  # noqa: D102
        return self.console.encoding

    @property
    def errors(self) -> str | None:  # noqa: D102
        return self.console.errors

    def __getattr__(self, name: str) -> Any:  # ``buffer`` and the like: the console's
        return getattr(self.console, name)

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` keywords: Ray's INFO/WARNING lines and the workers' output only with ``--verbose``
    (they stay in Ray's session logs)."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def quiet_ray_data() -> None:
    """Ray Data's progress bars (thousands of lines in a job's log) only on a terminal with ``--verbose``,
    and its notices and warnings ("Dataset ... execution finished") in its session log (``ray-data.log``) only.
    Call after importing ``ray.data``, in the process that runs the datasets."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose and sys.stderr.isatty()
    if not verbose:  # e.g. "Progress bars disabled", or no free CPUs while the pool's actors start
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):  # the console's; its file handler keeps everything
                handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def library_output() -> Iterator[TextIO]:
    """Inside, what libraries print goes to the log file, unless ``--verbose``: MLflow announces each
    registration, and Ray's driver prints the raylet's notices (e.g. "N PYTHON worker processes have
    been started") from a thread, which ``log_to_driver=False`` does not cover, and Ray's core worker
    writes its own warnings (e.g. on the actors a Ray Data pool starts) to file descriptor 2 from C++.
    Yields the console, for the run's own lines."""
    console = sys.stdout
    if verbose or log_file is None:
        yield console
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        sys.__stderr__.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield console
        finally:
            sink.flush()
            os.dup2(saved, 2)
            os.close(saved)


def print_notes(*splits: Any, file: TextIO | None = None) -> None:
    """Prints the notes of the splits a command listed (``Split.notes``: folder links its listing left
    out), each once: the pretraining set and the kNN bank list the same root."""
    for note in dict.fromkeys(note for split in splits for note in split.notes):
        print(note, file=file, flush=True)


class ProgressLines:
    """A Ray actor (``num_cpus=0``) holding the lines rank 0 posts, for the driver to print."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def since(self, start: int) -> list[str]:
        return self.lines[start:]


class Every:
    """While open, calls ``tick`` every ``every_s`` seconds in a daemon thread, and once more on leaving
    (for what happened after the last call); a ``tick`` that returns True ends the calls."""

    def __init__(self, tick: Callable[[], bool | None], every_s: float = 1.0, name: str = "sscl-every") -> None:
        self.tick, self.every_s = tick, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)

    def __enter__(self) -> "Every":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.tick()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            if self.tick():
                return


class Printer(Every):
    """While open, prints every line posted to a ``ProgressLines`` actor, polled every ``every_s``."""

    def __init__(self, board: Any, show: Callable[[str], None] = print, every_s: float = 1.0) -> None:
        super().__init__(self._print_new, every_s, name="sscl-progress")
        self.board, self.show = board, show
        self.printed = 0

    def _print_new(self) -> None:
        import ray

        try:
            lines = ray.get(self.board.since.remote(self.printed), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never stop a run
            return
        for line in lines:
            self.show(line)
        self.printed += len(lines)
