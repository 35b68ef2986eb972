"""The GPU check's CPU quick run: every section reports, correctness passes, and it runs on torch
alone, as it must on the GPU machine (no Ray, no MLflow there)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import device_checks
from pipelines.bench import gpu_check, gpu_plans
from pipelines.bench.gpu_training import time_end_to_end
from pipelines.bench.harness import Row

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "loss timing", "augmentation", "training step", "end to end")

# Runs the module as `python -m` would, with ray and mlflow unimportable (as on the GPU machine);
# any attempt to import them is recorded, and what ended up in sys.modules is printed last.
RUN_WITHOUT_RAY_OR_MLFLOW = r"""
import runpy, sys

BLOCKED = ("ray", "mlflow")
attempted = []


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempted.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, Absent())
try:
    runpy.run_module("pipelines.gpu_check", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(f"blocked imports: attempted={attempted} loaded={loaded}")
sys.exit(code)
"""


def table_rows(stdout: str) -> list[list[str]]:
    """The printed table's body, each line split into its five columns."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("section"))
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    body = []
    for line in lines[header + 2 :]:
        if not line.startswith(SECTIONS):
            break
        body.append(re.split(r" {2,}", line.strip(), maxsplit=4))
    return body


@pytest.mark.integration  # the whole check in a subprocess
def test_quick_cpu_run_reports_every_section_on_torch_alone(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, "-c", RUN_WITHOUT_RAY_OR_MLFLOW, "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "blocked imports: attempted=[] loaded=[]" in proc.stdout

    table = table_rows(proc.stdout)
    assert {row[0] for row in table} == set(SECTIONS)
    assert all(len(row) == 5 for row in table), table
    correctness = [row for row in table if row[0] == "correctness"]
    assert correctness and all(row[4] == "pass" for row in correctness), correctness
    for loss in ("nt_xent", "dcl", "hcl", "sscl mix", "sscl copy", "moco_loss"):
        assert any(row[1].startswith(f"{loss} float64") for row in correctness), loss
        assert any(row[1].startswith(f"{loss} bf16") for row in correctness), loss
    assert not [row for row in table if row[4].startswith(("error", "FAIL"))]
    # One progress line per section on stderr, for partial logs.
    for section in SECTIONS:
        assert f"] {section}: " in proc.stderr

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["section"], r["case"], r["status"][:100]) for r in rows] == [(t[0], t[1], t[4]) for t in table]
    assert report["environment"]["device"] == "cpu" and report["environment"]["quick"] is True
    for r in rows:
        if "vs loop reference" in r["case"]:
            assert 0 <= r["figure"] <= 1e-10, r
        if r["section"] == "correctness":
            assert r["status"] == "pass"
        elif r["status"] == "ok":
            assert r["figure"] > 0, r
    timings = [r for r in rows if r["section"] == "loss timing" and r["unit"] == "time ratio"]
    assert len(timings) == 3 + 2  # three batches (sscl/nt_xent), two queue sizes (moco_loss/InfoNCE)
    for r in timings:  # the ratio row is sscl over nt_xent (moco_loss over InfoNCE) of the two rows before it
        i = rows.index(r)
        assert abs(r["figure"] - rows[i - 1]["figure"] / rows[i - 2]["figure"]) < 1e-9
    steps = [r for r in rows if r["section"] == "training step" and r["unit"] == "img/s"]
    assert len(steps) == 2 * 3 * 3  # models x (simclr, sscl, moco sscl) x option sets
    compiled_moco = [r for r in steps if r["case"].startswith("moco") and "compile on" in r["case"]]
    assert len(compiled_moco) == 2 and all(r["status"].startswith("skipped: ") for r in compiled_moco)
    ran = [r for r in steps if r not in compiled_moco]
    assert all(r["status"] == "ok" and r["extra"]["steps"] == 2 for r in ran)
    ms = {r["case"]: r["extra"]["ms_per_step"] for r in ran}
    ratios = [r for r in rows if r["unit"] == "step time ratio"]
    assert len(ratios) == 2 * 2 * 3 - 2  # (sscl, moco sscl) over simclr, per model and option set that ran
    for r in ratios:  # "<loss>/simclr <model, options>" divides the two cases' step times
        loss, label = r["case"].split("/simclr ")
        assert abs(r["figure"] - ms[f"{loss} {label}"] / ms[f"simclr {label}"]) < 1e-9, r


def test_end_to_end_rows_time_both_decoders_against_the_step_alone(tmp_path):
    """The quick plan's section 5, in this process: its rows, and ratios that divide them."""
    rows = time_end_to_end(torch.device("cpu"), gpu_plans.QUICK)
    assert rows[0].case == "device decoding names a truncated JPEG" and rows[0].status == "pass"
    rates = [r for r in rows if r.unit == "img/s"]
    assert [r.case.split(":")[0] for r in rates] == [
        "step only (images on the device)", "decoded by 2 DataLoader workers on the CPU",
        "bytes from the workers, decoded on the device"]
    assert all(r.status == "ok" and r.figure > 0 and r.extra["steps"] == 48 // 16 for r in rates)
    ratios = [r for r in rows if r.unit == "rate ratio"]
    assert [r.figure for r in ratios] == pytest.approx([rates[1].figure / rates[0].figure,
                                                         rates[2].figure / rates[0].figure])


def test_a_device_decoder_that_accepts_a_truncated_jpeg_fails_the_check(monkeypatch):
    import dataclasses

    import sscl.data.device_decode

    real = sscl.data.device_decode.decode_batch

    def lenient(encoded, where, **kwargs):
        return real(encoded[:1], where[:1], **kwargs)  # decodes the whole file, drops the cut one silently

    monkeypatch.setattr(sscl.data.device_decode, "decode_batch", lenient)
    tiny = dataclasses.replace(gpu_plans.QUICK.e2e, images=16, batch=8, loader_workers=0, epochs=1)
    rows = time_end_to_end(torch.device("cpu"), dataclasses.replace(gpu_plans.QUICK, e2e=tiny))
    assert rows[0].status == "FAIL: a truncated JPEG was decoded without an error"
    assert gpu_check.correctness_failed(rows)


def test_wrong_loss_fails_its_correctness_row(monkeypatch):
    # NT-Xent at a slightly different temperature: finite, close, and wrong.
    real = device_checks.nt_xent

    def off_by_a_little(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
        return real(z1, z2, temperature=temperature * 1.001)

    monkeypatch.setattr(device_checks, "nt_xent", off_by_a_little)
    rows = gpu_check.check_correctness(torch.device("cpu"), gpu_plans.QUICK)
    status = {r.case: r.status for r in rows}
    assert status["nt_xent float64 vs loop reference (value, grads)"].startswith("FAIL: max abs error")
    assert status["dcl float64 vs loop reference (value, grads)"] == "pass"
    assert status["nt_xent bf16 autocast: loss and grads finite"] == "pass"  # finite, so stable
    assert gpu_check.correctness_failed(rows)


def test_a_failing_section_is_recorded_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    def broken(device: torch.device, plan: gpu_plans.Plan) -> list[Row]:
        raise RuntimeError("no kernel image is available")

    def timing(device: torch.device, plan: gpu_plans.Plan) -> list[Row]:
        return [Row("loss timing", "a case", 1.5, "ms", "ok")]

    monkeypatch.setattr(gpu_check, "SECTION_RUNNERS", {"correctness": broken, "loss timing": timing})
    out = tmp_path / "deep" / "g.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["section"], r["status"]) for r in rows] == [
        ("correctness", "FAIL: RuntimeError: no kernel image is available"),
        ("loss timing", "ok"),
    ]
    assert "FAILED: correctness" in capsys.readouterr().out
