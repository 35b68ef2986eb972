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


def check_tracking_server(uri: str, *, timeout_s: float = 10.0) -> None:
    """Fails fast when an HTTP tracking server does not answer its ``/health`` endpoint.

    Raises:
        ConnectionError: naming the (redacted) URI, within about ``timeout_s`` seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            if response.status != 200:
                raise ConnectionError(f"MLflow tracking server {redact_uri(uri)} answered {response.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise ConnectionError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({getattr(err, 'reason', err)}); start it or set "
            "MLFLOW_TRACKING_URI / tracking.uri"
        ) from None


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
