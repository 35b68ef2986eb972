"""Optimisers, schedule and the plain (Ray-free) training step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sscl.data.augment import TwoViewAugment
from sscl.losses import get_loss
from sscl.models import build_model
from sscl.train import LARS, build_optimizer, lr_at, train_one_epoch

HYPER = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=8, n_synthetic=4, mode="mix")


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    kw = dict(base_lr=0.4, warmup_steps=10, total_steps=110, final_lr=0.0)
    assert lr_at(0, **kw) == pytest.approx(0.04)
    assert lr_at(9, **kw) == pytest.approx(0.4)
    assert lr_at(60, **kw) == pytest.approx(0.2)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(500, **kw) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(5, base_lr=1.0, warmup_steps=0, total_steps=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_optimizer_registry_and_no_decay_on_biases_and_norms():
    model = build_model("resnet18", width=0.125, hidden_dim=16, out_dim=8)
    for name in ("sgd", "lars", "adamw"):
        opt = build_optimizer(model, name, lr=0.1, weight_decay=5e-4)
        decayed, plain = opt.param_groups
        assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
        assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    with pytest.raises(ValueError, match="sgd, lars, adamw"):
        build_optimizer(model, "rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(model, "sgd", lr=0.1, momentum=1.5)


def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    w.grad = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    opt = LARS([{"params": [w], "weight_decay": 0.0}], lr=0.1, momentum=0.9, trust_coefficient=0.01)
    opt.step()
    # update = lr * trust * ||w|| / ||g|| * g = 0.1 * 0.01 * 5 * g
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))


def fixed_batches(n_batches=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_batches, batch, 3, 16, 16, generator=g)
    return [{"view1": b + 0.1 * torch.randn(b.shape, generator=g), "view2": b + 0.1 * torch.randn(b.shape, generator=g)} for b in base]


def small_model():
    torch.manual_seed(0)
    return build_model("resnet18", width=0.125, hidden_dim=32, out_dim=16)


def test_loss_falls_and_result_reports_progress():
    model = small_model()
    opt = build_optimizer(model, "sgd", lr=0.05)
    loss_fn = get_loss("sscl", **HYPER)
    batches = fixed_batches()
    first = train_one_epoch(model, batches, loss_fn, opt, lr_schedule=lambda s: 0.05)
    for _ in range(4):
        last = train_one_epoch(model, batches, loss_fn, opt, lr_schedule=lambda s: 0.05)
    assert last.loss < first.loss - 0.05
    assert first.steps == 4 and first.next_step == 4 and first.images_per_second > 0 and first.lr == 0.05


def test_resume_from_state_continues_identically():
    batches = fixed_batches()
    loss_fn = get_loss("sscl", **HYPER)
    schedule = lambda s: lr_at(s, base_lr=0.05, warmup_steps=2, total_steps=8)  # noqa: E731

    def epoch(model, opt, start, seed):
        torch.manual_seed(seed)  # the loss draws its synthetic negatives from the global RNG
        return train_one_epoch(model, batches, loss_fn, opt, lr_schedule=schedule, start_step=start)

    straight = small_model()
    opt = build_optimizer(straight, "lars", lr=0.05)
    r1 = epoch(straight, opt, 0, seed=1)
    r2 = epoch(straight, opt, r1.next_step, seed=2)

    first = small_model()
    opt_first = build_optimizer(first, "lars", lr=0.05)
    r1b = epoch(first, opt_first, 0, seed=1)
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": opt_first.state_dict(), "step": r1b.next_step})
    resumed = small_model()
    resumed.load_state_dict(saved["model"])
    opt_resumed = build_optimizer(resumed, "lars", lr=0.05)
    opt_resumed.load_state_dict(saved["optimizer"])
    r2b = epoch(resumed, opt_resumed, saved["step"], seed=2)

    assert r2b.loss == r2.loss and r2b.lr == r2.lr and r2b.next_step == 8
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_augmentation_on_the_device_and_bf16_autocast():
    rng = np.random.default_rng(0)
    batches = [{"image": torch.from_numpy(rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8))} for _ in range(2)]
    model = small_model()
    opt = build_optimizer(model, "adamw", lr=1e-3)
    augment = TwoViewAugment(crop_size=16, seed=0).views
    result = train_one_epoch(model, batches, get_loss("sscl", **HYPER), opt, lr_schedule=lambda s: 1e-3,
                             augment=augment, amp=True)
    assert math.isfinite(result.loss) and result.steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_batches_fail_clearly():
    model = small_model()
    opt = build_optimizer(model, "sgd", lr=0.1)
    loss_fn = get_loss("simclr", temperature=0.5)
    with pytest.raises(ValueError, match="empty"):
        train_one_epoch(model, [], loss_fn, opt, lr_schedule=lambda s: 0.1)
    with pytest.raises(ValueError, match="view1"):
        train_one_epoch(model, [{"image": torch.zeros(2, 16, 16, 3, dtype=torch.uint8)}], loss_fn, opt,
                        lr_schedule=lambda s: 0.1)


def test_epoch_diagnostics_are_the_mean_of_each_steps_loss_diagnostics():
    batches = fixed_batches(n_batches=3)
    loss_fn = get_loss("sscl", **HYPER)
    seen = []

    def recording(z1, z2, **kwargs):
        torch.manual_seed(len(seen))  # the same draw in both passes below
        loss, found = loss_fn(z1, z2, **kwargs)
        seen.append({k: float(v) for k, v in vars(found).items()})
        return loss, found

    model = small_model()
    result = train_one_epoch(model, batches, recording, build_optimizer(model, "sgd", lr=0.0),
                             lr_schedule=lambda s: 0.0, diagnostics=True)
    assert len(seen) == 3 and set(result.diagnostics) == {"floor_fraction", "hardest_real", "synthetic_mean"}
    for key, value in result.diagnostics.items():
        assert value == pytest.approx(sum(s[key] for s in seen) / 3, rel=1e-6)
    assert 0 <= result.diagnostics["floor_fraction"] <= 1
    assert all(-1 - 1e-6 <= result.diagnostics[k] <= 1 + 1e-6 for k in ("hardest_real", "synthetic_mean"))  # cosines
    plain = train_one_epoch(model, batches, loss_fn, build_optimizer(model, "sgd", lr=0.0), lr_schedule=lambda s: 0.0)
    assert plain.diagnostics == {}


def test_channels_last_steps_equal_the_default_layout():
    batches = fixed_batches(n_batches=2)
    loss_fn = get_loss("simclr", temperature=0.5)
    results = []
    for channels_last in (False, True):
        model = small_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(model, "sgd", lr=0.05)
        results.append((train_one_epoch(model, batches, loss_fn, opt, lr_schedule=lambda s: 0.05,
                                        channels_last=channels_last), model))
    (plain, plain_model), (nhwc, nhwc_model) = results
    assert nhwc.loss == pytest.approx(plain.loss, rel=1e-5)
    for a, b in zip(plain_model.parameters(), nhwc_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_optimizers_use_fused_kernels_only_with_every_parameter_on_a_gpu():
    model = small_model()
    for name in ("sgd", "adamw"):
        assert build_optimizer(model, name, lr=0.1).defaults["fused"] is None  # CPU: PyTorch's own choice
