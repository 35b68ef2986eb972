"""The one error boundary of every command: what a user can fix ends in exit status 2 and one message
naming the key, path, URI or flag; a bug keeps its traceback and says where the log is.

Known failure classes: configuration and values (``ValueError``, ``ConfigError``), data
(``DataError``: missing, corrupt or too-small data), storage (``OSError``: paths that cannot be read
or created), tracking and registry (``ConnectionError``, MLflow's own ``MlflowException``) and the Ray
connection. A data error raised inside a Ray task or worker reaches the user as that error, with its
file named, not as Ray's wrapper.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended a run; ``resume`` is the command that continues it (or "")."""

    def __init__(self, what: str, resume: str = "") -> None:
        super().__init__(what)
        self.what, self.resume = what, resume


def user_error(err: BaseException) -> BaseException | None:
    """The error to show a user for ``err`` (unwrapped from Ray's wrappers), or None for a bug."""
    err = unwrap(err)
    # ValueError covers sscl.config's ConfigError, which is not imported here: that would need PyYAML,
    # which the GPU check's torch-only machine may lack.
    if isinstance(err, (ValueError, ConnectionError, OSError)):
        return err  # OSError: FileNotFoundError, PermissionError, NotADirectoryError, ...
    if type(err).__module__.startswith("mlflow"):  # MlflowException and its kin
        return err
    if type(err).__name__ in ("RaySystemError", "GetTimeoutError") and "ray" in type(err).__module__:
        return ConnectionError(f"Ray: {err}")
    return None


def unwrap(err: BaseException) -> BaseException:
    """The user's error inside Ray's task and worker wrappers (``RayTaskError``, Ray Train's
    ``WorkerGroupError`` / ``TrainingFailedError``), when one of them carries a data error."""
    from sscl.data.decode import DataError

    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError):
            return current
        pending += [e for e in (getattr(current, "cause", None), current.__cause__, current.__context__)
                    if isinstance(e, BaseException)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending += [e for e in failures.values() if isinstance(e, BaseException)]
    return err


def message(err: BaseException) -> str:
    """One line (or the listed problems) for a user error."""
    text = getattr(err, "message", None) if type(err).__name__ == "MlflowException" else None
    text = text or str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def guarded(prog: str, run: Callable[[], T]) -> T:
    """Runs a command's body: user errors exit 2 with their message, Ctrl-C exits 130 saying so (and how to
    resume), anything else shows its traceback and the log file."""
    from pipelines import console

    try:
        return run()
    except SystemExit:
        raise
    except Interrupted as stop:
        print(f"{prog}: {stop.what}" + (f"; resume it with:\n  {stop.resume}" if stop.resume else ""), file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs here, once
        shown = user_error(err)
        if shown is None:
            traceback.print_exc()
            where = f" (log: {console.log_file})" if console.log_file else ""
            print(f"{prog}: unexpected error{where}; please report it with the traceback above", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"{prog}: error: {message(shown)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
