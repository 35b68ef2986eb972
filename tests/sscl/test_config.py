"""The config tree: presets, overrides, round trips, and malformed configs that name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
import torch

from sscl.config import Config, ConfigError, describe_keys, flatten, from_dict, load_config, to_dict

PRESETS = sorted((Path(__file__).parents[2] / "pipelines" / "configs").glob("*.yaml"))


def test_every_required_preset_exists_and_loads():
    names = {p.stem for p in PRESETS}
    assert {"quickstart", "cifar10", "cifar100", "stl10", "imagefolder", "reproduce_released"} <= names
    for path in PRESETS:
        assert isinstance(load_config(path), Config)


def test_reproduce_preset_has_the_released_settings():
    cfg = load_config(Path(PRESETS[0]).parent / "reproduce_released.yaml")
    assert (cfg.model.encoder, cfg.model.stem, cfg.model.hidden_dim, cfg.model.out_dim) == ("resnet18", "cifar", 512, 128)
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        256, 200, 0.1, 0.9, 1e-4)
    assert cfg.optim.warmup_epochs == 20
    assert (cfg.loss.temperature, cfg.loss.beta, cfg.loss.n_hard, cfg.loss.n_synthetic, cfg.loss.mode) == (
        0.5, 1.0, 32, 8, "copy")


def test_overrides_apply_over_the_preset_with_yaml_values(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("loss: {temperature: 0.5}\naugment: {crop_scale: [0.2, 1.0]}\n")
    cfg = load_config(preset, ["loss.temperature=0.2", "augment.crop_scale=[0.3, 0.9]", "scaling.use_gpu=true",
                               "loss.beta=2"])
    assert cfg.loss.temperature == 0.2 and cfg.augment.crop_scale == (0.3, 0.9) and cfg.scaling.use_gpu is True
    assert cfg.loss.beta == 2.0 and isinstance(cfg.loss.beta, float)
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_round_trip_and_flatten():
    cfg = load_config(None, ["loss.name=hcl", "train.epochs=3", "optim.warmup_epochs=1"])
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["loss.name"] == "hcl" and flat["train.epochs"] == 3 and "tracking.uri" in flat
    with pytest.raises(Exception):
        cfg.loss.temperature = 1.0  # frozen


def test_help_lists_every_key():
    text = describe_keys()
    for key in flatten(Config()):
        assert key in text


MALFORMED = [
    ("loss.temprature=0.2", "loss.temprature", "did you mean loss.temperature"),
    ("loss.temperature=0", "loss.temperature", "> 0"),
    ("loss.temperature=abc", "loss.temperature", "number"),
    ("loss.tau_plus=1.0", "loss.tau_plus", "< 1"),
    ("loss.beta=-0.5", "loss.beta", ">= 0"),
    ("loss.n_synthetic=-1", "loss.n_synthetic", ">= 0"),
    ("loss.n_hard=0", "loss.n_hard", ">= 1"),
    ("loss.mode=blend", "loss.mode", "mix, copy"),
    ("loss.name=moco", "loss.name", "simclr, dcl, hcl, sscl"),
    ("model.encoder=vit", "model.encoder", "resnet18"),
    ("model.width=0", "model.width", "> 0"),
    ("model.stem=tiny", "model.stem", "cifar, imagenet"),
    ("data.source=mnist", "data.source", "digits"),
    ("data.batch_size=1", "data.batch_size", ">= 2"),
    ("data.batch_size=12.5", "data.batch_size", "integer"),
    ("optim.name=rmsprop", "optim.name", "sgd, lars, adamw"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.momentum=1", "optim.momentum", "< 1"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.amp=yes please", "train.amp", "true or false"),
    ("scaling.num_workers=0", "scaling.num_workers", ">= 1"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker", "> 0"),
    ("augment.flip_p=1.5", "augment.flip_p", "<= 1"),
    ("augment.crop_scale=[0.9, 0.1]", "augment.crop_scale", "min <= max"),
    ("augment.std=[0.2, 0.0, 0.2]", "augment.std", "> 0"),
    ("augment.mean=[0.5]", "augment.mean=[0.5]: must have 3 entries, got 1", ""),
    ("augment.crop_scale=0.5", "augment.crop_scale=0.5: must be a list of 2", ""),
    ("augment.blur_sigma=[0.1, x]", "augment.blur_sigma[1]='x'", "finite number"),
    ("augment.where=trainer", "augment.where: renamed; use placement.views=trainer", ""),
    ("augment.max_tasks=3", "augment.max_tasks: renamed; use placement.max_tasks=3", ""),
    ("data.decode=device", "data.decode: renamed; use placement.decode=device", ""),
    ("placement.views=tpu", "placement.views", "auto, ray_data, trainer"),
    ("augment.device=gpu", "augment.device='gpu': renamed; use placement.views=trainer", ""),
    ("augment.device=cpu", "augment.device='cpu': renamed; use placement.views=ray_data", ""),
    ("lossy.temperature=1", "lossy", "did you mean loss"),
    ("temperature=1", "temperature", "section.key=value"),
    ("loss.temperature", "loss.temperature", "key=value"),
]


@pytest.mark.parametrize("override,key,hint", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_names_the_key(override, key, hint):
    with pytest.raises(ConfigError) as err:
        base = [o for o in ("optim.warmup_epochs=1", "train.epochs=5") if o.split("=")[0] != override.split("=")[0]]
        load_config(None, [*base, override])
    message = str(err.value)
    assert key in message and hint in message


def test_cross_field_constraints():
    with pytest.raises(ConfigError, match="divisible by scaling.num_workers"):
        load_config(None, ["data.batch_size=10", "scaling.num_workers=3"])
    with pytest.raises(ConfigError, match="loss.n_hard=64: must be <= 2 \\* data.batch_size - 2 = 14"):
        load_config(None, ["data.batch_size=8", "loss.n_hard=64"])
    with pytest.raises(ConfigError, match="optim.warmup_epochs"):
        load_config(None, ["train.epochs=5", "optim.warmup_epochs=5"])


def test_moco_checks_the_pool_against_the_queue_and_the_queue_against_the_batch():
    moco = ["model.method=moco", "data.batch_size=8"]
    cfg = load_config(None, [*moco, "model.queue_size=256", "loss.n_hard=64"])  # > 2B - 2: the queue is the pool
    assert (cfg.model.method, cfg.model.queue_size, cfg.loss.n_hard) == ("moco", 256, 64)
    with pytest.raises(ConfigError, match=r"loss.n_hard=300: must be <= model.queue_size = 256"):
        load_config(None, [*moco, "model.queue_size=256", "loss.n_hard=300"])
    with pytest.raises(ConfigError, match=r"model.queue_size=12: must be >= 2 \* data.batch_size = 16"):
        load_config(None, [*moco, "model.queue_size=12", "loss.n_hard=4"])
    with pytest.raises(ConfigError, match="scaling.sync_batchnorm=true: not with model.method=moco"):
        load_config(None, [*moco, "scaling.sync_batchnorm=true", "loss.n_hard=4"])
    with pytest.raises(ConfigError, match=r"model.method: .*'byol'.*simclr.*moco|model.method=.*byol"):
        load_config(None, ["model.method=byol"])
    assert load_config(None, [*moco, "loss.n_hard=4", "model.bn_splits=8"]).model.bn_splits == 8
    with pytest.raises(ConfigError, match=r"model.bn_splits=5: must be <= the batch per worker = 4"):
        load_config(None, [*moco, "loss.n_hard=4", "scaling.num_workers=2", "model.bn_splits=5"])
    with pytest.raises(ConfigError, match=r"model.bn_splits=2: only with model.method=moco"):
        load_config(None, ["model.bn_splits=2"])


def test_all_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.temperature=-1", "model.encoder=vit", "train.epochs=0", "nonsense.key=1"])
    assert len(err.value.problems) == 4


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_readme_documents_every_key():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [key for key in flatten(Config()) if f"`{key}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_config_error_survives_pickling_with_its_problems():
    import pickle

    err = ConfigError(["loss.n_hard=64: must be <= 2 * data.batch_size - 2 = 38"])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


def test_views_are_made_in_the_trainer_on_gpus_unless_told_otherwise():
    from sscl.build import views_in_trainer

    def where(*overrides):
        return views_in_trainer(load_config(None, list(overrides)))

    assert not where() and where("scaling.use_gpu=true")  # auto
    assert where("placement.views=trainer") and not where("placement.views=ray_data", "scaling.use_gpu=true")


def test_step_options_reach_the_model():
    from sscl.build import compiled, for_training, model_from_config

    cfg = load_config(None, ["train.channels_last=true", "train.compile=true", "model.width=0.125"])
    model = for_training(model_from_config(cfg), cfg)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert compiled(model, cfg)._orig_mod is model  # torch.compile's wrapper around the same parameters
    plain = load_config(None, [])
    assert compiled(model, plain) is model and for_training(model, plain) is model


@pytest.mark.parametrize("typed,value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.0e300", 1e300), ("-2.5e-2", -2.5e-2),
                                         (".5e1", 5.0), ("1e3", 1000.0)])
def test_numbers_parse_as_people_type_them(tmp_path, typed, value):
    from sscl.config import parse_yaml

    assert parse_yaml(typed) == value and isinstance(parse_yaml(typed), float)
    assert load_config(None, [f"optim.weight_decay={typed}"] if 0 <= value <= 1 else []).optim  # an override
    preset = tmp_path / "p.yaml"
    preset.write_text(f"optim: {{lr: 1e-3, weight_decay: 5E-4}}\nloss: {{temperature: {typed if 0 < value <= 10 else 1}}}\n")
    cfg = load_config(preset)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-4)
    with pytest.raises(ConfigError, match=r"loss.temperature=1e\+300: must be <= 10"):
        load_config(None, ["loss.temperature=1.0e300"])


def test_text_keys_take_overrides_as_typed():
    cfg = load_config(None, ["train.run_name=2024", "tracking.experiment=yes", "train.storage_path=1:30"])
    assert (cfg.train.run_name, cfg.tracking.experiment, cfg.train.storage_path) == ("2024", "yes", "1:30")


def test_a_key_given_twice_is_an_error_naming_it(tmp_path):
    preset = tmp_path / "twice.yaml"
    preset.write_text("loss:\n  temperature: 0.1\n  beta: 1.0\n  temperature: 0.2\n")
    with pytest.raises(ConfigError, match="found the key 'temperature' twice .first on line 2"):
        load_config(preset)
    preset.write_text("loss: {temperature: 0.1}\nloss: {beta: 2.0}\n")
    with pytest.raises(ConfigError, match="found the key 'loss' twice"):
        load_config(preset)


@pytest.mark.parametrize("overrides,named", [
    (["model.method=moco", "model.momentum=1.0"], "model.momentum=1.0: must be < 1"),
    (["train.epochs=5", "optim.warmup_epochs=6"], "optim.warmup_epochs=6: must be < train.epochs=5"),
    (["train.epochs=1", "optim.warmup_epochs=10"], "optim.warmup_epochs=10: must be < train.epochs=1"),
    (["loss.n_synthetic=1000000000"], "loss.n_synthetic=1000000000: must be <= 16384"),
    (["optim.lr=0.1", "optim.final_lr=0.5"], "optim.final_lr=0.5: must be <= optim.lr=0.1"),
    (["data.image_size=32", "augment.crop_size=64"], "augment.crop_size=64: larger than the decoded images (32 px"),
    (["data.source=cifar10", "augment.crop_size=96"], "cifar10's size"),
    (["data.source=parquet", "data.root=x", "data.image_column="], "data.image_column=''"),
    (["train.seed=100000000000000000000"], "train.seed"),
])
def test_values_that_can_only_be_mistakes_are_refused(overrides, named):
    with pytest.raises(ConfigError) as err:
        given = {o.split("=")[0] for o in overrides}
        load_config(None, [*(["train.epochs=200"] if "train.epochs" not in given else []), *overrides])
    assert named in str(err.value)


def test_a_whole_run_of_warm_up_is_allowed_for_one_epoch_only():
    assert load_config(None, ["train.epochs=1", "optim.warmup_epochs=1"]).optim.warmup_epochs == 1


def test_a_loss_key_its_family_does_not_take_is_an_error_where_it_is_given(tmp_path):
    from sscl.config import apply_overrides

    with pytest.raises(ConfigError, match=r"loss.beta: loss.name=simclr does not take beta \(it takes temperature\)"):
        load_config(None, ["loss.name=simclr", "loss.beta=2"])
    # The preset's sscl keys do not bind a loss chosen on the command line; the loss's own keys are what it gets.
    hcl = load_config("pipelines/configs/quickstart.yaml", ["loss.name=hcl"])
    assert hcl.loss.kwargs() == {"temperature": 0.2, "beta": 1.0, "tau_plus": 0.1}
    with pytest.raises(ConfigError, match="loss.n_hard: loss.name=hcl does not take n_hard"):
        load_config("pipelines/configs/quickstart.yaml", ["loss.name=hcl", "loss.n_hard=4"])
    preset = tmp_path / "dcl.yaml"
    preset.write_text("loss: {name: dcl, temperature: 0.5, beta: 2.0}\n")
    with pytest.raises(ConfigError, match="loss.beta: loss.name=dcl does not take beta"):
        load_config(preset)
    with pytest.raises(ConfigError, match="loss.mode: loss.name=simclr does not take mode"):
        apply_overrides(load_config(None, ["loss.name=simclr"]), {"loss.mode": "copy"})


def test_tuple_keys_are_tuples_in_the_config_and_lists_outside():
    from sscl.config import flatten, from_dict, to_dict

    cfg = load_config("pipelines/configs/quickstart.yaml", ["augment.blur_sigma=[0.5, 1]"])
    assert cfg.augment.crop_scale == (0.4, 1.0) and cfg.augment.blur_sigma == (0.5, 1.0)
    tree = to_dict(cfg)
    assert tree["augment"]["crop_scale"] == [0.4, 1.0] and yaml.safe_load(yaml.safe_dump(tree)) == tree
    assert from_dict(tree) == cfg
    assert flatten(cfg)["augment.mean"] == [0.4914, 0.4822, 0.4465]  # recorded params keep their text
