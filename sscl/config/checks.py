"""Constraints between fields, checked once every field is valid on its own."""

from __future__ import annotations

from typing import Iterable

from sscl.config.schema import Config, DataConfig, LossConfig


def cross_check(cfg: Config, problems: list[str]) -> None:
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
    if cfg.data.eval_root and cfg.data.source not in ("imagefolder", "parquet"):
        problems.append(f"data.eval_root={cfg.data.eval_root!r}: only for the imagefolder and parquet sources "
                        f"({cfg.data.source} has its own test split)")
    if cfg.data.source in ("imagefolder", "parquet") and not cfg.data.root:
        problems.append(f"data.root='': the {cfg.data.source} source needs a path")


def check_loss_keys(loss: LossConfig, given: Iterable[str], problems: list[str]) -> None:
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
