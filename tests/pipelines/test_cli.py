"""The command line: user errors exit 2 with the key named and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bad_overrides_exit_2_naming_every_key():
    out = run("config", "--config", "pipelines/configs/quickstart.yaml", "loss.temperature=-1", "model.encoder=vit")
    assert out.returncode == 2
    assert "loss.temperature=-1.0: must be > 0" in out.stderr and "model.encoder='vit'" in out.stderr
    assert "Traceback" not in out.stderr


def test_print_config_resolves_preset_and_overrides():
    out = run("config", "--config", "pipelines/configs/quickstart.yaml", "--print-config", "loss.beta=2.5")
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["loss"]["beta"] == 2.5 and tree["data"]["source"] == "digits"


def test_missing_preset_and_unknown_command():
    out = run("config", "--config", "nope.yaml")
    assert out.returncode == 2 and "nope.yaml" in out.stderr and "Traceback" not in out.stderr
    assert run("frobnicate").returncode == 2
    assert "loss.temperature" in run("config", "--help").stdout


def test_local_training_rejects_bad_batch_size_cleanly():
    out = run("train-local", "--config", "pipelines/configs/quickstart.yaml", "data.batch_size=100000", "train.epochs=1")
    assert out.returncode == 2 and "data.batch_size=100000" in out.stderr and "Traceback" not in out.stderr


def test_printed_config_never_shows_tracking_credentials():
    for command in (["config"], ["pretrain", "--print-config"]):
        out = run(*command, "--config", "pipelines/configs/quickstart.yaml", "--print-config",
                  "tracking.uri=https://alice:s3cret@mlflow.example.com")
        assert out.returncode == 0, out.stderr
        assert "s3cret" not in out.stdout and "alice" not in out.stdout
        assert yaml.safe_load(out.stdout)["tracking"]["uri"] == "https://***@mlflow.example.com"
