"""The benchmark script times what it prints, and says when a comparison cannot run (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import itertools
import sys

import pytest

import sscl.losses
from pipelines import benchmark


@pytest.fixture
def sscl_calls(monkeypatch) -> list[tuple[int, int, int, int]]:
    """Records (B, D, n_hard, K) of every ``sscl_loss`` call with K > 0 the benchmarks make (hcl_loss is
    sscl_loss with K = 0)."""
    calls, real = [], sscl.losses.sscl_loss

    def recording(z1, z2, **hyper):
        if hyper["n_synthetic"] > 0:
            calls.append((z1.shape[0], z1.shape[1], hyper["n_hard"], hyper["n_synthetic"]))
        return real(z1, z2, **hyper)

    monkeypatch.setattr(sscl.losses, "sscl_loss", recording)
    return calls


def printed_rows(out: str, columns: int) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in line.split()[:columns]) for line in out.splitlines() if line.split()[0].isdigit()]


def test_loss_rows_time_sscl_at_the_settings_they_print(monkeypatch, capsys, sscl_calls):
    settings = [(16, 8, 4, 4), (12, 4, 6, 2)]
    monkeypatch.setattr(benchmark, "LOSS_SETTINGS", settings)
    rows = benchmark.bench_loss(rounds=1, repeats=1)
    assert printed_rows(capsys.readouterr().out, 4) == settings
    assert [(r["B"], r["D"], r["n_hard"], r["K"]) for r in rows] == settings
    assert [setting for setting, _ in itertools.groupby(sscl_calls)] == settings  # each row's calls, in order


def test_lightly_comparison_is_skipped_with_a_message_when_lightly_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # makes `import lightly...` raise ImportError
    monkeypatch.setitem(sys.modules, "lightly.loss", None)
    assert benchmark.bench_lightly(rounds=1, repeats=1) == []
    out = capsys.readouterr().out
    assert "lightly comparison skipped" in out and "pip install --no-deps lightly" in out


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly (the 'bench' extra) is not installed")
def test_lightly_comparison_times_sscl_at_k8_against_the_same_objective(monkeypatch, capsys, sscl_calls):
    # bench_lightly raises if lightly's NTXentLoss is not nt_xent on the same inputs.
    monkeypatch.setattr(benchmark, "LIGHTLY_SETTINGS", [(20, 8), (24, 4)])
    rows = benchmark.bench_lightly(rounds=1, repeats=1)
    assert printed_rows(capsys.readouterr().out, 2) == [(20, 8), (24, 4)]
    assert [(r["B"], r["D"]) for r in rows] == [(20, 8), (24, 4)]
    assert [setting for setting, _ in itertools.groupby(sscl_calls)] == [(20, 8, 32, 8), (24, 4, 32, 8)]


def test_augment_and_train_benchmarks_print_their_rows(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "AUGMENT_SETTINGS", [("tiny", 16, 16, 0.5)])
    benchmark.bench_augment(n_images=64, batch_size=32)
    benchmark.bench_train(batch_size=4, width=0.125, steps=1)
    out = capsys.readouterr().out
    assert "per-image img/s" in out and "tiny" in out and "SSCL/SimCLR" in out


def test_queue_rows_time_moco_loss_at_the_settings_they_print_against_infonce(monkeypatch, capsys):
    import torch

    calls, real = [], sscl.losses.moco_loss

    def recording(q, k, queue, **hyper):
        calls.append((q.shape[0], q.shape[1], queue.shape[0], hyper["n_hard"], hyper["n_synthetic"]))
        return real(q, k, queue, **hyper)

    monkeypatch.setattr(sscl.losses, "moco_loss", recording)
    settings = [(8, 4, 32, 6, 3), (6, 8, 20, 4, 2)]
    monkeypatch.setattr(benchmark, "QUEUE_SETTINGS", settings)
    rows = benchmark.bench_queue(rounds=1, repeats=1)
    assert printed_rows(capsys.readouterr().out, 5) == settings
    assert [setting for setting, _ in itertools.groupby(calls)] == settings
    assert all(r["ratio"] > 0 for r in rows)
    # The baseline is MoCo's InfoNCE: moco_loss without hardness, debiasing or synthetic negatives.
    g = torch.Generator().manual_seed(0)
    q, k, queue = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (5, 5, 30))
    torch.testing.assert_close(benchmark.infonce(q, k, queue, 0.2), real(q, k, queue, temperature=0.2))
