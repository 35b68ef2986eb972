"""The benchmark script times what it prints, and says when a comparison cannot run (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import itertools
import sys

import pytest

import sscl.losses
from pipelines.bench import benchmark, ingest


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


@pytest.mark.integration
def test_ingest_reads_a_given_folder_and_writes_its_figures_as_json(tmp_path):
    """``ingest --root DIR --json FILE``: the folder as given (not a generated one), both loaders over
    every epoch, Ray's start apart from the epochs, and the figures the README quotes."""
    import json
    import subprocess

    root = ingest.write_jpeg_folder(tmp_path / "mine", 300, side=(40, 30), n_classes=3)
    out = tmp_path / "ingest.json"
    run = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "ingest", "--root", str(root), "--json",
                          str(out), "--epochs", "2", "--memory-sizes", "none", "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["images"] == figures["dataloader_epoch_images"] == figures["pipeline_epoch_images"] == 300
    for key in ("pipeline_img_s", "pipeline_first_batch_s", "pipeline_steady_img_s", "dataloader_img_s",
                "dataloader_steady_img_s", "ray_start_s", "workers_warm_s"):
        assert figures[key] > 0, key
    assert figures["first_epoch_ratio"] == pytest.approx(figures["pipeline_img_s"] / figures["dataloader_img_s"])
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").glob("jpegs-*"))  # nothing generated
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"ingest of 300 images in {root} -> two 32-px views, 2 epochs")
    assert lines[1].startswith("Ray start ") and "task workers warm after" in lines[1]
    assert [line.split()[-4] for line in lines[3:7]] == ["first", "steady", "first", "steady"]
