"""The command line: user errors exit 2 with the key named and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


def test_the_sweeps_settings_are_its_own_section_of_the_same_preset(tmp_path):
    from pipelines import tune
    from sscl.config import ConfigError, load_config

    preset = tmp_path / "preset.yaml"
    preset.write_text("train: {epochs: 3}\noptim: {warmup_epochs: 0}\ntune: {name: priors, num_samples: 6, metric: loss}\n")
    cfg, sweep = tune.load(preset, ["tune.num_samples=8", "loss.beta=2"])
    assert (sweep.name, sweep.num_samples, sweep.metric, sweep.scheduler) == ("priors", 8, "loss", "asha")
    assert cfg.train.epochs == 3 and cfg.loss.beta == 2
    assert load_config(preset, ["loss.beta=2"]) == cfg  # the tune block is left to the sweep
    # A training command is given the same preset: the block is the sweep's, its keys on that line an error.
    with pytest.raises(ConfigError, match="tune.name: a setting of python -m pipelines.tune; this command does not"):
        load_config(preset, ["tune.name=other"])
    with pytest.raises(ConfigError) as err:
        tune.load(preset, ["tune.metric=accuracy", "tune.grace_period=5", "tune.nmae=x"])
    text = str(err.value)
    assert "tune.metric='accuracy'" in text and "tune.nmae: unknown key; did you mean tune.name?" in text
    with pytest.raises(ConfigError, match=r"tune.grace_period=5: must be <= train.epochs=3"):
        tune.load(preset, ["tune.grace_period=5"])


def test_the_sweep_command_prints_and_lists_its_own_keys():
    space = "tune_spaces/sscl_priors.yaml"
    out = subprocess.run([sys.executable, "-m", "pipelines.tune", "--config", "pipelines/configs/quickstart.yaml",
                          "--space", space, "--print-config", "tune.num_samples=3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["tune"]["num_samples"] == 3 and tree["loss"]["name"] == "sscl"
    shown = subprocess.run([sys.executable, "-m", "pipelines.tune", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120).stdout
    assert "tune.grace_period" in shown and "loss.temperature" in shown
    assert "tune.grace_period" not in run("config", "--help").stdout
