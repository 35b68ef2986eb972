"""Every configuration key given generated bad values: each ends in exit status 2 with a message, or is
accepted; never a traceback, never a hang. The accepted ones then train one epoch of ``train_local``."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipelines import tune
from pipelines.config_cli import parse_config
from sscl.config import Config, ConfigError, field_info, flatten, load_config

QUICK = str(Path(__file__).parents[2] / "pipelines" / "configs" / "quickstart.yaml")
SPACE = str(Path(__file__).parents[2] / "tune_spaces" / "sscl_priors.yaml")
KEYS = sorted(flatten(Config()))
SWEEP_KEYS = sorted(f"tune.{f.name}" for f in dataclasses.fields(tune.Sweep))  # the sweep command's own
BAD_VALUES = {"wrong type": "[1, 2]", "mapping": "{a: 1}", "nan": ".nan", "nan text": "nan", "inf": ".inf",
              "negative": "-3", "zero": "0", "huge": "1e12", "huge int": str(10**30), "empty": "", "unicode": "日本語✓",
              "path": "../../x/..", "control": "a\tb", "bool": "true", "null": "null"}


def _outcome(key: str, value: str, capsys) -> int:
    """The exit status of ``--print-config`` with ``key=value`` over the quickstart preset."""
    argv = ["--config", QUICK, f"{key}={value}", "--print-config"]
    with pytest.raises(SystemExit) as ended:
        tune.cli(["--space", SPACE, *argv]) if key in SWEEP_KEYS else parse_config(argv, prog="fuzz")
    out, err = capsys.readouterr()
    if ended.value.code == 2:
        assert key in err and "Traceback" not in err, err
    else:
        assert ended.value.code == 0 and out.startswith("data:"), (ended.value.code, err[-500:])
    return ended.value.code


@pytest.mark.parametrize("key", KEYS + SWEEP_KEYS)
def test_every_key_takes_bad_values_with_exit_2_or_accepts_them(key, capsys):
    for name, value in BAD_VALUES.items():
        _outcome(key, value, capsys)


def test_every_number_has_bounds():
    sweep = {f"tune.{f.name}": (typing.get_type_hints(tune.Sweep)[f.name], f.metadata)
             for f in dataclasses.fields(tune.Sweep)}
    for key in KEYS + SWEEP_KEYS:
        hint, meta = sweep[key] if key in sweep else field_info(key)
        if hint in (int, float) and not meta.get("choices"):
            assert meta.get("le") is not None or meta.get("lt") is not None, f"{key} has no upper bound"
            assert meta.get("ge") is not None or meta.get("gt") is not None, f"{key} has no lower bound"


def test_a_later_override_wins():
    assert load_config(None, ["loss.temperature=0.1", "loss.temperature=0.2"]).loss.temperature == 0.2


# A quick one-epoch run on the digits; a fuzzed key replaces its base value.
BASE = {"train.epochs": "1", "model.width": "0.125", "data.batch_size": "256", "train.knn_max_images": "300",
        "train.linear_epochs": "2", "train.knn_k": "10", "optim.warmup_epochs": "0"}


def _accepted() -> list[tuple[str, str]]:
    """Every (key, bad value) the configuration accepts over ``BASE``."""
    pairs = []
    for key in KEYS:
        for value in dict.fromkeys(BAD_VALUES.values()):
            overrides = [f"{k}={v}" for k, v in BASE.items() if k != key] + [f"{key}={value}"]
            try:
                load_config(QUICK, overrides)
            except ConfigError:
                continue
            if (key, value) != ("train.compile", "true"):  # valid, and minutes of inductor compilation on a CPU
                pairs.append((key, value))
    return pairs


def _rounds(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The accepted pairs grouped into few runs: round i sets the i-th accepted value of every key at once;
    a round whose values together break a constraint is split until each part is accepted."""
    by_key: dict[str, list[str]] = {}
    for key, value in pairs:
        by_key.setdefault(key, []).append(value)
    rounds, pending = [], [{k: v[i] for k, v in by_key.items() if i < len(v)}
                           for i in range(max(map(len, by_key.values())))]
    while pending:
        values = pending.pop()
        try:
            load_config(QUICK, [f"{k}={v}" for k, v in {**BASE, **values}.items()])
            rounds.append(values)
        except ConfigError:
            items = list(values.items())
            pending += [dict(items[: len(items) // 2]), dict(items[len(items) // 2:])]
    return rounds


ROUNDS = _rounds(_accepted())


@pytest.mark.integration
@pytest.mark.parametrize("values", ROUNDS, ids=[f"round{i}-{len(r)}keys" for i, r in enumerate(ROUNDS)])
def test_accepted_bad_values_train_one_epoch_or_exit_2(values, tmp_path, monkeypatch, capsys):
    from pipelines import train_local

    monkeypatch.chdir(tmp_path)
    overrides = [f"{k}={v}" for k, v in {**BASE, **values}.items()]
    try:
        result = train_local.cli(["--config", QUICK, "--device", "cpu", "--workers", "0",
                                  "--out-dir", str(tmp_path / "out"), *overrides])
    except SystemExit as ended:
        err = capsys.readouterr().err
        assert ended.code == 2 and "Traceback" not in err, err[-3000:]
        return
    assert 0 <= result["knn_top1"] <= 1 and result["epochs"] == 1
