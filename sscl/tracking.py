"""MLflow in one place: tracking URI, reachability, runs, epochs, and registering a training's encoder.

Only rank 0 (or the driver) calls these. Every function takes the tracking URI and talks to MLflow
through :func:`client`, never through MLflow's process-wide URI: one process may serve several stores
(tests, a sweep and its evaluation), and ``mlflow.set_tracking_uri`` also exports
``MLFLOW_TRACKING_URI``, which :func:`resolve_tracking_uri` reads first. The one exception is
:func:`model_flavour_uri`. Registered encoders are saved with MLflow's ``pt2`` format
(``torch.export``), so loading them never unpickles anything.

Related: :mod:`sscl.tracking_plots` (the figures logged here), :mod:`sscl.model_registry` (listing,
describing, aliasing and loading registered versions).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sscl.tracking_plots import plot_curves, plot_similarity_histogram

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["CHAMPION", "DEFAULT_URI", "EncoderForExport", "EpochLogger", "check_names", "check_store_exists",
           "check_tracking_server", "client", "end_run", "filter_literal", "find_runs", "label_version",
           "log_encoder", "log_history", "log_result", "log_to_run", "mark_running", "model_flavour_uri",
           "named_run", "open_run", "promote_if_better", "record_resume_changes", "recorded_config", "redact_uri",
           "resolve_tracking_uri", "run_record", "wait_for_tracking_server"]

DEFAULT_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"
PIP_REQUIREMENTS = ["torch", "numpy"]


def resolve_tracking_uri(configured: str = "") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else ``sqlite:///mlflow.db`` (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def redact_uri(uri: str) -> str:
    """The URI without credentials: ``https://user:secret@host`` -> ``https://***@host``."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def check_store_exists(uri: str) -> None:
    """For read-only commands: a ``sqlite:///`` store must already exist (MLflow would create an empty one).

    Raises:
        FileNotFoundError: naming the database file.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {uri}: {path} does not exist (check tracking.uri / "
                                    "--tracking-uri / MLFLOW_TRACKING_URI)")


def check_tracking_server(uri: str, *, timeout_s: float = 10.0) -> None:
    """Fails fast when the tracking store cannot work: an HTTP server that does not answer (user info in
    the URI is sent as basic authentication, as MLflow's client does) or is not MLflow; a ``sqlite:``
    path that is a folder or cannot be created; a ``file:`` store, which MLflow 3.17 no longer serves.

    Raises:
        ConnectionError: naming the (redacted) URI, within about ``timeout_s`` seconds.
        ValueError: naming the URI of a store that cannot work, and what to use instead.
    """
    if uri.startswith("sqlite:///"):
        _check_sqlite_path(uri)
        return
    if uri.startswith("file:") or "://" not in uri and not uri.startswith(("databricks", "uc")):
        raise ValueError(f"tracking.uri / MLFLOW_TRACKING_URI {redact_uri(uri)!r}: MLflow 3.17 serves no plain file "
                         "store; use sqlite:///path/mlflow.db, or an MLflow server's http(s):// address")
    if not uri.startswith(("http://", "https://")):
        return
    version = _http_get(uri, "/version", timeout_s)
    if not re.fullmatch(r"\d+\.\d+[\w.+-]*", version.strip()):
        raise ConnectionError(f"{redact_uri(uri)} answers HTTP but is not an MLflow tracking server (its /version "
                              f"said {version.strip()[:60]!r}); check tracking.uri / MLFLOW_TRACKING_URI")


def _http_get(uri: str, path: str, timeout_s: float) -> str:
    """The text at ``uri + path``; user info in ``uri`` becomes a basic Authorization header."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    url = urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")
                                                 if parts.hostname else parts.netloc)).rstrip("/") + path
    request = urllib.request.Request(url)
    user = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            return response.read(200).decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        hint = " (the credentials were refused)" if err.code in (401, 403) else ""
        raise ConnectionError(f"MLflow tracking server {redact_uri(uri)} answered {err.code} on {path}{hint}; check "
                              "MLFLOW_TRACKING_URI / tracking.uri") from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:
        raise ConnectionError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({getattr(err, 'reason', err)}); start it or set "
            "MLFLOW_TRACKING_URI / tracking.uri"
        ) from None


def _sqlite_artifacts(uri: str) -> str | None:
    """``mlruns`` beside a sqlite store's database file, as a file URI; None (the server's or
    MLflow's own choice) for other stores."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return None
    return (Path(path).expanduser().resolve().parent / "mlruns").as_uri()


def _check_sqlite_path(uri: str) -> None:
    """A ``sqlite:///`` store's file: not a folder; its folder is created when missing."""
    path = Path(uri[len("sqlite:///"):])
    if str(path) in ("", ":memory:"):
        return
    if path.is_dir():
        raise ValueError(f"tracking.uri {uri!r}: {path} is a folder; give the database file, e.g. "
                         f"sqlite:///{path / 'mlflow.db'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"tracking.uri {uri!r}: cannot create the folder {path.parent} ({err.strerror})") from None


def check_names(experiment: str | None = None, model_name: str | None = None, alias: str | None = None) -> None:
    """MLflow's own rules for the names a command will use, checked before any work.

    Raises:
        ValueError: naming the key (``tracking.experiment``, ``tracking.model_name``) or alias and the rule.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    # MLflow's own validators, private in 3.17 (the rules its store applies, kept in step by using them):
    # tests/sscl/test_tracking.py fails, naming them, if a new MLflow renames or drops one.
    checks = [("tracking.experiment", experiment, [validation._validate_experiment_name]),
              ("tracking.model_name", model_name, [validation._validate_model_name]),
              ("alias", alias, [validation._validate_model_alias_name, validation._validate_model_alias_name_reserved])]
    problems = []
    for key, value, rules in checks:
        if value is None:
            continue
        try:
            for rule in rules:
                rule(value)
        except MlflowException as err:
            problems.append(f"{key}={value!r}: {err.message}")
    if problems:
        raise ValueError("; ".join(problems))


def wait_for_tracking_server(uri: str, *, timeout_s: float = 300.0, every_s: float = 5.0) -> None:
    """Waits (bounded) for an HTTP tracking server that went away, saying so once.

    Raises:
        ConnectionError: if it is still unreachable after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            check_tracking_server(uri, timeout_s=every_s)
            return
        except ConnectionError as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"{err}; gave up after {timeout_s:.0f} s. The training is checkpointed: "
                                      "rerun the same command once the server is back to log what is pending") from None
            if not warned:
                print(f"waiting up to {timeout_s:.0f} s for the tracking server: {err}", file=sys.stderr)
                warned = True
            time.sleep(every_s)


# ---------------------------------------------------------------------------- clients


def client(uri: str) -> MlflowClient:
    """The MLflow client of the store at ``uri``, for its runs and its model registry alike.

    Both URIs are given: left out, the registry's would come from ``MLFLOW_REGISTRY_URI`` or MLflow's
    process-wide setting, which may name another store.
    """
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def model_flavour_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``uri`` inside the block, put back after.

    Only for MLflow's model flavour functions (``mlflow.pytorch.log_model``, ``load_model``,
    ``mlflow.models.get_model_info``): they take no URI and read the process-wide one. Put back because
    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which :func:`resolve_tracking_uri`
    reads first: left set, it would send every later command of this process to this store.
    """
    import mlflow

    saved_tracking, saved_registry = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None clears the setting and the variable
        mlflow.set_registry_uri(saved_registry)  # None clears the setting, not the variable
        if saved_registry is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


# ---------------------------------------------------------------------------- runs and epochs

RUN_NAME_TAG = "sscl.run_name"
FINISHED_TAG = "sscl.finished_epochs"  # set once the encoder of that many epochs is logged
VERSION_TAG = "sscl.registered_version"


def open_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any], config_text: str,
             tags: Mapping[str, str] | None = None, uri_keys: Iterable[str] = ("tracking.uri",)) -> str:
    """The MLflow run named ``run_name`` in ``experiment``, created (with ``params``, ``tags`` and the
    redacted config as ``config.yaml``) if it does not exist yet.

    One run per name, like Ray Train's checkpoints: a resumed or extended training appends to the run
    it continues. The params named in ``uri_keys`` are logged without credentials.
    """
    from mlflow.entities import Param

    store = client(uri)
    experiment_id = _experiment_id(store, experiment, uri)
    previous = find_runs(store, [experiment_id], {RUN_NAME_TAG: run_name}, max_results=1)
    if previous:
        return previous[0].info.run_id
    run = store.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    run_id = run.info.run_id  # created RUNNING, as a resumed training finds it
    clean = {k: (redact_uri(str(v)) if k in uri_keys else v) for k, v in params.items()}
    store.log_batch(run_id, params=[Param(k, str(v)) for k, v in clean.items()])
    store.log_text(run_id, config_text, "config.yaml")
    return run_id


def _experiment_id(store: MlflowClient, name: str, uri: str) -> str:
    """The id of the active experiment ``name``, created when missing (as ``mlflow.set_experiment`` does;
    in a sqlite store, with its artifacts in ``mlruns`` beside the database file, not in the folder the
    first command happened to run from).

    Raises:
        ValueError: when the experiment exists but was deleted (MLflow will not log to it).
    """
    from mlflow.exceptions import MlflowException

    found = store.get_experiment_by_name(name)
    if found is None:
        try:
            return store.create_experiment(name, artifact_location=_sqlite_artifacts(uri))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it since
                raise
            found = store.get_experiment_by_name(name)
    if found.lifecycle_stage != "active":
        raise ValueError(f"tracking.experiment={name!r} is deleted in the store; restore it (mlflow experiments "
                         "restore) or choose another name")
    return found.experiment_id


RESUME_PREFIX = "resume_"  # params resume_<n>.<key>: a value changed by the n-th resume that changed any


def recorded_config(uri: str, run_id: str) -> tuple[dict[str, str], int]:
    """The values a run trains with now (its params, each overridden by its latest resume change) and
    how many epochs it has logged.

    Returns:
        dotted key -> value as text; the epochs.
    """
    data = client(uri).get_run(run_id).data
    values = {k: v for k, v in data.params.items() if not k.startswith(RESUME_PREFIX)}
    changes = [(int(k[len(RESUME_PREFIX):].split(".", 1)[0]), k.split(".", 1)[1], v) for k, v in data.params.items()
               if k.startswith(RESUME_PREFIX) and k[len(RESUME_PREFIX):].split(".", 1)[0].isdigit()]
    for _, key, value in sorted(changes):
        values[key] = value
    return values, int(data.metrics.get("epoch", 0))


def record_resume_changes(uri: str, run_id: str, changes: Mapping[str, tuple[str, str]], *, epoch: int) -> None:
    """Logs each allowed change of a resume as the param ``resume_<n>.<key>`` (MLflow params cannot be
    overwritten) and a tag saying at which epoch, so the run's params show every value that trained."""
    store = client(uri)
    params = store.get_run(run_id).data.params
    n = 1 + len({k.split(".", 1)[0] for k in params if k.startswith(RESUME_PREFIX)})
    for key, (_, new) in changes.items():
        store.log_param(run_id, f"{RESUME_PREFIX}{n}.{key}", new)
    text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
    store.set_tag(run_id, f"sscl.resume_{n}", f"after epoch {epoch}: {text}")


def find_runs(store: MlflowClient, experiment_ids: Sequence[str], tags: Mapping[str, str],
              max_results: int = 1000) -> list:
    """Runs carrying every tag of ``tags``, newest first (values quoted for MLflow's filter syntax)."""
    clauses = [f"tags.`{key}` = {filter_literal(value)}" for key, value in tags.items()]
    return store.search_runs(list(experiment_ids), filter_string=" and ".join(clauses),
                             order_by=["attributes.start_time DESC"], max_results=max_results)


def filter_literal(value: str) -> str:
    """``value`` as a string literal of MLflow's filter syntax, which has no escapes: backslashes are
    plain characters, and the value goes in the quotes it does not contain.

    Raises:
        ValueError: for a value holding both ``'`` and ``"`` (no literal can express it).
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: a name may hold ' or \" but not both (MLflow's search syntax cannot quote it)")


def run_record(uri: str, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """The run's tags and latest metrics."""
    data = client(uri).get_run(run_id).data
    return dict(data.tags), dict(data.metrics)


def log_history(store: MlflowClient, run_id: str, history: Sequence[Mapping[str, float]]) -> int:
    """Logs each epoch of ``history`` that ``run_id`` lacks (by ``epoch`` step); returns how many."""
    from mlflow.entities import Metric

    have = {m.step for m in store.get_metric_history(run_id, "epoch")}
    missing = [h for h in history if int(h["epoch"]) not in have]
    now = int(time.time() * 1000)
    for h in missing:
        # "epoch" last: its presence marks the epoch as logged in full.
        items = sorted(h.items(), key=lambda kv: kv[0] == "epoch")
        store.log_batch(run_id, metrics=[Metric(k, float(v), now, int(h["epoch"])) for k, v in items])
    return len(missing)


class EpochLogger:
    """Per-epoch metrics of a training worker (rank 0) into the driver's MLflow run, each epoch once.

    ``sync(history)`` logs the checkpointed epochs the run does not have yet. If the tracking server
    is unreachable, training goes on: the epochs stay pending, a warning says how many, and the next
    sync (or the driver at the end) logs them.
    """

    def __init__(self, uri: str, run_id: str, warn: Any) -> None:
        # Fail fast per call instead of MLflow's default of minutes of retries: a later sync retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.warn = run_id, warn
        self.client = client(uri)

    def sync(self, history: Sequence[Mapping[str, float]]) -> None:
        """Logs the epochs of ``history`` the run lacks; on any tracking failure warns and returns."""
        try:
            log_history(self.client, self.run_id, history)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            self.warn(f"MLflow unreachable ({type(err).__name__}: {str(err)[:200]}); "
                      "epoch metrics kept in the checkpoint and retried at the next checkpoint")


def log_result(uri: str, run_id: str, *, history: Sequence[Mapping[str, float]], metrics: Mapping[str, float],
               encoder: nn.Module, image_size: int, model_name: str | None,
               similarities: Mapping[str, torch.Tensor] | None = None) -> tuple[str | None, int]:
    """Closes a training run: pending epochs, final ``metrics``, the curves (and similarity
    histogram), the encoder (registered as ``model_name`` unless None), and the finished tags.

    Returns:
        The registered version (None when not registered) and how many epochs were pending.
    """
    from mlflow.entities import Metric

    store = client(uri)
    wait_for_tracking_server(uri)  # down mid-run: the metrics wait in ``history``
    pending = log_history(store, run_id, history)  # epochs rank 0 could not log while the server was down
    now = int(time.time() * 1000)
    store.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    store.log_figure(run_id, plot_curves(history), "curves.png")
    if similarities:
        figure = plot_similarity_histogram(similarities["real"].numpy(), similarities["synthetic"].numpy())
        store.log_figure(run_id, figure, "similarity_histogram.png")
    info = log_encoder(uri, run_id, encoder, image_size=image_size, model_name=model_name)
    version = getattr(info, "registered_model_version", None)
    store.set_tag(run_id, FINISHED_TAG, str(len(history)))
    store.set_tag(run_id, VERSION_TAG, str(version))
    return (None if version is None else str(version)), pending


def named_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """The (run id, status) of the newest run opened as ``run_name`` in ``experiment``, if any."""
    store = client(uri)
    found = store.get_experiment_by_name(experiment)
    runs = find_runs(store, [found.experiment_id], {RUN_NAME_TAG: run_name}, max_results=1) if found else []
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def log_to_run(uri: str, run_id: str, *, texts: Mapping[str, str] | None = None,
               figures: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
               tags: Mapping[str, str] | None = None) -> None:
    """Adds artifacts (``texts``/``figures`` by file name), ``metrics`` and ``tags`` to an existing run."""
    store = client(uri)
    for name, text in (texts or {}).items():
        store.log_text(run_id, text, name)
    for name, figure in (figures or {}).items():
        store.log_figure(run_id, figure, name)
    for key, value in (metrics or {}).items():
        store.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        store.set_tag(run_id, key, str(value))


def mark_running(uri: str, run_id: str) -> None:
    """Marks a run RUNNING again (a resumed run that had ended FAILED or KILLED)."""
    client(uri).update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Marks a run FINISHED, KILLED or FAILED."""
    client(uri).set_terminated(run_id, status)


# ---------------------------------------------------------------------------- registering a training's encoder


class EncoderForExport(nn.Module):
    """What gets registered: a float image batch (N, 3, H, W) -> backbone features (N, F)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.encoder(images)


def log_encoder(uri: str, run_id: str, encoder: nn.Module, *, image_size: int, model_name: str | None,
                name: str = "encoder") -> Any:
    """Logs the encoder to run ``run_id`` (pt2, dynamic batch) and registers it when named.

    Returns:
        The ``ModelInfo``; ``registered_model_version`` is set when registered.
    """
    import mlflow

    module = EncoderForExport(encoder).cpu().eval()
    example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)  # batch 2: dynamic batch dim
    # log_model has no URI or run argument: it logs to the active run of the process-wide store.
    with model_flavour_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            module, name=name, input_example=example, registered_model_name=model_name,
            serialization_format="pt2", pip_requirements=PIP_REQUIREMENTS,
        )
    return info


def label_version(uri: str, model_name: str, version: str, *, aliases: Sequence[str] = (),
                  tags: Mapping[str, str] | None = None) -> None:
    """Points each of ``aliases`` at ``version`` and sets its ``tags``."""
    store = client(uri)
    for alias in aliases:
        store.set_registered_model_alias(model_name, alias, version)
    for key, value in (tags or {}).items():
        store.set_model_version_tag(model_name, version, key, value)


def promote_if_better(uri: str, model_name: str, version: str | int, *, knn_top1: float, dataset: str,
                      alias: str = CHAMPION) -> bool:
    """Tags the version with its score and moves ``alias`` to it when it beats the current holder
    on the same dataset (or when nothing holds the alias yet).

    Returns:
        Whether the alias moved.
    """
    from mlflow.exceptions import MlflowException

    store = client(uri)
    version = str(version)
    store.set_model_version_tag(model_name, version, "knn_top1", f"{knn_top1:.6f}")
    store.set_model_version_tag(model_name, version, "dataset", dataset)
    try:
        current = store.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        current = None
    if current is not None:
        same_dataset = current.tags.get("dataset") == dataset
        if not same_dataset or float(current.tags.get("knn_top1", "-inf")) >= knn_top1:
            return False
    store.set_registered_model_alias(model_name, alias, version)
    return True
