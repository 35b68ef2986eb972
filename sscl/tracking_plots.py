"""The figures a training run and a sweep log to MLflow: learning curves, negative similarities, a sweep.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing stays registered
in a global figure list (a long sweep would otherwise keep every figure alive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_curves", "plot_similarity_histogram", "plot_sweep"]


def plot_curves(history: Sequence[Mapping[str, float]]) -> Figure:
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


def plot_similarity_histogram(real: np.ndarray, synthetic: np.ndarray) -> Figure:
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


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str) -> Figure:
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
