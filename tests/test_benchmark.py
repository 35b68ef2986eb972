"""The benchmark script runs and reports paired figures (no timing is asserted)."""

from __future__ import annotations

import math

from pipelines import benchmark


def test_benchmarks_report_paired_ratios(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "LOSS_SETTINGS", [(16, 8, 4, 4)])
    monkeypatch.setattr(benchmark, "AUGMENT_SETTINGS", [("tiny", 16, 16, 0.5)])
    loss_rows = benchmark.bench_loss(rounds=1, repeats=1)
    aug_rows = benchmark.bench_augment(n_images=64, batch_size=32)
    train_row = benchmark.bench_train(batch_size=4, width=0.125, steps=1)
    for row in loss_rows:
        assert math.isclose(row["sscl_ratio"], row["sscl_ms"] / row["nt_ms"])
    assert aug_rows[0]["ratio"] > 0 and train_row["ratio"] > 0
    out = capsys.readouterr().out
    assert "sscl/nt" in out and "per-image img/s" in out and "SSCL/SimCLR" in out
