"""MLflow in one place: tracking URI, reachability, runs, plots and the model registry.

Only rank 0 (or the driver) calls these. Registered encoders are saved with MLflow's ``pt2``
format (``torch.export``), so loading them never unpickles anything.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_URI", "CHAMPION", "EncoderForExport", "check_tracking_server", "log_encoder", "plot_curves",
           "plot_similarity_histogram", "plot_sweep", "promote_if_better", "redact_uri", "resolve_tracking_uri",
           "wait_for_tracking_server"]

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


# ---------------------------------------------------------------------------- plots


def plot_curves(history: Sequence[Mapping[str, float]]):
    """Loss and kNN top-1 per epoch, side by side. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure  # not registered with pyplot: freed like any object

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [h["knn_top1"] for h in history], marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="kNN top-1", title="kNN top-1 (held-out)")
    fig.tight_layout()
    return fig


def plot_similarity_histogram(real: np.ndarray, synthetic: np.ndarray):
    """Anchor-negative cosine similarities: all real negatives vs the synthetic ones."""
    from matplotlib.figure import Figure  # not registered with pyplot: freed like any object

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    values = np.concatenate([real, synthetic]) if len(synthetic) else real
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 81)
    ax.hist(real, bins=bins, density=True, alpha=0.6, label=f"real negatives ({len(real)})")
    if len(synthetic):
        ax.hist(synthetic, bins=bins, density=True, alpha=0.6, label=f"synthetic negatives ({len(synthetic)})")
    ax.set(xlabel="cosine similarity to the anchor", ylabel="density", title="anchor-negative similarities")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str):
    """A sweep's metric against each searched hyperparameter, one panel per key.

    Args:
        rows: one per trial, with ``values`` (key -> sampled value), ``status`` and ``metric``.
        keys: the searched keys; numeric ones get a numeric axis (log when the values span 20x),
            the others one slot per value.
    """
    from matplotlib.figure import Figure  # not registered with pyplot: freed like any object

    keys = list(keys) or ["trial"]
    cols = min(3, len(keys))
    n_rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 3.2 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    markers = {"finished": ("o", "tab:blue"), "stopped early": ("x", "tab:orange"), "failed": ("s", "tab:red")}
    for ax, key in zip(axes.flat, keys):
        raw = [r["values"].get(key, r.get("trial_id")) if key != "trial" else r["trial_id"] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        labels = sorted({str(v) for v in raw})
        xs = raw if numeric else [labels.index(str(v)) for v in raw]
        for status, (marker, color) in markers.items():
            picked = [(x, r[metric]) for x, r in zip(xs, rows) if r["status"] == status and r.get(metric) is not None]
            if picked:
                ax.scatter(*zip(*picked), marker=marker, color=color, label=status)
        if numeric and min(raw) > 0 and max(raw) / min(raw) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(xlabel=key, ylabel=metric)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{metric} (last epoch of each trial) vs the searched hyperparameters")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- registry


class EncoderForExport(nn.Module):
    """What gets registered: a float image batch (N, 3, H, W) -> backbone features (N, F)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.encoder(images)


def log_encoder(encoder: nn.Module, *, image_size: int, model_name: str | None, name: str = "encoder") -> Any:
    """Logs the encoder to the active run (pt2, dynamic batch) and registers it when named.

    Returns:
        The ``ModelInfo``; ``registered_model_version`` is set when registered.
    """
    import mlflow

    module = EncoderForExport(encoder).cpu().eval()
    example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)  # batch 2: dynamic batch dim
    return mlflow.pytorch.log_model(
        module, name=name, input_example=example, registered_model_name=model_name,
        serialization_format="pt2", pip_requirements=PIP_REQUIREMENTS,
    )


def promote_if_better(model_name: str, version: str | int, *, knn_top1: float, dataset: str,
                      alias: str = CHAMPION) -> bool:
    """Tags the version with its score and moves ``alias`` to it when it beats the current holder
    on the same dataset (or when nothing holds the alias yet).

    Returns:
        Whether the alias moved.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    version = str(version)
    client.set_model_version_tag(model_name, version, "knn_top1", f"{knn_top1:.6f}")
    client.set_model_version_tag(model_name, version, "dataset", dataset)
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        current = None
    if current is not None:
        same_dataset = current.tags.get("dataset") == dataset
        if not same_dataset or float(current.tags.get("knn_top1", "-inf")) >= knn_top1:
            return False
    client.set_registered_model_alias(model_name, alias, version)
    return True


def log_params(params: Mapping[str, Any], uri_keys: Iterable[str] = ("tracking.uri",)) -> None:
    """Logs params to the active run with any URI credentials redacted."""
    import mlflow

    clean = {k: (redact_uri(str(v)) if k in uri_keys else v) for k, v in params.items()}
    mlflow.log_params(clean)


# ---------------------------------------------------------------------------- runs and epochs

RUN_NAME_TAG = "sscl.run_name"
FINISHED_TAG = "sscl.finished_epochs"  # set once the encoder of that many epochs is logged
VERSION_TAG = "sscl.registered_version"


def open_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any], config_text: str,
             tags: Mapping[str, str] | None = None) -> str:
    """The MLflow run named ``run_name`` in ``experiment``, created (with ``params``, ``tags`` and the
    redacted config as ``config.yaml``) if it does not exist yet.

    One run per name, like Ray Train's checkpoints: a resumed or extended training appends to the run
    it continues.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    client = mlflow.MlflowClient()
    previous = find_runs(client, [experiment_id], {RUN_NAME_TAG: run_name}, max_results=1)
    if previous:
        return previous[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    with mlflow.start_run(run_id=run.info.run_id):
        log_params(params)
        mlflow.log_text(config_text, "config.yaml")
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


RESUME_PREFIX = "resume_"  # params resume_<n>.<key>: a value changed by the n-th resume that changed any


def recorded_config(uri: str, run_id: str) -> tuple[dict[str, str], int]:
    """The values a run trains with now (its params, each overridden by its latest resume change) and
    how many epochs it has logged.

    Returns:
        dotted key -> value as text; the epochs.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    data = mlflow.MlflowClient().get_run(run_id).data
    values = {k: v for k, v in data.params.items() if not k.startswith(RESUME_PREFIX)}
    changes = [(int(k[len(RESUME_PREFIX):].split(".", 1)[0]), k.split(".", 1)[1], v) for k, v in data.params.items()
               if k.startswith(RESUME_PREFIX) and k[len(RESUME_PREFIX):].split(".", 1)[0].isdigit()]
    for _, key, value in sorted(changes):
        values[key] = value
    return values, int(data.metrics.get("epoch", 0))


def record_resume_changes(uri: str, run_id: str, changes: Mapping[str, tuple[str, str]], *, epoch: int) -> None:
    """Logs each allowed change of a resume as the param ``resume_<n>.<key>`` (MLflow params cannot be
    overwritten) and a tag saying at which epoch, so the run's params show every value that trained."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    params = client.get_run(run_id).data.params
    n = 1 + len({k.split(".", 1)[0] for k in params if k.startswith(RESUME_PREFIX)})
    for key, (_, new) in changes.items():
        client.log_param(run_id, f"{RESUME_PREFIX}{n}.{key}", new)
    text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
    client.set_tag(run_id, f"sscl.resume_{n}", f"after epoch {epoch}: {text}")


def find_runs(client: Any, experiment_ids: Sequence[str], tags: Mapping[str, str], max_results: int = 1000) -> list:
    """Runs carrying every tag of ``tags``, newest first (values quoted for MLflow's filter syntax)."""
    clauses = [f"tags.`{key}` = {filter_literal(value)}" for key, value in tags.items()]
    return client.search_runs(list(experiment_ids), filter_string=" and ".join(clauses),
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
    import mlflow

    mlflow.set_tracking_uri(uri)
    data = mlflow.MlflowClient().get_run(run_id).data
    return dict(data.tags), dict(data.metrics)


def log_history(client: Any, run_id: str, history: Sequence[Mapping[str, float]]) -> int:
    """Logs each epoch of ``history`` that ``run_id`` lacks (by ``epoch`` step); returns how many."""
    from mlflow.entities import Metric

    have = {m.step for m in client.get_metric_history(run_id, "epoch")}
    missing = [h for h in history if int(h["epoch"]) not in have]
    now = int(time.time() * 1000)
    for h in missing:
        # "epoch" last: its presence marks the epoch as logged in full.
        items = sorted(h.items(), key=lambda kv: kv[0] == "epoch")
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(h["epoch"])) for k, v in items])
    return len(missing)


class EpochLogger:
    """Per-epoch metrics of a training worker (rank 0) into the driver's MLflow run, each epoch once.

    ``sync(history)`` logs the checkpointed epochs the run does not have yet. If the tracking server
    is unreachable, training goes on: the epochs stay pending, a warning says how many, and the next
    sync (or the driver at the end) logs them.
    """

    def __init__(self, uri: str, run_id: str, warn: Any) -> None:
        import mlflow

        # Fail fast per call instead of MLflow's default of minutes of retries: a later sync retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.warn = run_id, warn
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient()

    def sync(self, history: Sequence[Mapping[str, float]]) -> None:
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
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    wait_for_tracking_server(uri)  # down mid-run: the metrics wait in ``history``
    pending = log_history(client, run_id, history)  # epochs rank 0 could not log while the server was down
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(dict(metrics))
        mlflow.log_figure(plot_curves(history), "curves.png")
        if similarities:
            figure = plot_similarity_histogram(similarities["real"].numpy(), similarities["synthetic"].numpy())
            mlflow.log_figure(figure, "similarity_histogram.png")
        info = log_encoder(encoder, image_size=image_size, model_name=model_name)
    version = getattr(info, "registered_model_version", None)
    client.set_tag(run_id, FINISHED_TAG, str(len(history)))
    client.set_tag(run_id, VERSION_TAG, str(version))
    return (None if version is None else str(version)), pending


def label_version(model_name: str, version: str, *, aliases: Sequence[str] = (),
                  tags: Mapping[str, str] | None = None) -> None:
    """Points each of ``aliases`` at ``version`` and sets its ``tags``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, value)


def named_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """The (run id, status) of the newest run opened as ``run_name`` in ``experiment``, if any."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = find_runs(client, [found.experiment_id], {RUN_NAME_TAG: run_name}, max_results=1) if found else []
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def log_to_run(uri: str, run_id: str, *, texts: Mapping[str, str] | None = None, figures: Mapping[str, Any] | None = None,
               metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Adds artifacts (``texts``/``figures`` by file name), ``metrics`` and ``tags`` to an existing run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    for name, text in (texts or {}).items():
        client.log_text(run_id, text, name)
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, name)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))


def mark_running(uri: str, run_id: str) -> None:
    """Marks a run RUNNING again (a resumed run that had ended FAILED or KILLED)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Marks a run FINISHED, KILLED or FAILED."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().set_terminated(run_id, status)


# ---------------------------------------------------------------------------- the registry


def _registry(uri: str):
    import mlflow

    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def _version_row(v: Any) -> dict[str, Any]:
    return {"name": v.name, "version": str(v.version), "aliases": list(v.aliases), "run_id": v.run_id,
            "knn_top1": v.tags.get("knn_top1"), "dataset": v.tags.get("dataset")}


def list_versions(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every version of every registered model (or of ``name``), newest first."""
    client = _registry(uri)
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for model in names:
        rows += [_version_row(v) for v in client.search_model_versions(f"name = {filter_literal(model)}")]
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


def describe_version(uri: str, name: str, *, alias: str | None = None, version: str | None = None) -> dict[str, Any]:
    """One version (by ``alias`` or ``version``) with its run's metrics and params.

    Raises:
        ValueError: naming the model when the registry does not have it.
    """
    from mlflow.exceptions import MlflowException

    client = _registry(uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"models:/{name}{f'@{alias}' if alias else f'/{version}'}: not in the registry "
                         f"({err.message})") from None
    run = client.get_run(found.run_id)
    return _version_row(found) | {"metrics": run.data.metrics, "params": run.data.params}


def set_alias(uri: str, name: str, version: str, alias: str) -> dict[str, Any]:
    """Points ``alias`` at ``version`` of ``name``; returns the version's row.

    Raises:
        ValueError: when the alias breaks MLflow's rules or the registry has no such version.
    """
    from mlflow.exceptions import MlflowException

    check_names(alias=alias)
    client = _registry(uri)
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"{name} version {version}: not in the registry ({err.message})") from None
    client.set_registered_model_alias(name, alias, version)
    return _version_row(client.get_model_version(name, version))


def load_registered(uri: str, model_uri: str) -> nn.Module:
    """The encoder registered at ``model_uri`` (``models:/<name>@<alias>`` or ``/<version>``), loaded
    from its pt2 program (nothing unpickled).

    Raises:
        ConnectionError: when the tracking server is unreachable. ValueError: when the registry lacks the model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    except MlflowException as err:
        raise ValueError(f"cannot load {model_uri} from {redact_uri(uri)}: {err.message}") from None


def registered_image_size(uri: str, model_uri: str) -> int | None:
    """The image side the encoder at ``model_uri`` was exported for (its signature's (-1, 3, H, W)
    input), or None when its signature does not say. torch.export fixes it: other sizes fail its guards."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    signature = mlflow.models.get_model_info(model_uri).signature
    shape = getattr(signature.inputs.inputs[0], "shape", None) if signature is not None and signature.inputs else None
    return int(shape[-1]) if shape and len(shape) == 4 and shape[-1] > 0 else None
