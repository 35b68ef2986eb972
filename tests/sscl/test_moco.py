"""MoCo's key side: the momentum schedule, the EMA, the queue as state, and a MoCo training epoch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sscl.losses import get_loss
from sscl.models import build_model
from sscl.moco import MomentumQueue, momentum_at
from sscl.train import build_optimizer, train_one_epoch

pytestmark = pytest.mark.unit


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet18", width=0.125, hidden_dim=16, out_dim=8)


def test_momentum_rises_from_base_to_one_on_a_cosine():
    assert momentum_at(0, base=0.99, total_steps=100) == pytest.approx(0.99)
    assert momentum_at(50, base=0.99, total_steps=100) == pytest.approx(0.995)
    assert momentum_at(100, base=0.99, total_steps=100) == pytest.approx(1.0)
    values = [momentum_at(s, base=0.9, total_steps=40) for s in range(41)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_update_moves_the_momentum_model_by_the_ema_and_enqueues_in_order():
    model = small_model()
    moco = MomentumQueue(model, queue_size=10, momentum=0.9, total_steps=100, dim=8, seed=0)
    before = [p.clone() for p in moco.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    start_queue = moco.queue.clone()
    keys = F.normalize(torch.randn(6, 8), dim=1)
    moco.update(keys, step=0)
    for old, new, query in zip(before, moco.model.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * query)
    torch.testing.assert_close(moco.queue[:6], keys)
    torch.testing.assert_close(moco.queue[6:], start_queue[6:])
    more = F.normalize(torch.randn(6, 8), dim=1)
    moco.update(more, step=1)  # wraps: rows 6..9, then 0..1
    torch.testing.assert_close(moco.queue[6:], more[:4])
    torch.testing.assert_close(moco.queue[:2], more[4:])
    torch.testing.assert_close(moco.queue[2:6], keys[2:])
    assert moco.pointer == 2
    assert not any(p.requires_grad for p in moco.model.parameters())


def test_queue_starts_as_the_same_unit_vectors_for_a_seed():
    a = MomentumQueue(small_model(), queue_size=32, momentum=0.99, total_steps=10, dim=8, seed=5)
    b = MomentumQueue(small_model(1), queue_size=32, momentum=0.99, total_steps=10, dim=8, seed=5)
    assert torch.equal(a.queue, b.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(32))


def test_state_round_trips_bit_exact_and_a_changed_queue_is_refused():
    moco = MomentumQueue(small_model(), queue_size=12, momentum=0.99, total_steps=10, dim=8, seed=0)
    moco.update(F.normalize(torch.randn(5, 8), dim=1), step=0)
    saved = copy.deepcopy(moco.state_dict())
    other = MomentumQueue(small_model(3), queue_size=12, momentum=0.99, total_steps=10, dim=8, seed=9)
    other.load_state_dict(saved)
    assert torch.equal(other.queue, moco.queue) and other.pointer == moco.pointer == 5
    for x, y in zip(other.model.state_dict().values(), moco.model.state_dict().values()):
        assert torch.equal(x, y)
    smaller = MomentumQueue(small_model(), queue_size=8, momentum=0.99, total_steps=10, dim=8, seed=0)
    with pytest.raises(ValueError, match=r"queue has shape \(12, 8\), this run's \(8, 8\): model.queue_size"):
        smaller.load_state_dict(saved)


def batches(n_batches=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_batches, batch, 3, 16, 16, generator=g)
    return [{"view1": b + 0.1 * torch.randn(b.shape, generator=g),
             "view2": b + 0.1 * torch.randn(b.shape, generator=g)} for b in base]


def test_a_moco_epoch_trains_the_queries_and_fills_the_queue_with_the_momentum_keys():
    model = small_model()
    moco = MomentumQueue(model, queue_size=64, momentum=0.99, total_steps=3, dim=8, seed=0)
    optimizer = build_optimizer(model, "sgd", lr=0.1)
    loss_fn = get_loss("sscl", "moco", temperature=0.2, beta=1.0, tau_plus=0.1, n_hard=8, n_synthetic=4, mode="mix")
    data = batches()
    weights = [p.clone() for p in model.parameters()]
    result = train_one_epoch(model, data, loss_fn, optimizer, lr_schedule=lambda s: 0.1, moco=moco, diagnostics=True)
    assert result.steps == 3 and result.next_step == 3 and moco.pointer == 3 * 16
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert 0 <= result.diagnostics["floor_fraction"] <= 1
    torch.testing.assert_close(moco.queue.norm(dim=1), torch.ones(64))  # unit keys written over the start


def test_keys_of_the_momentum_model_are_the_ones_enqueued():
    model = small_model()
    moco = MomentumQueue(model, queue_size=32, momentum=1.0, total_steps=1, dim=8, seed=0)  # momentum 1: fixed keys
    frozen = copy.deepcopy(moco.model)
    data = batches(n_batches=1)
    loss_fn = get_loss("simclr", "moco", temperature=0.2)
    train_one_epoch(model, data, loss_fn, build_optimizer(model, "sgd", lr=0.1), lr_schedule=lambda s: 0.1, moco=moco)
    with torch.no_grad():
        expected = frozen(torch.cat([data[0]["view1"], data[0]["view2"]]))[1]
    torch.testing.assert_close(moco.queue[:16], expected)


def test_keys_are_encoded_in_a_random_order_so_split_batchnorm_parts_are_random():
    torch.manual_seed(0)
    model = build_model("resnet18", width=0.125, hidden_dim=16, out_dim=8, bn_splits=4)
    moco = MomentumQueue(model, queue_size=64, momentum=0.99, total_steps=1, dim=8, seed=0)
    views = torch.cat([batches(n_batches=1)[0]["view1"], batches(n_batches=1)[0]["view2"]])  # (16, 3, 16, 16)
    torch.manual_seed(5)
    keys = moco.keys(views)
    torch.manual_seed(5)
    order = torch.randperm(16)  # the order keys() draws
    expected = torch.empty_like(keys)
    with torch.no_grad():
        expected[order] = copy.deepcopy(moco.model)(views[order])[1]  # the parts are four random quarters
        in_order = copy.deepcopy(moco.model)(views)[1]  # queries' parts: four consecutive quarters
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)
    assert (keys - in_order).abs().amax() > 1e-3  # other parts, other statistics
    # Without split BatchNorm the order changes nothing but the summation order.
    plain = MomentumQueue(small_model(), queue_size=64, momentum=0.99, total_steps=1, dim=8, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(plain.keys(views), copy.deepcopy(plain.model)(views)[1])


def test_a_moco_runs_histogram_is_its_queries_against_the_queue():
    import dataclasses

    from sscl.config import load_config
    from sscl.data.augment import TwoViewAugment
    from sscl.recipe import HISTOGRAM_VALUES, Recipe

    overrides = ["model.width=0.125", "model.out_dim=16", "loss.n_synthetic=5"]
    images = torch.randint(0, 256, (70, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = load_config("pipelines/configs/quickstart.yaml", [*overrides, "model.method=moco", "model.queue_size=1024"])
    recipe = Recipe(cfg, steps_per_epoch=1, device=torch.device("cpu"))
    found = recipe.similarities(images)
    # 64 images, two views: 128 queries; 128 * 1024 similarities to the queue, of which a random 2^16 are kept.
    view1, view2 = TwoViewAugment(**dataclasses.asdict(cfg.augment), seed=cfg.train.seed).views(images[:64])
    model = recipe.module
    with torch.no_grad():
        model.eval()
        queries = torch.cat([model(view1)[1], model(view2)[1]])
    every = (queries @ recipe.moco.queue.T).flatten()
    assert found["real"].shape == (HISTOGRAM_VALUES,) and len(every) == 2 * HISTOGRAM_VALUES
    assert bool(torch.isin(found["real"], every).all())
    assert found["synthetic"].shape == (128 * 5,)
    # The two-view run's histogram: every anchor's 2B - 2 in-batch negatives.
    two_view = Recipe(load_config("pipelines/configs/quickstart.yaml", overrides), steps_per_epoch=1,
                      device=torch.device("cpu")).similarities(images)
    assert two_view["real"].shape == (128 * 126,) and two_view["synthetic"].shape == (128 * 5,)
