"""The GPU check's sections 4 and 5: the training step (``train_one_epoch``, bf16 autocast) of SimCLR,
SSCL and SSCL on a MoCo queue under each set of step options, and end to end, from JPEGs on disk to
bf16 ResNet-50 steps with the images decoded on the CPU or on the device."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from pipelines.bench.harness import Row, error_text, free_memory, progress, sync, timed_ms
from pipelines.bench.gpu_plans import (HYPER, MOCO_BN_SPLITS, OPTION_SETS, PROJECTION_DIM, TRAIN_LOSSES, EndToEndCase, Plan,
                                   StepOptions, TrainCase)
from sscl.data.augment import TwoViewAugment
from sscl.losses import LOSSES, get_loss
from sscl.models import build_model
from sscl.moco import MomentumQueue
from sscl.train import EpochResult, build_optimizer, train_one_epoch


def _timed_epoch(
    model: torch.nn.Module, runner: Callable[..., Any], batch: dict[str, torch.Tensor], loss_name: str,
    device: torch.device, plan: Plan, channels_last: bool,
) -> tuple[EpochResult, float]:
    """Warm-up steps, then ``plan.train_steps`` timed steps of ``train_one_epoch`` on one batch.

    ``runner`` is the model or its compiled wrapper; the optimiser is built on ``model``'s parameters
    (the same tensors). ``loss_name`` is a key of ``LOSSES``, or "moco sscl": SSCL on a queue of
    ``plan.queue_sizes[0]`` keys from a momentum copy of ``model``. Peak memory statistics are reset
    after the warm-up.

    Returns:
        The timed epoch's result and its duration in ms.
    """
    method, _, family = loss_name.rpartition(" ")
    moco = None
    if method == "moco":
        queue_size = plan.queue_sizes[0]
        moco = MomentumQueue(model, queue_size=queue_size, momentum=0.99, total_steps=1000, dim=PROJECTION_DIM,
                             seed=0)
        n_hard = min(HYPER["n_hard"], queue_size)
    else:
        n_hard = min(HYPER["n_hard"], 2 * batch["view1"].shape[0] - 2)
    hyper = {k: v for k, v in (HYPER | dict(n_hard=n_hard)).items() if k in LOSSES[family].keys}
    loss_fn = get_loss(family, method or "simclr", **hyper)
    # SGD as built for training: fused kernels when the parameters are on a GPU.
    optimizer = build_optimizer(model, "sgd", lr=0.01)
    kwargs = dict(lr_schedule=lambda step: 0.01, device=device, amp=True, channels_last=channels_last, moco=moco)
    train_one_epoch(runner, [batch] * plan.train_warmup, loss_fn, optimizer, **kwargs)  # compiles, if compiled
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return timed_ms(lambda: train_one_epoch(runner, [batch] * plan.train_steps, loss_fn, optimizer, **kwargs), device)


def _step_model(case: TrainCase, options: StepOptions, device: torch.device, plan: Plan, bn_splits: int = 1
                ) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """The case's model on ``device`` (seeded), as ``options`` lay it out, and what runs it (compiled or not)."""
    torch.manual_seed(0)
    model = build_model(case.encoder, stem=case.stem, width=case.width, out_dim=PROJECTION_DIM,
                        bn_splits=bn_splits).to(device)
    if options.channels_last:  # as train.channels_last: the model here, the views inside train_one_epoch
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model, backend=plan.compile_backend) if options.compile else model


def _train_one_option_set(
    case: TrainCase, options: StepOptions, device: torch.device, plan: Plan, start: float
) -> list[Row]:
    """The training steps of SimCLR, SSCL and SSCL on a MoCo queue for one model and one set of step options."""
    section = "training step"
    label = f"{case.name}, {options.label}"
    if options.compile and plan.compile_backend != "inductor":
        label += f" ({plan.compile_backend} backend)"
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, 3, case.image_size, case.image_size)
    batch = {name: torch.randn(shape, generator=g).to(device) for name in ("view1", "view2")}
    rows, seconds = [], {}
    compile_error = None
    model, runner = _step_model(case, options, device, plan)
    for loss_name in TRAIN_LOSSES:
        case_name = f"{loss_name} {label}"
        if compile_error is not None:  # another attempt would spend the same compile time to fail again
            rows.append(Row(section, case_name, None, "img/s", f"skipped: compile failed above ({compile_error})"))
            continue
        if loss_name.startswith("moco"):
            if options.compile:
                rows.append(Row(section, case_name, None, "img/s", "skipped: its own model would need a second "
                                "compile, beyond the check's time"))
                continue
            model, runner = _step_model(case, options, device, plan, bn_splits=MOCO_BN_SPLITS)
        progress("gpu_check", f"training step: {case_name}", start)
        try:
            result, ms = _timed_epoch(model, runner, batch, loss_name, device, plan, options.channels_last)
            seconds[loss_name] = ms / 1e3
            extra = dict(ms_per_step=ms / plan.train_steps, loss=result.loss, steps=plan.train_steps,
                         train_one_epoch_images_per_second=result.images_per_second)
            images_per_second = case.batch * plan.train_steps / seconds[loss_name]
            rows.append(Row(section, case_name, images_per_second, "img/s", "ok", extra))
            if device.type == "cuda":
                rows.append(Row(section, f"{case_name}: peak mem", torch.cuda.max_memory_allocated(device) / 2**30,
                                "GiB", "ok"))
            else:
                rows.append(Row(section, f"{case_name}: peak mem", None, "GiB", "skipped: CUDA statistics only"))
        except Exception as exc:
            # A compile failure is a finding, not a crash: record its text and keep going.
            rows.append(Row(section, case_name, None, "img/s", f"error: {error_text(exc)}"))
            traceback.print_exc(file=sys.stderr)
            if options.compile:
                compile_error = error_text(exc)[:80]
        model.zero_grad(set_to_none=True)
        free_memory(device)
    for loss_name in TRAIN_LOSSES[1:]:
        if loss_name in seconds and "simclr" in seconds:
            rows.append(Row(section, f"{loss_name}/simclr {label}", seconds[loss_name] / seconds["simclr"],
                            "step time ratio", "ok"))
    return rows


def time_training(device: torch.device, plan: Plan) -> list[Row]:
    """Section 4: images/s and peak memory of ``train_one_epoch`` (bf16 autocast) on synthetic views.

    Each model runs ``TRAIN_LOSSES`` under each of ``OPTION_SETS``; images count the batch (two
    views of ``batch`` images are ``batch`` images, as ``train_one_epoch`` counts). The compiled
    option set comes last, so that a run short of time drops it first.

    Args:
        device: the training device.
        plan: the models, step counts, compile backend and time budget.

    Returns:
        Per case: an images/s row and a peak-memory row; per model and option set, the step time
        ratios of SSCL and of SSCL on a MoCo queue to SimCLR. Cases that did not run carry "error: ..."
        or "skipped: ..." instead.
    """
    start = time.monotonic()
    rows = []
    for options in OPTION_SETS:
        for case in plan.train_cases:
            label = f"{case.name}, {options.label}"
            if options.compile and plan.compile_backend is None:
                rows.append(Row("training step", label, None, "img/s", "skipped: no compile backend in this plan"))
                continue
            if time.monotonic() - start > plan.train_budget_s:
                rows.append(Row("training step", label, None, "img/s",
                                f"skipped: the section's {plan.train_budget_s:.0f} s budget is spent"))
                continue
            try:
                rows += _train_one_option_set(case, options, device, plan, start)
            except Exception as exc:
                rows.append(Row("training step", label, None, "img/s", f"error: {error_text(exc)}"))
                traceback.print_exc(file=sys.stderr)
            if options.compile:
                torch._dynamo.reset()  # drop the compiled graphs and their guards before the next model
            free_memory(device)
    return rows


# --------------------------------------------------------------------------- 5. end to end


class _StoredFiles(torch.utils.data.Dataset):
    """The files' bytes as stored, or (``size``) decoded and resized by the pipeline's CPU decoder."""

    def __init__(self, paths: list[Path], size: int | None = None) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        data = self.paths[i].read_bytes()
        if self.size is None:
            return data, str(self.paths[i])
        from sscl.data.decode import decode_image

        return torch.from_numpy(decode_image(data, self.size, str(self.paths[i])).copy())


def _write_photos(folder: Path, case: EndToEndCase) -> list[Path]:
    """``case.images`` smooth random JPEGs (compressible like photos) of ``case.photo`` pixels."""
    from PIL import Image

    width, height = case.photo
    g = torch.Generator().manual_seed(0)
    across, down = torch.linspace(0, 1, width), torch.linspace(0, 1, height)
    paths = []
    for i in range(case.images):
        a, b, c = (torch.rand(3, generator=g) * 255, torch.rand(3, generator=g) * 256 - 128,
                   torch.rand(3, generator=g) * 256 - 128)
        img = a + b * down[:, None, None] + c * across[None, :, None] + torch.randn(height, width, 3, generator=g) * 8
        paths.append(folder / f"{i}.jpg")
        Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(paths[-1], quality=90)
    return paths


def time_end_to_end(device: torch.device, plan: Plan) -> list[Row]:
    """Section 5: JPEGs on disk to bf16 ResNet-50 steps (channels_last, SSCL), views made on the device.

    DataLoader workers read the files; the images are decoded (a) by those workers on the CPU (the
    pipeline's PIL decoder, ``placement.decode=tasks``) or (b) on the device (``sscl.data.device_decode``,
    ``placement.decode=device``). The step-only rate runs the same views and steps on images already on
    the device; each path's row gives its fraction of it. A truncated JPEG must be named by the
    device decoder as by the CPU one.

    Returns:
        The correctness row of the truncated file, then img/s of the step only and of each path.
    """
    from sscl.data.device_decode import decode_batch
    from sscl.data.decode import CorruptDataError

    case, section = plan.e2e, "end to end"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = _write_photos(Path(folder), case)
        cut = paths[0].read_bytes()
        try:
            decode_batch([cut, cut[: len(cut) // 2]], ["whole.jpg", "cut.jpg"], size=case.image_size, device=device)
            status = "FAIL: a truncated JPEG was decoded without an error"
        except CorruptDataError as err:
            status = "pass" if "cut.jpg" in str(err) else f"FAIL: the error does not name the file: {err}"
        rows.append(Row(section, "device decoding names a truncated JPEG", None, "check", status))
        augment = TwoViewAugment(crop_size=case.crop_size, blur_p=0.5, seed=0).views
        torch.manual_seed(0)
        model = build_model("resnet50", stem="imagenet", width=case.width, out_dim=PROJECTION_DIM).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, "sgd", lr=0.01)
        loss_fn = get_loss("sscl", **(HYPER | dict(n_hard=min(HYPER["n_hard"], 2 * case.batch - 2))))
        pin = device.type == "cuda"

        def on_cpu():
            loader = torch.utils.data.DataLoader(_StoredFiles(paths, case.image_size), batch_size=case.batch,
                                                 num_workers=case.loader_workers, drop_last=True, pin_memory=pin)
            return ({"image": images.to(device, non_blocking=True)} for images in loader)

        def on_device():
            loader = torch.utils.data.DataLoader(_StoredFiles(paths), batch_size=case.batch, drop_last=True,
                                                 num_workers=case.loader_workers, collate_fn=lambda b: list(zip(*b)))
            return ({"image": decode_batch(data, where, size=case.image_size, device=device)[0]}
                    for data, where in loader)

        steps = case.images // case.batch
        resident = torch.randint(0, 256, (case.batch, case.image_size, case.image_size, 3), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        step_only = "step only (images on the device)"
        runs = {step_only: lambda: [{"image": resident}] * steps,
                f"decoded by {case.loader_workers} DataLoader workers on the CPU": on_cpu,
                "bytes from the workers, decoded on the device": on_device}
        rates = {}
        for name, batches in runs.items():
            try:
                for _ in range(case.epochs):  # the last is timed: the first warms cuDNN, the allocator, the workers
                    result, ms = timed_ms(lambda: train_one_epoch(
                        model, batches(), loss_fn, optimizer, lr_schedule=lambda step: 0.01, device=device,
                        amp=True, channels_last=True, augment=augment), device)
                rates[name] = steps * case.batch / ms * 1e3
                rows.append(Row(section, f"{name}: {case.photo[0]}x{case.photo[1]} JPEG -> {case.image_size} -> 2 "
                                f"views {case.crop_size}, resnet50 w{case.width:g} b{case.batch} bf16 channels_last",
                                rates[name], "img/s", "ok", dict(ms_per_epoch=ms, loss=result.loss, steps=steps)))
            except Exception as exc:
                rows.append(Row(section, name, None, "img/s", f"error: {error_text(exc)}"))
                traceback.print_exc(file=sys.stderr)
            free_memory(device)
        for name, rate in rates.items():
            if name != step_only and step_only in rates:
                rows.append(Row(section, f"{name} / step only", rate / rates[step_only], "rate ratio", "ok"))
    return rows

