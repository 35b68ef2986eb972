"""Search spaces: the shipped ones load against every preset; each kind of mistake names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sscl.config import ConfigError, apply_overrides, load_config
from sscl.search_space import load_space, parse_space, trial_values

ROOT = Path(__file__).parents[2]
PRESETS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


def test_shipped_spaces_load_against_every_preset():
    assert {p.name for p in SPACES} >= {"sscl_priors.yaml", "loss_family.yaml", "moco_sscl.yaml"}
    for preset in PRESETS:
        base = load_config(preset)
        for path in SPACES:
            if path.name == "moco_sscl.yaml" and base.scaling.sync_batchnorm:  # imagenet.yaml: MoCo refuses it
                with pytest.raises(ConfigError, match="model.method: scaling.sync_batchnorm=true: not with model"):
                    load_space(path, base)
                continue
            space = load_space(path, base)
            assert space.searched_keys and all("." in k for k in space.searched_keys)
    priors = load_space(ROOT / "tune_spaces" / "sscl_priors.yaml", load_config(PRESETS[0]))
    kinds = {p.key: p.kind for p in priors.params}
    assert kinds["loss.temperature"] == "loguniform" and kinds["loss.mode"] == "choice"
    family = load_space(ROOT / "tune_spaces" / "loss_family.yaml", load_config(PRESETS[0]))
    (bundle,) = [p for p in family.params if p.is_bundle]
    assert bundle.kind == "grid" and [b["loss.name"] for b in bundle.args] == ["simclr", "dcl", "hcl", "sscl"]


@pytest.mark.parametrize("entry, message", [
    ({"loss.temprature": {"loguniform": [0.05, 1.0]}}, "loss.temprature: unknown key; did you mean loss.temperature?"),
    ({"los.beta": {"uniform": [0, 1]}}, "los: unknown section"),
    ({"loss.beta": {"logunifrom": [0.1, 1]}}, "loss.beta: {'logunifrom': [0.1, 1]} is not a distribution"),
    ({"loss.beta": {"uniform": [0, 1, 2]}}, "loss.beta: uniform takes [low, high]"),
    ({"loss.beta": {"uniform": [2, 1]}}, "loss.beta: uniform needs low < high"),
    ({"loss.temperature": {"loguniform": [0, 1]}}, "loss.temperature: loguniform needs low > 0"),
    ({"loss.tau_plus": {"uniform": [0.0, 1.5]}}, "loss.tau_plus=1.5: must be < 1"),
    ({"loss.beta": {"uniform": [-1.0, 1.0]}}, "loss.beta=-1.0: must be >= 0"),
    ({"loss.n_hard": {"choice": [16, 400]}}, "loss.n_hard=400: must be <= 2 * data.batch_size - 2 = 254"),
    ({"loss.n_synthetic": {"uniform": [0, 8]}}, "loss.n_synthetic: an integer key; use quniform"),
    ({"loss.n_synthetic": {"quniform": [0, 8, 0.5]}}, "loss.n_synthetic: quniform needs q > 0 (and integer"),
    ({"loss.mode": {"grid": ["mix", "swap"]}}, "loss.mode='swap': must be one of mix, copy"),
    ({"loss.mode": {"choice": []}}, "loss.mode: choice takes a non-empty list"),
    ({"loss.name": "infonce"}, "loss.name='infonce': must be one of simclr, dcl, hcl, sscl"),
    ({"tune.num_samples": {"choice": [1, 2]}}, "tune.num_samples: cannot be searched"),
    ({"data.root": {"choice": ["a", "b"]}}, "data.root: cannot be searched"),
    ({"train.epochs": {"choice": [1, 2]}}, "train.epochs: cannot be searched (the budget ASHA schedules against)"),
    ({"lossfamily": {"grid": [{"loss.nam": "dcl"}]}}, "loss.nam: unknown key; did you mean loss.name?"),
    ({"lossfamily": {"uniform": [0, 1]}}, "lossfamily: a key without a dot is a bundle"),
    ({"lossfamily": {"grid": [{"loss.beta": 1.0}]}, "loss.beta": {"uniform": [0, 1]}}, "loss.beta: sets loss.beta, which lossfamily sets too"),
])
def test_bad_spaces_name_the_key(entry, message):
    base = load_config(ROOT / "pipelines" / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError) as err:
        parse_space(entry, base, source="space.yaml")
    assert any(message in problem and problem.startswith("space.yaml: ") for problem in err.value.problems), err.value


def test_every_problem_is_reported_together():
    base = load_config()
    with pytest.raises(ConfigError) as err:
        parse_space({"loss.temprature": {"uniform": [0, 1]}, "loss.beta": {"uniform": [3, 1]}, "optim.lr": 1000}, base)
    assert len(err.value.problems) == 3


def test_trial_values_expand_bundles_and_apply_as_a_config():
    values = trial_values({"loss": {"loss.name": "hcl", "loss.beta": 1.0}, "loss.temperature": 0.2,
                           "optim.warmup_epochs": 3.0})
    assert values == {"loss.name": "hcl", "loss.beta": 1.0, "loss.temperature": 0.2, "optim.warmup_epochs": 3.0}
    cfg = apply_overrides(load_config(), values)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.temperature) == ("hcl", 1.0, 0.2)
    assert cfg.optim.warmup_epochs == 3 and isinstance(cfg.optim.warmup_epochs, int)  # a quniform draw
    with pytest.raises(ConfigError, match="loss.tau_plus=2.0: must be < 1"):
        apply_overrides(cfg, {"loss.tau_plus": 2})


def test_misspelled_space_key_fails_before_ray_is_imported(tmp_path):
    (tmp_path / "space.yaml").write_text("loss.temprature: {loguniform: [0.05, 1.0]}\n")
    code = ("import sys\nfrom pipelines import tune\ntry:\n    tune.cli(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'ray imported:', 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pipelines/configs/quickstart.yaml"),
                          "--space", str(tmp_path / "space.yaml")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "exit 2 ray imported: False" in out.stdout
    assert "loss.temprature: unknown key; did you mean loss.temperature?" in out.stderr


def test_searched_values_are_checked_with_the_spaces_fixed_values_applied():
    base = load_config(PRESETS[0].parent / "quickstart.yaml")  # simclr, batch 128: in-batch n_hard <= 254
    space = parse_space({"model.method": "moco", "loss.n_hard": {"choice": [64, 1024]}}, base)
    assert space.searched_keys == ["model.method", "loss.n_hard"]
    with pytest.raises(ConfigError, match=r"loss.n_hard \(choice\): loss.n_hard=1024: must be <= 2 \* data.batch_size"):
        parse_space({"loss.n_hard": {"choice": [64, 1024]}}, base)
    with pytest.raises(ConfigError, match=r"loss.n_hard=5000: must be <= model.queue_size = 4096"):
        parse_space({"model.method": "moco", "loss.n_hard": {"choice": [5000]}}, base)
    # A fixed value that no searched batch can hold is refused before any trial starts.
    with pytest.raises(ConfigError, match=r"data.batch_size \(grid\): loss.n_hard=64: must be <= 2 \* data.batch_size "
                                          r"- 2 = 38"):
        parse_space({"data.batch_size": {"grid": [20, 64]}, "loss.n_hard": 64}, base)


def test_a_space_file_takes_numbers_as_typed_and_refuses_a_key_given_twice(tmp_path):
    base = load_config(PRESETS[0])
    path = tmp_path / "space.yaml"
    path.write_text("loss.temperature: {loguniform: [1e-3, 1.0]}\noptim.lr: {grid: [1e-4, 5E-4]}\n")
    space = load_space(path, base)
    assert {p.key: tuple(p.args) for p in space.params}["loss.temperature"] == (1e-3, 1.0)
    path.write_text("loss.temperature: {loguniform: [0.05, 1.0]}\nloss.temperature: {grid: [0.1]}\n")
    with pytest.raises(ConfigError, match="found the key 'loss.temperature' twice"):
        load_space(path, base)
