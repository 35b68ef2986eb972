"""Plots for MLflow: they render, and they leave no figures open in the process."""

from __future__ import annotations

import io
import warnings

import matplotlib.pyplot as plt
import numpy as np

from sscl import tracking_plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_plots_render_and_stay_out_of_pyplot():
    history = [{"epoch": e, "loss": 5.0 - e, "knn_top1": 0.1 * e} for e in range(1, 4)]
    rows = [
        {"trial_id": "a", "status": "finished", "values": {"loss.beta": 0.5, "loss.mode": "mix"}, "knn_top1": 0.7},
        {"trial_id": "b", "status": "stopped early", "values": {"loss.beta": 20.0, "loss.mode": "copy"}, "knn_top1": 0.6},
    ]
    rng = np.random.default_rng(0)
    figures = [
        tracking_plots.plot_curves(history),
        tracking_plots.plot_similarity_histogram(rng.uniform(-1, 1, 200), rng.uniform(0, 1, 50)),
        tracking_plots.plot_sweep(rows, ["loss.beta", "loss.mode"], "knn_top1"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyplot warns once more than 20 figures are open
        figures += [tracking_plots.plot_curves(history) for _ in range(21)]
    assert plt.get_fignums() == []
    for fig in figures:
        assert _png(fig).startswith(b"\x89PNG")
    assert figures[2].axes[0].get_xscale() == "log"  # beta spans 40x
