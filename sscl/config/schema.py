"""The configuration's schema: one frozen, typed dataclass per section, each field with its default,
help text and bounds. Field names equal the keyword arguments of the code that consumes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

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
