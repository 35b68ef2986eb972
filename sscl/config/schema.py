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


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: Iterable[Any] | None = None) -> Any:
    """A config field: its default, help text and bounds (checked by ``sscl.config.loading``)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


SOURCES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet")


@dataclass(frozen=True)
class DataConfig:
    source: str = setting("digits", "dataset: " + " | ".join(SOURCES), choices=SOURCES)
    root: str = setting("data", "directory, or for imagefolder/parquet any path or URI pyarrow opens (s3://, gs://)")
    eval_root: str = setting("", "imagefolder/parquet: labelled evaluation set (e.g. ImageNet's val/); '' = hold out "
                        "data.test_fraction of data.root by a hash of each path")
    download: bool = setting(False, "download cifar10/cifar100/stl10 with torchvision when missing (needs internet)")
    image_column: str = setting("image", "parquet: column of encoded image bytes or arrays")
    label_column: str = setting("label", "parquet: label column ('' for none)")
    image_size: int = setting(32, "side images are resized to when decoded (imagefolder, parquet, digits)", ge=8,
                        le=8192)
    test_fraction: float = setting(0.2, "held-out fraction when the source has no test split and no data.eval_root",
                              gt=0, lt=1)
    skip_corrupt: bool = setting(False, "imagefolder/parquet: skip undecodable images and count them instead of failing")
    batch_size: int = setting(256, "global training batch (split over workers)", ge=2, le=2**20)
    eval_batch_size: int = setting(512, "batch for feature extraction", ge=1, le=2**20)
    prefetch_batches: int = setting(2, "batches each training worker's stream prepares ahead (into pinned memory on GPUs)",
                               ge=0, le=1024)


@dataclass(frozen=True)
class PlacementConfig:
    """Where each stage of the data path runs; what it computes does not depend on these."""

    decode: str = setting("auto", "imagefolder/parquet training images are decoded by: tasks (the Ray Data tasks, on CPUs) | "
                     "device (each training worker, on its device: Ray Data ships the encoded bytes as stored; the "
                     "views are then made there too) | auto (device for imagefolder on GPUs)",
                     choices=("auto", "tasks", "device"))
    views: str = setting("auto", "where the two views are made: ray_data (in the Ray Data tasks that decode, on CPUs) | "
                    "trainer (inside the training loop, on the training device) | auto (trainer when scaling.use_gpu "
                    "or when decoding on the device)", choices=("auto", "ray_data", "trainer"))
    max_tasks: int = setting(0, "placement.views=ray_data: Ray Data tasks decoding and augmenting at once (0 = as many as "
                        "free CPUs allow)", ge=0, le=100_000)


@dataclass(frozen=True)
class AugmentConfig:
    """``TwoViewAugment``'s keywords, field for field."""

    crop_size: int = setting(32, "output side of the random resized crop", ge=8, le=8192)
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "[min, max] area fraction of the crop")
    flip_p: float = setting(0.5, "horizontal flip probability", ge=0, le=1)
    jitter_p: float = setting(0.8, "colour jitter probability", ge=0, le=1)
    brightness: float = setting(0.4, "brightness jitter strength", ge=0, le=1)
    contrast: float = setting(0.4, "contrast jitter strength", ge=0, le=1)
    saturation: float = setting(0.4, "saturation jitter strength", ge=0, le=1)
    hue: float = setting(0.1, "hue jitter strength", ge=0, le=0.5)
    grayscale_p: float = setting(0.2, "grayscale probability", ge=0, le=1)
    blur_p: float = setting(0.0, "Gaussian blur probability (STL-10 recipe: 0.5)", ge=0, le=1)
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), "[min, max] blur sigma in pixels")
    mean: tuple[float, float, float] = setting((0.4914, 0.4822, 0.4465), "per-channel normalisation mean")
    std: tuple[float, float, float] = setting((0.2023, 0.1994, 0.2010), "per-channel normalisation std")


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = setting("resnet18", "backbone: resnet18 | resnet34 | resnet50", choices=("resnet18", "resnet34", "resnet50"))
    stem: str = setting("cifar", "cifar (3x3 stride 1, no max-pool) | imagenet", choices=("cifar", "imagenet"))
    width: float = setting(1.0, "channel width multiplier (0.25 for quick CPU runs)", gt=0, le=4)
    hidden_dim: int = setting(512, "projection head hidden size", ge=1, le=65536)
    out_dim: int = setting(128, "projection size", ge=1, le=65536)
    head_batchnorm: bool = setting(False, "BatchNorm in the projection head")
    method: str = setting("simclr", "simclr (two views, in-batch negatives) | moco (momentum encoder, queue of keys)",
                     choices=("simclr", "moco"))
    momentum: float = setting(0.99, "moco: EMA momentum of the key encoder at the start, rising to 1 on a cosine (< 1: "
                         "at 1 the key encoder never learns)", ge=0, lt=1)
    queue_size: int = setting(4096, "moco: keys in the queue (the real negatives), >= 2 * data.batch_size", ge=1,
                         le=10_000_000)
    queue_warmup_epochs: int = setting(0, "moco: epochs trained without synthetic negatives while the queue fills", ge=0,
                                  le=100_000)
    bn_splits: int = setting(1, "moco: BatchNorm statistics per this many parts of each worker's batch (MoCo's "
                           "SplitBatchNorm: 8 on one GPU)", ge=1, le=1024)


@dataclass(frozen=True)
class LossConfig:
    name: str = setting("sscl", "simclr | dcl | hcl | sscl", choices=("simclr", "dcl", "hcl", "sscl"))
    temperature: float = setting(0.5, "softmax temperature t", gt=0, le=10)
    beta: float = setting(1.0, "hardness concentration (hcl, sscl)", ge=0, le=50)
    tau_plus: float = setting(0.1, "class prior for debiasing (dcl, hcl, sscl)", ge=0, lt=1)
    n_hard: int = setting(32, "hard pool per anchor (sscl), <= 2B - 2 (moco: <= model.queue_size)", ge=1, le=10_000_000)
    n_synthetic: int = setting(8, "synthetic negatives per anchor K (sscl); each anchor's K similarities (and their "
                          "parents' indices) are held at once", ge=0, le=16384)
    mode: str = setting("mix", "mix (the paper) | copy (the released code)", choices=("mix", "copy"))

    def kwargs(self) -> dict[str, Any]:
        """The keywords ``name``'s loss function takes, as the registry lists them (``sscl.losses.LOSSES``)."""
        from sscl.losses import LOSSES  # the registry is the one place that knows each family's keys

        return {key: getattr(self, key) for key in LOSSES[self.name].keys}


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("sgd", "sgd | lars | adamw", choices=("sgd", "lars", "adamw"))
    lr: float = setting(0.1, "base learning rate", gt=0, le=100)
    momentum: float = setting(0.9, "momentum (AdamW: beta1)", ge=0, lt=1)
    weight_decay: float = setting(1e-4, "weight decay (not on biases and norms)", ge=0, le=1)
    warmup_epochs: int = setting(10, "linear warm-up epochs before the cosine (< train.epochs)", ge=0, le=100_000)
    final_lr: float = setting(0.0, "learning rate at the end of the cosine (<= optim.lr)", ge=0, le=100)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(200, "training epochs", ge=1, le=100_000)
    checkpoint_every: int = setting(1, "report a checkpoint every N epochs (and always at the end)", ge=1, le=100_000)
    run_name: str = setting("sscl", "Ray Train run name: rerunning with the same name resumes")
    storage_path: str = setting("", "checkpoint storage (shared on multi-node: NFS, s3://); '' = ~/ray_results")
    seed: int = setting(0, "random seed", ge=0, le=2**53)
    amp: bool = setting(True, "bf16 autocast on GPU")
    channels_last: bool = setting(False, "NHWC memory layout for the convolutions (on an H200: 2.4x the images/s of "
                                    "ResNet-18, 1.9x ResNet-50)")
    compile: bool = setting(False, "torch.compile the model (the first steps wait for compilation; on an H200 a "
                              "further 1.3-1.4x over channels_last)")
    max_failures: int = setting(2, "worker failures restarted from the latest checkpoint (data errors are not retried)",
                           ge=0, le=1000)
    knn_every: int = setting(1, "run the kNN monitor every N epochs (and always after the last)", ge=1, le=100_000)
    knn_max_images: int = setting(0, "kNN bank and linear-probe training set: at most this many labelled images (0 = all)",
                             ge=0, le=2**40)
    knn_k: int = setting(200, "kNN neighbours (< the images in the kNN bank)", ge=1, le=100_000)
    knn_temperature: float = setting(0.1, "kNN vote temperature", gt=0, le=100)
    linear_epochs: int = setting(100, "linear probe: L-BFGS iterations (full-batch passes) at each evaluation", ge=1,
                            le=100_000)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = setting(1, "Ray Train workers", ge=1, le=100_000)
    use_gpu: bool = setting(False, "one GPU per worker, NCCL")
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker (fractions allowed)", gt=0, le=4096)
    sync_batchnorm: bool = setting(False, "convert BatchNorm to SyncBatchNorm across workers")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = setting("", "MLflow tracking URI (env MLFLOW_TRACKING_URI wins; '' = sqlite:///mlflow.db)")
    experiment: str = setting("sscl", "MLflow experiment")
    model_name: str = setting("sscl-encoder", "registered model name")
    register: bool = setting(True, "register the encoder and move the champion alias")


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
