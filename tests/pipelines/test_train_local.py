"""Training without Ray: the same presets and data sources, one device, one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICKSTART

ROOT = Path(__file__).parents[2]


@pytest.mark.integration
def test_trains_an_image_folder_with_the_preset_while_ray_cannot_be_imported(tmp_path):
    from pipelines.bench.ingest import write_jpeg_folder
    from sscl.build import model_from_config
    from sscl.config import load_config

    root = write_jpeg_folder(tmp_path / "images", 120, side=40, n_classes=3)
    overrides = ["data.source=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=32",
                 "model.width=0.125", "train.epochs=2", "train.knn_k=5", "train.linear_epochs=5",
                 "train.run_name=folder"]
    # ``sys.modules["ray"] = None`` makes every ``import ray`` fail, as on a machine without Ray.
    script = ("import sys; sys.modules['ray'] = None; from pipelines.train_local import cli; "
              f"cli({['--config', str(QUICKSTART), '--workers', '1', *overrides]!r})")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "before training: knn_top1" in out.stdout and "trained: kNN top-1" in out.stdout

    saved = tmp_path / "outputs" / "local" / "folder"
    result = json.loads((saved / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert all(0 <= h["knn_top1"] <= 1 and 0 <= h["neg_floor_fraction"] <= 1 for h in result["history"])
    assert {"knn_top1", "linear_top1", "initial_knn_top1", "initial_linear_top1"} <= set(result["final"])
    assert result["config"]["data"]["root"] == str(root)
    model = model_from_config(load_config(QUICKSTART, overrides))
    model.load_state_dict(torch.load(saved / "model.pt", weights_only=True))  # the preset's model, trained


def test_a_device_this_machine_lacks_is_named():
    from pipelines.train_local import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device 'cuda': no such GPU here"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device 'tpu'"):
        resolve_device("tpu")


def test_bad_flags_and_keys_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    from pipelines.train_local import cli

    monkeypatch.chdir(tmp_path)
    for argv, named in ((["--config", str(QUICKSTART), "--workers", "-1"], "--workers must be >= 0"),
                        (["--config", str(QUICKSTART), "data.batch_size=0"], "data.batch_size"),
                        (["--config", str(QUICKSTART), "data.source=imagefolder", f"data.root={tmp_path}/none"],
                         "none")):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err
