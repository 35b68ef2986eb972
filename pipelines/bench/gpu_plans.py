"""The GPU check's plans: what each section measures and how often, at full size for one GPU (``FULL``)
and at tiny sizes that run the same code on a 2-core CPU (``QUICK``)."""

from __future__ import annotations

from dataclasses import dataclass

# The benchmark's SSCL settings (pipelines/bench/loss.py): n_hard capped by the batch, K = 8.
HYPER = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=32, n_synthetic=8, mode="mix")


@dataclass(frozen=True)
class AugmentCase:
    """Attributes: name, batch (images), input_size (px of the uint8 images), crop_size, blur_p."""

    name: str
    batch: int
    input_size: int
    crop_size: int
    blur_p: float


@dataclass(frozen=True)
class TrainCase:
    """Attributes: name, encoder, stem, width (channel multiplier), batch (images), image_size (px)."""

    name: str
    encoder: str
    stem: str
    width: float
    batch: int
    image_size: int


@dataclass(frozen=True)
class EndToEndCase:
    """Section 5's files and step. Attributes: images (JPEGs written), photo ((width, height) of each),
    image_size (decoded side), crop_size, width (ResNet-50 channel multiplier), batch, loader_workers
    (DataLoader workers reading the files), epochs (the first is not timed)."""

    images: int
    photo: tuple[int, int]
    image_size: int
    crop_size: int
    width: float
    batch: int
    loader_workers: int
    epochs: int


@dataclass(frozen=True)
class StepOptions:
    """Attributes: channels_last (model and inputs), compile (torch.compile of the model)."""

    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        return f"channels_last {'on' if self.channels_last else 'off'}, compile {'on' if self.compile else 'off'}"


# The training step's losses: the first is every ratio's denominator.
# "moco sscl": SSCL on a MoCo queue, as the moco_cifar10 preset trains on one GPU: BatchNorm in 8 parts.
TRAIN_LOSSES = ("simclr", "sscl", "moco sscl")
MOCO_BN_SPLITS = 8
PROJECTION_DIM = 128  # z of the training step's models, and of the queue's keys

# Compile only with channels_last on: each compile of ResNet-50 costs about a minute, and the
# channels_last effect is already measured without it.
OPTION_SETS = (StepOptions(False, False), StepOptions(True, False), StepOptions(True, True))


@dataclass(frozen=True)
class Plan:
    """Sizes and repeat counts of one run.

    Attributes:
        loss_batches: global batch sizes B for the loss timing.
        loss_dim: D of the projections.
        queue_sizes, queue_queries: Q and the number of queries for the queue loss timing.
        loss_warmup, loss_repeats: calls before timing, timed calls per loss (interleaved).
        augment_cases: the augmentation settings.
        augment_warmup, augment_repeats: calls before timing, timed calls.
        train_cases: the models of the training step.
        train_warmup, train_steps: steps before timing (compile happens here), timed steps.
        compile_backend: torch.compile backend, or None to skip the compiled cases.
        train_budget_s: no new training case starts after this many seconds of the section.
        e2e: the end-to-end case (section 5).
    """

    loss_batches: tuple[int, ...]
    loss_dim: int
    queue_sizes: tuple[int, ...]
    queue_queries: int
    loss_warmup: int
    loss_repeats: int
    augment_cases: tuple[AugmentCase, ...]
    augment_warmup: int
    augment_repeats: int
    train_cases: tuple[TrainCase, ...]
    train_warmup: int
    train_steps: int
    compile_backend: str | None
    train_budget_s: float
    e2e: EndToEndCase


# Sized for about six minutes on one H200, most of it the two inductor compiles.
FULL = Plan(
    loss_batches=(256, 1024, 4096),
    loss_dim=128,
    queue_sizes=(4096, 65536),
    queue_queries=512,
    loss_warmup=3,
    loss_repeats=20,
    augment_cases=(
        AugmentCase("32px b512", batch=512, input_size=32, crop_size=32, blur_p=0.0),
        AugmentCase("224px from 256px b256 blur_p 0.5", batch=256, input_size=256, crop_size=224, blur_p=0.5),
    ),
    augment_warmup=2,
    augment_repeats=10,
    train_cases=(
        TrainCase("resnet18 cifar 32px b512", "resnet18", "cifar", 1.0, batch=512, image_size=32),
        TrainCase("resnet50 imagenet 224px b256", "resnet50", "imagenet", 1.0, batch=256, image_size=224),
    ),
    train_warmup=3,  # the first call compiles; the next ones settle cuDNN and the allocator
    train_steps=15,
    compile_backend="inductor",
    train_budget_s=240.0,
    # ImageNet's typical photo, decoded at 256 and cropped to 224 as the ImageNet preset does.
    e2e=EndToEndCase(images=2048, photo=(500, 375), image_size=256, crop_size=224, width=1.0, batch=256,
                     loader_workers=8, epochs=3),
)

# The same code at sizes a 2-core CPU runs in well under a minute. Inductor would spend minutes
# compiling C++ there, so the compiled cases use the "eager" backend: Dynamo still traces the model
# inside train_one_epoch, which is the part this run can check before the GPU run.
QUICK = Plan(
    loss_batches=(16, 32, 64),
    loss_dim=128,
    queue_sizes=(256, 2048),
    queue_queries=32,
    loss_warmup=1,
    loss_repeats=3,
    augment_cases=(
        AugmentCase("16px b64", batch=64, input_size=16, crop_size=16, blur_p=0.0),
        AugmentCase("32px from 40px b32 blur_p 0.5", batch=32, input_size=40, crop_size=32, blur_p=0.5),
    ),
    augment_warmup=1,
    augment_repeats=2,
    train_cases=(
        TrainCase("resnet18 w0.125 cifar 32px b32", "resnet18", "cifar", 0.125, batch=32, image_size=32),
        TrainCase("resnet50 w0.125 imagenet 64px b16", "resnet50", "imagenet", 0.125, batch=16, image_size=64),
    ),
    train_warmup=1,
    train_steps=2,
    compile_backend="eager",
    train_budget_s=40.0,
    e2e=EndToEndCase(images=48, photo=(100, 75), image_size=64, crop_size=56, width=0.125, batch=16,
                     loader_workers=2, epochs=3),
)
