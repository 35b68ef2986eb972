"""The pretraining configuration: one frozen, typed dataclass tree, loaded from a YAML preset and
overridden by dotted ``key=value`` arguments, validated once, with every problem reported together.

Field names equal the keyword arguments of the functions that consume them (``loss.temperature``
-> ``sscl_loss(temperature=...)``, ``augment.crop_size`` -> ``TwoViewAugment(crop_size=...)``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = ["Config", "ConfigError", "apply_overrides", "describe_keys", "field_info", "flatten", "from_dict",
           "load_config", "parse_yaml", "to_dict"]


class ConfigError(ValueError):
    """Every problem found in a configuration; ``problems`` holds one message per key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # rebuilt from the problems, not the message, when it crosses processes (Ray)
        return type(self), (self.problems,)


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None, choices: Iterable[Any] | None = None) -> Any:
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


SOURCES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet")


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("digits", "dataset: " + " | ".join(SOURCES), choices=SOURCES)
    root: str = _f("data", "directory, or for imagefolder/parquet any path or URI pyarrow opens (s3://, gs://)")
    eval_root: str = _f("", "imagefolder/parquet: labelled evaluation set (e.g. ImageNet's val/); '' = hold out "
                        "data.test_fraction of data.root by a hash of each path")
    download: bool = _f(False, "download cifar10/cifar100/stl10 with torchvision when missing (needs internet)")
    image_column: str = _f("image", "parquet: column of encoded image bytes or arrays")
    label_column: str = _f("label", "parquet: label column ('' for none)")
    image_size: int = _f(32, "side images are resized to when decoded (imagefolder, parquet, digits)", ge=8,
                        le=8192)
    test_fraction: float = _f(0.2, "held-out fraction when the source has no test split and no data.eval_root",
                              gt=0, lt=1)
    skip_corrupt: bool = _f(False, "imagefolder/parquet: skip undecodable images and count them instead of failing")
    batch_size: int = _f(256, "global training batch (split over workers)", ge=2, le=2**20)
    eval_batch_size: int = _f(512, "batch for feature extraction", ge=1, le=2**20)
    prefetch_batches: int = _f(2, "batches each training worker's stream prepares ahead (into pinned memory on GPUs)",
                               ge=0, le=1024)


@dataclass(frozen=True)
class PlacementConfig:
    """Where each stage of the data path runs; what it computes does not depend on these."""

    decode: str = _f("auto", "imagefolder/parquet training images are decoded by: tasks (the Ray Data tasks, on CPUs) | "
                     "device (each training worker, on its device: Ray Data ships the encoded bytes as stored; the "
                     "views are then made there too) | auto (device for imagefolder on GPUs)",
                     choices=("auto", "tasks", "device"))
    views: str = _f("auto", "where the two views are made: ray_data (in the Ray Data tasks that decode, on CPUs) | "
                    "trainer (inside the training loop, on the training device) | auto (trainer when scaling.use_gpu "
                    "or when decoding on the device)", choices=("auto", "ray_data", "trainer"))
    max_tasks: int = _f(0, "placement.views=ray_data: Ray Data tasks decoding and augmenting at once (0 = as many as "
                        "free CPUs allow)", ge=0, le=100_000)


@dataclass(frozen=True)
class AugmentConfig:
    """``TwoViewAugment``'s keywords, field for field."""

    crop_size: int = _f(32, "output side of the random resized crop", ge=8, le=8192)
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "[min, max] area fraction of the crop")
    flip_p: float = _f(0.5, "horizontal flip probability", ge=0, le=1)
    jitter_p: float = _f(0.8, "colour jitter probability", ge=0, le=1)
    brightness: float = _f(0.4, "brightness jitter strength", ge=0, le=1)
    contrast: float = _f(0.4, "contrast jitter strength", ge=0, le=1)
    saturation: float = _f(0.4, "saturation jitter strength", ge=0, le=1)
    hue: float = _f(0.1, "hue jitter strength", ge=0, le=0.5)
    grayscale_p: float = _f(0.2, "grayscale probability", ge=0, le=1)
    blur_p: float = _f(0.0, "Gaussian blur probability (STL-10 recipe: 0.5)", ge=0, le=1)
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "[min, max] blur sigma in pixels")
    mean: tuple[float, float, float] = _f((0.4914, 0.4822, 0.4465), "per-channel normalisation mean")
    std: tuple[float, float, float] = _f((0.2023, 0.1994, 0.2010), "per-channel normalisation std")


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = _f("resnet18", "backbone: resnet18 | resnet34 | resnet50", choices=("resnet18", "resnet34", "resnet50"))
    stem: str = _f("cifar", "cifar (3x3 stride 1, no max-pool) | imagenet", choices=("cifar", "imagenet"))
    width: float = _f(1.0, "channel width multiplier (0.25 for quick CPU runs)", gt=0, le=4)
    hidden_dim: int = _f(512, "projection head hidden size", ge=1, le=65536)
    out_dim: int = _f(128, "projection size", ge=1, le=65536)
    head_batchnorm: bool = _f(False, "BatchNorm in the projection head")
    method: str = _f("simclr", "simclr (two views, in-batch negatives) | moco (momentum encoder, queue of keys)",
                     choices=("simclr", "moco"))
    momentum: float = _f(0.99, "moco: EMA momentum of the key encoder at the start, rising to 1 on a cosine (< 1: "
                         "at 1 the key encoder never learns)", ge=0, lt=1)
    queue_size: int = _f(4096, "moco: keys in the queue (the real negatives), >= 2 * data.batch_size", ge=1,
                         le=10_000_000)
    queue_warmup_epochs: int = _f(0, "moco: epochs trained without synthetic negatives while the queue fills", ge=0,
                                  le=100_000)
    bn_splits: int = _f(1, "moco: BatchNorm statistics per this many parts of each worker's batch (MoCo's "
                           "SplitBatchNorm: 8 on one GPU)", ge=1, le=1024)


@dataclass(frozen=True)
class LossConfig:
    name: str = _f("sscl", "simclr | dcl | hcl | sscl", choices=("simclr", "dcl", "hcl", "sscl"))
    temperature: float = _f(0.5, "softmax temperature t", gt=0, le=10)
    beta: float = _f(1.0, "hardness concentration (hcl, sscl)", ge=0, le=50)
    tau_plus: float = _f(0.1, "class prior for debiasing (dcl, hcl, sscl)", ge=0, lt=1)
    n_hard: int = _f(32, "hard pool per anchor (sscl), <= 2B - 2 (moco: <= model.queue_size)", ge=1, le=10_000_000)
    n_synthetic: int = _f(8, "synthetic negatives per anchor K (sscl); each anchor's K similarities (and their "
                          "parents' indices) are held at once", ge=0, le=16384)
    mode: str = _f("mix", "mix (the paper) | copy (the released code)", choices=("mix", "copy"))

    def kwargs(self) -> dict[str, Any]:
        """The keywords ``name``'s loss function takes, as the registry lists them (``sscl.losses.LOSSES``)."""
        from sscl.losses import LOSSES  # the registry is the one place that knows each family's keys

        return {key: getattr(self, key) for key in LOSSES[self.name].keys}


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("sgd", "sgd | lars | adamw", choices=("sgd", "lars", "adamw"))
    lr: float = _f(0.1, "base learning rate", gt=0, le=100)
    momentum: float = _f(0.9, "momentum (AdamW: beta1)", ge=0, lt=1)
    weight_decay: float = _f(1e-4, "weight decay (not on biases and norms)", ge=0, le=1)
    warmup_epochs: int = _f(10, "linear warm-up epochs before the cosine (< train.epochs)", ge=0, le=100_000)
    final_lr: float = _f(0.0, "learning rate at the end of the cosine (<= optim.lr)", ge=0, le=100)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(200, "training epochs", ge=1, le=100_000)
    checkpoint_every: int = _f(1, "report a checkpoint every N epochs (and always at the end)", ge=1, le=100_000)
    run_name: str = _f("sscl", "Ray Train run name: rerunning with the same name resumes")
    storage_path: str = _f("", "checkpoint storage (shared on multi-node: NFS, s3://); '' = ~/ray_results")
    seed: int = _f(0, "random seed", ge=0, le=2**53)
    amp: bool = _f(True, "bf16 autocast on GPU")
    channels_last: bool = _f(False, "NHWC memory layout for the convolutions (on an H200: 2.4x the images/s of "
                                    "ResNet-18, 1.9x ResNet-50)")
    compile: bool = _f(False, "torch.compile the model (the first steps wait for compilation; on an H200 a "
                              "further 1.3-1.4x over channels_last)")
    max_failures: int = _f(2, "worker failures restarted from the latest checkpoint (data errors are not retried)",
                           ge=0, le=1000)
    knn_every: int = _f(1, "run the kNN monitor every N epochs (and always after the last)", ge=1, le=100_000)
    knn_max_images: int = _f(0, "kNN bank and linear-probe training set: at most this many labelled images (0 = all)",
                             ge=0, le=2**40)
    knn_k: int = _f(200, "kNN neighbours (< the images in the kNN bank)", ge=1, le=100_000)
    knn_temperature: float = _f(0.1, "kNN vote temperature", gt=0, le=100)
    linear_epochs: int = _f(100, "linear probe: L-BFGS iterations (full-batch passes) at each evaluation", ge=1,
                            le=100_000)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = _f(1, "Ray Train workers", ge=1, le=100_000)
    use_gpu: bool = _f(False, "one GPU per worker, NCCL")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker (fractions allowed)", gt=0, le=4096)
    sync_batchnorm: bool = _f(False, "convert BatchNorm to SyncBatchNorm across workers")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = _f("", "MLflow tracking URI (env MLFLOW_TRACKING_URI wins; '' = sqlite:///mlflow.db)")
    experiment: str = _f("sscl", "MLflow experiment")
    model_name: str = _f("sscl-encoder", "registered model name")
    register: bool = _f(True, "register the encoder and move the champion alias")


@dataclass(frozen=True)
class TuneConfig:
    name: str = _f("sweep", "sweep name: rerunning with the same name continues that sweep")
    num_samples: int = _f(4, "trials drawn from the space (grid spaces: repeats of the whole grid)", ge=1,
                         le=100_000)
    max_concurrent_trials: int = _f(0, "trials at once; 0 = as many as the cluster's CPUs/GPUs hold", ge=0,
                                    le=100_000)
    search: str = _f("auto", "random (random + grid) | optuna (needs the optuna extra) | auto (optuna if "
                     "installed and the space has no grid, else random)", choices=("auto", "random", "optuna"))
    metric: str = _f("knn_top1", "per-epoch metric the sweep optimises (knn_top1: max, loss: min)",
                     choices=("knn_top1", "loss"))
    scheduler: str = _f("asha", "asha (early stopping) | fifo (every trial runs all epochs)", choices=("asha", "fifo"))
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it can be stopped", ge=1, le=100_000)
    reduction_factor: float = _f(2.0, "ASHA: keep the top 1/reduction_factor of trials at each rung", gt=1, le=1000)
    max_failures: int = _f(1, "retries of a failed trial (resumed from its checkpoint) before it is reported failed",
                           ge=0, le=1000)
    driver_cpus: float = _f(0.25, "CPUs reserved for each trial's driver (its Train workers reserve their own)", gt=0,
                            le=4096)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ---------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping in a YAML text gives one key twice."""


class _Loader(yaml.SafeLoader):
    """YAML as people type numbers: ``1e-3``, ``5E-4`` and ``1.0e300`` are floats (YAML 1.2's rule;
    PyYAML's YAML 1.1 reads them as strings), and a key given twice in one mapping is an error, not a
    silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise DuplicateKeyError(None, None, f"found the key {key!r} twice (first {seen[key]}, again on line "
                                        f"{key_node.start_mark.line + 1}); give each key once", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = f"on line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


# Copied per first character: PyYAML's add_implicit_resolver would append to SafeLoader's own lists.
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML with :class:`_Loader`'s rules (numbers as typed, no duplicate keys).

    Raises:
        yaml.YAMLError: for text that is not YAML, or a mapping with a key given twice.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _sections() -> dict[str, type]:
    return typing.get_type_hints(Config)  # section name -> its dataclass


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        problems.append(f"{key}: overrides are section.key=value (e.g. loss.temperature=0.2)")
        return
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        problems.append(f"{parts[0]}: must be a mapping of keys, got {section!r}")
        return
    section[parts[1]] = value


def _parse_override(text: str, problems: list[str]) -> tuple[str, Any] | None:
    """``key=value`` -> (key, value); the value is YAML, except for a text key, which takes it as typed
    (``train.run_name=2024`` or ``=1:30`` is that text, not a number)."""
    if "=" not in text:
        problems.append(f"{text}: overrides are key=value (e.g. loss.temperature=0.2)")
        return None
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        hint = field_info(key)[0]
    except KeyError:
        hint = None  # reported when the tree is built
    if hint is str:
        return key, raw
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_type(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Returns the value coerced to the field's type, or records a problem and returns None."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}={value!r}: must be true or false")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}={value!r}: must be an integer")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        problems.append(f"{key}={value!r}: must be a finite number")
    elif hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        problems.append(f"{key}={value!r}: must be a string" + (f" (quote it: '{value}')" if isinstance(
            value, (int, float)) else ""))
    elif origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}={value!r}: must be a list of {len(items)}")
        elif len(value) != len(items):
            problems.append(f"{key}={list(value)!r}: must have {len(items)} entries, got {len(value)}")
        else:
            checked = tuple(_check_type(f"{key}[{i}]", v, t, problems) for i, (v, t) in enumerate(zip(value, items)))
            return None if any(v is None for v in checked) else checked
    else:  # pragma: no cover - every field uses one of the types above
        raise TypeError(f"unsupported config type {hint} for {key}")
    return None


def _check_range(key: str, value: Any, meta: Mapping[str, Any], problems: list[str]) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        problems.append(f"{key}={value!r}: must be one of {', '.join(map(str, meta['choices']))}")
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, symbol, ok in bounds:
        bound = meta.get(name)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            problems.append(f"{key}={value!r}: must be {symbol} {bound}")
            return


# Keys that changed name: old key -> (new key, old value -> new value; None: the same values).
RENAMED: dict[str, tuple[str, dict[str, str] | None]] = {
    "augment.device": ("placement.views", {"cpu": "ray_data", "gpu": "trainer"}),
    "augment.where": ("placement.views", None),
    "augment.max_tasks": ("placement.max_tasks", None),
    "data.decode": ("placement.decode", None),
}


def _unknown(kind: str, prefix: str, key: str, valid: Iterable[str]) -> str:
    """``loss.temprature: unknown key; did you mean loss.temperature?`` (or the valid names)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid {kind}s: {', '.join(valid)}"
    return f"{prefix}{key}: unknown {kind}{hint}"


def _renamed(old: str, value: Any) -> str:
    new_key, values_map = RENAMED[old]
    if values_map is None:
        return f"{old}: renamed; use {new_key}={value}"
    if str(value) in values_map:
        return f"{old}={value!r}: renamed; use {new_key}={values_map[str(value)]}"
    return f"{old}: renamed to {new_key} ({'; '.join(f'{a} -> {b}' for a, b in values_map.items())})"


def _build_section(name: str, cls: type, values: Mapping[str, Any], problems: list[str]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"{name}.{key!r}: keys must be names (e.g. {name}.{next(iter(fields))}), got {key!r}")
            continue
        if f"{name}.{key}" in RENAMED:
            problems.append(_renamed(f"{name}.{key}", value))
            continue
        if key not in fields:
            problems.append(_unknown("key", f"{name}.", key, fields))
            continue
        coerced = _check_type(f"{name}.{key}", value, hints[key], problems)
        if coerced is not None:
            _check_range(f"{name}.{key}", coerced, fields[key].metadata, problems)
            kwargs[key] = coerced
    return cls(**kwargs)


def _cross_checks(cfg: Config, problems: list[str]) -> None:
    """Constraints between fields, checked after each field is valid on its own."""
    pairs = [("augment.crop_scale", cfg.augment.crop_scale, (0, 1)), ("augment.blur_sigma", cfg.augment.blur_sigma, (0, None))]
    for key, value, (lo, hi) in pairs:
        if not (lo < value[0] <= value[1]) or (hi is not None and value[1] > hi):
            upper = f" <= {hi}" if hi is not None else ""
            problems.append(f"{key}={value!r}: must be [min, max] with {lo} < min <= max{upper}")
    if any(s <= 0 for s in cfg.augment.std):
        problems.append(f"augment.std={cfg.augment.std!r}: every entry must be > 0")
    per_worker = cfg.data.batch_size // cfg.scaling.num_workers
    if cfg.data.batch_size % cfg.scaling.num_workers:
        problems.append(f"data.batch_size={cfg.data.batch_size}: must be divisible by scaling.num_workers="
                        f"{cfg.scaling.num_workers}")
    elif per_worker < 1:
        problems.append(f"data.batch_size={cfg.data.batch_size}: must be >= scaling.num_workers")
    if cfg.model.method == "moco":
        if cfg.model.queue_size < 2 * cfg.data.batch_size:
            problems.append(f"model.queue_size={cfg.model.queue_size}: must be >= 2 * data.batch_size = "
                            f"{2 * cfg.data.batch_size} (each step enqueues both views' keys)")
        elif cfg.loss.name == "sscl" and cfg.loss.n_hard > cfg.model.queue_size:
            problems.append(f"loss.n_hard={cfg.loss.n_hard}: must be <= model.queue_size = {cfg.model.queue_size}")
        if cfg.scaling.sync_batchnorm:
            problems.append("scaling.sync_batchnorm=true: not with model.method=moco, whose shuffled BatchNorm needs "
                            "each worker's own statistics (synchronised, the keys would see their queries' batch)")
        if per_worker >= 1 and cfg.model.bn_splits > per_worker:
            problems.append(f"model.bn_splits={cfg.model.bn_splits}: must be <= the batch per worker = {per_worker} "
                            "(data.batch_size / scaling.num_workers)")
    elif cfg.loss.name == "sscl" and cfg.loss.n_hard > 2 * cfg.data.batch_size - 2:
        problems.append(f"loss.n_hard={cfg.loss.n_hard}: must be <= 2 * data.batch_size - 2 = {2 * cfg.data.batch_size - 2}")
    if cfg.model.method != "moco" and cfg.model.bn_splits > 1:
        problems.append(f"model.bn_splits={cfg.model.bn_splits}: only with model.method=moco (two-view training "
                        "needs no split BatchNorm)")
    if cfg.optim.warmup_epochs > cfg.train.epochs or (cfg.optim.warmup_epochs == cfg.train.epochs > 1):
        problems.append(f"optim.warmup_epochs={cfg.optim.warmup_epochs}: must be < train.epochs={cfg.train.epochs} "
                        "(the learning rate would never reach optim.lr)")
    if cfg.optim.final_lr > cfg.optim.lr:
        problems.append(f"optim.final_lr={cfg.optim.final_lr:g}: must be <= optim.lr={cfg.optim.lr:g} (the cosine "
                        "decays from optim.lr to optim.final_lr)")
    decoded, size_key = decoded_size(cfg.data)
    if cfg.augment.crop_size > decoded:
        problems.append(f"augment.crop_size={cfg.augment.crop_size}: larger than the decoded images ({decoded} px, "
                        f"{size_key}); crops would only be upsampled: lower it or raise data.image_size")
    if cfg.placement.decode == "device" and cfg.data.source not in ("imagefolder", "parquet"):
        problems.append(f"placement.decode=device: {cfg.data.source} images are not stored encoded (only imagefolder "
                        "and parquet are); use placement.decode=tasks or auto")
    if cfg.placement.decode == "device" and cfg.placement.views == "ray_data":
        problems.append("placement.views=ray_data: with placement.decode=device the images exist only on the training "
                        "device, where the views must be made too: use placement.views=trainer or auto")
    if cfg.data.source == "parquet" and not cfg.data.image_column.strip():
        problems.append("data.image_column='': the parquet source needs the column of encoded images")
    name = cfg.train.run_name
    if not name.strip() or "/" in name or "\\" in name or name in (".", "..") or len(name) > 200 or \
            any(ord(c) < 32 for c in name):
        problems.append(f"train.run_name={name!r}: it names the checkpoint folder: give 1-200 characters without "
                        "'/', '\\' or control characters")
    for key, value in (("train.run_name", name), ("tracking.model_name", cfg.tracking.model_name)):
        if "'" in value and '"' in value:
            problems.append(f"{key}={value!r}: may hold ' or \" but not both (MLflow's search syntax cannot quote it)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cfg.tune.name):
        problems.append(f"tune.name={cfg.tune.name!r}: use letters, digits, '-' and '_' (it names folders and a "
                        "registry alias)")
    if cfg.tune.grace_period > cfg.train.epochs:
        problems.append(f"tune.grace_period={cfg.tune.grace_period}: must be <= train.epochs={cfg.train.epochs}")
    if cfg.data.eval_root and cfg.data.source not in ("imagefolder", "parquet"):
        problems.append(f"data.eval_root={cfg.data.eval_root!r}: only for the imagefolder and parquet sources "
                        f"({cfg.data.source} has its own test split)")
    if cfg.data.source in ("imagefolder", "parquet") and not cfg.data.root:
        problems.append(f"data.root='': the {cfg.data.source} source needs a path")


def _check_loss_keys(loss: LossConfig, given: Iterable[str], problems: list[str]) -> None:
    takes = loss.kwargs()
    for key in dict.fromkeys(given):
        section, _, name = key.partition(".")
        if section == "loss" and name != "name" and name not in takes:
            problems.append(f"{key}: loss.name={loss.name} does not take {name} (it takes "
                            f"{', '.join(takes)}); drop the key or choose a loss that uses it")


_FIXED_SIZES = {"cifar10": 32, "cifar100": 32, "stl10": 96}


def decoded_size(data: DataConfig) -> tuple[int, str]:
    """The side of the images a source decodes, and what sets it (the source, or ``data.image_size``)."""
    if data.source in _FIXED_SIZES:
        return _FIXED_SIZES[data.source], f"{data.source}'s size"
    return data.image_size, "data.image_size"


def read_yaml_file(path: Path, what: str, hint: str = "") -> Any:
    """The YAML content of ``path``.

    Raises:
        FileNotFoundError: naming the missing file (and ``hint``).
        ConfigError: when ``path`` is a folder, not text, or not YAML.
    """
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    if not path.is_file():
        raise ConfigError([f"{what} {path} is a {'folder' if path.is_dir() else 'special file'}; give a YAML file{hint}"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{what} {path} is not a text file (not UTF-8); give a YAML file"]) from None
    try:
        return parse_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError([f"{path}: {err.problem}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML ({err})"]) from None


def _presets_hint(path: Path) -> str:
    """`` (presets in ...: ...)``, with a close match first, for a config path that is not a file."""
    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
    folder = path.parent if path.parent.is_dir() and any(path.parent.glob("*.yaml")) else shipped
    names = sorted(p.name for p in folder.glob("*.yaml"))
    if not names:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return (f"; did you mean {folder / close[0]}?" if close else "") + f" (presets in {folder}: {', '.join(names)})"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Loads a YAML preset (or the defaults), applies ``section.key=value`` overrides, validates.

    Args:
        path: YAML file with sections as top-level keys; None for the defaults.
        overrides: e.g. ``["loss.temperature=0.2", "scaling.num_workers=2"]``; values are YAML.

    Returns:
        The frozen ``Config``.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
        FileNotFoundError: if ``path`` does not exist.
    """
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml_file(path, "config file", hint=_presets_hint(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: must be a mapping of sections, got {type(loaded).__name__}"])
        tree = {k: dict(v) if isinstance(v, dict) else v for k, v in loaded.items()}
    preset = tree.get("loss")
    preset_keys = [f"loss.{k}" for k in preset if isinstance(k, str)] if isinstance(preset, dict) else []
    override_keys = []
    for text in overrides:  # in order: a later override of a key wins, as a wrapper script's own arguments should
        parsed = _parse_override(text, problems)
        if parsed:
            _set_dotted(tree, *parsed, problems)
            override_keys.append(parsed[0])
    # Keys the chosen loss must take: the command line's, and the preset's unless the command line picks the loss.
    given = override_keys if "loss.name" in override_keys else [*preset_keys, *override_keys]
    return _from_tree(tree, problems, given)


def _from_tree(tree: Mapping[str, Any], problems: list[str], given: Iterable[str] = ()) -> Config:
    """Builds and validates a ``Config`` from nested dicts; raises ``ConfigError`` with every problem.
    ``given``: the dotted keys set explicitly, of which the loss's must be keys its family takes."""
    sections = _sections()
    built = {}
    for name, values in tree.items():
        if not isinstance(name, str):
            problems.append(f"{name!r}: section names must be names, one of {', '.join(sections)}")
        elif name not in sections:
            problems.append(_unknown("section", "", name, sections))
        elif not isinstance(values, dict):
            problems.append(f"{name}: must be a mapping of keys, got {values!r}")
        else:
            built[name] = _build_section(name, sections[name], values, problems)
    cfg = Config(**built)
    if not problems:
        _cross_checks(cfg, problems)
        _check_loss_keys(cfg.loss, given, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def apply_overrides(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced (``{"loss.temperature": 0.2}``), validated like ``load_config``.

    Integral floats (a ``quniform`` draw) become ints where the field is an integer.

    Raises:
        ConfigError: listing every unknown key, wrong type, out-of-range value and broken constraint.
    """
    problems: list[str] = []
    tree = to_dict(cfg)
    for key, value in values.items():
        section, _, name = key.partition(".")
        hint = _hints(_sections()[section]).get(name) if section in _sections() else None
        if hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        _set_dotted(tree, key, value, problems)
    return _from_tree(tree, problems, given=values)


def field_info(key: str) -> tuple[Any, Mapping[str, Any]]:
    """The type hint and metadata (help, bounds, choices) of a dotted key.

    Raises:
        KeyError: with a did-you-mean message when the key is not in the schema.
    """
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections:
        raise KeyError(_unknown("section", "", section, sections))
    fields = {f.name: f for f in dataclasses.fields(sections[section])}
    if name not in fields:
        raise KeyError(_unknown("key", f"{section}.", name, fields))
    return _hints(sections[section])[name], fields[name].metadata


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts and lists (for YAML, Ray and MLflow)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in items})


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Rebuilds a ``Config`` from ``to_dict`` output (e.g. inside a Ray worker).

    Raises:
        ConfigError: when the tree is not a valid config (e.g. written by another version).
    """
    return _from_tree(dict(tree), [])


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"loss.temperature": 0.5, ...}`` (MLflow params)."""
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def describe_keys() -> str:
    """One line per key: dotted name, default and help (for ``--help``)."""
    lines = []
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)



# ---------------------------------------------------------------------------- resuming

# Keys a rerun under the same ``train.run_name`` may change: how the run is executed, logged and how
# long it goes on, not what it computes. ``train.epochs`` may only grow (the cosine is stretched from
# the resumed step on). Every other key must keep its recorded value.
RESUMABLE_KEYS = ("train.epochs", "train.max_failures", "train.checkpoint_every", "train.knn_every",
                  "data.prefetch_batches", "data.eval_batch_size", "placement.decode", "placement.views",
                  "placement.max_tasks",
                  "scaling.cpus_per_worker",
                  "tracking.uri", "tracking.register", "tracking.model_name")


def resume_changes(recorded: Mapping[str, str], cfg: Config, *, trained_epochs: int = 0
                   ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """How ``cfg`` differs from a run's ``recorded`` values (MLflow params: text), split into the
    changes a resume may make and those it may not.

    Args:
        recorded: the values the run was started (or last resumed) with, by dotted key; keys it lacks
            (added since) are not compared.
        trained_epochs: epochs the run has trained; fewer ``train.epochs`` is refused. With none trained
            (a run that failed before its first epoch), every change is allowed.

    Returns:
        ``(allowed, refused)``: key -> (recorded, new) as text.
    """
    from sscl.tracking import redact_uri

    allowed, refused = {}, {}
    for key, value in flatten(cfg).items():
        if key.startswith("tune.") or key not in recorded:
            continue
        new = redact_uri(str(value)) if key == "tracking.uri" else str(value)
        if new == recorded[key]:
            continue
        shrinks = key == "train.epochs" and int(value) < max(trained_epochs, 1)
        free = trained_epochs == 0  # nothing trained with the recorded values yet: a change is a correction
        (allowed if free or (key in RESUMABLE_KEYS and not shrinks) else refused)[key] = (recorded[key], new)
    return allowed, refused
