"""The training recipe on its own, in one process: the state a checkpoint holds is complete (a resumed
run continues exactly as one never interrupted), old checkpoints load, and the metrics keep their names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sscl.config import load_config
from sscl.recipe import LAYOUT, EpochMetrics, Recipe, TrainingState

CPU = torch.device("cpu")


def config(*extra: str):
    return load_config("pipelines/configs/quickstart.yaml",
                       ["model.width=0.125", "model.out_dim=16", "data.batch_size=16", "train.epochs=3",
                        "optim.warmup_epochs=1", "loss.n_hard=8", "train.knn_k=5", "train.linear_epochs=2", *extra])


def batches(epoch: int, steps: int = 2, size: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + epoch)
    return [{"image": torch.randint(0, 256, (size, 8, 8, 3), dtype=torch.uint8, generator=g)} for _ in range(steps)]


def labelled(n: int = 40) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"image": torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g),
             "label": torch.arange(n) % 4}]


def weights(recipe: Recipe) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in recipe.module.parameters()])


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path, method):
    cfg = config(f"model.method={method}", "model.queue_size=64", "augment.crop_size=8")
    straight = Recipe(cfg, steps_per_epoch=2, device=CPU)
    losses = [straight.train_epoch(batches(e)).loss for e in range(3)]

    first = Recipe(cfg, steps_per_epoch=2, device=CPU)
    first.record(first.train_epoch(batches(0)))
    first.checkpoint().save(tmp_path)
    resumed = Recipe(cfg, steps_per_epoch=2, device=CPU)
    resumed.restore(TrainingState.load(tmp_path))
    assert resumed.state.epoch == 1 and resumed.state.step == 2
    later = [resumed.train_epoch(batches(e)).loss for e in (1, 2)]

    assert later == losses[1:]  # bit for bit: weights, optimiser, schedule, queue and every random draw
    torch.testing.assert_close(weights(resumed), weights(straight), rtol=0, atol=0)
    assert resumed.done and len(resumed.state.resumes) == 1
    if method == "moco":
        assert resumed.state.resumes[0]["queue_sha256"] == first.moco.digest()
        torch.testing.assert_close(resumed.moco.queue, straight.moco.queue, rtol=0, atol=0)


def test_the_state_file_round_trips_and_loads_with_weights_only(tmp_path):
    recipe = Recipe(config(), steps_per_epoch=2, device=CPU)
    metrics = recipe.train_epoch(batches(0))
    recipe.record(dataclasses.replace(metrics, knn_top1=0.5, linear_top1=0.25, skipped_images=3))
    recipe.state.initial = {"knn_top1": 0.1, "linear_top1": 0.2}
    recipe.checkpoint().save(tmp_path)
    raw = torch.load(tmp_path / TrainingState.FILE, weights_only=True)
    assert raw["layout"] == LAYOUT and raw["history"][0]["neg_floor_fraction"] == metrics.negatives["floor_fraction"]
    loaded = TrainingState.load(tmp_path)
    assert loaded.history == recipe.state.history and loaded.initial == recipe.state.initial
    assert (loaded.epoch, loaded.step) == (1, 2) and loaded.moco is None


def test_a_layout_one_checkpoint_still_loads_and_its_similarity_sample_is_dropped(tmp_path):
    recipe = Recipe(config(), steps_per_epoch=2, device=CPU)
    history = [{"epoch": 1, "loss": 5.0, "lr": 0.1, "images_per_second": 10.0, "neg_floor_fraction": 0.5,
                "knn_top1": 0.3, "linear_top1": 0.4}]
    torch.save({"epoch": 1, "step": 2, "history": history, "similarities": {"real": torch.zeros(3)},
                "initial": None, "model": recipe.module.state_dict(), "optimizer": recipe.optimizer.state_dict()},
               tmp_path / "state.pt")
    loaded = TrainingState.load(tmp_path)
    assert loaded.history[0].flat() == history[0] and loaded.resumes == []
    recipe.restore(loaded)
    assert recipe.state.epoch == 1


@pytest.mark.parametrize("written, message", [
    ({"layout": LAYOUT + 1, "epoch": 0}, "newer than this version reads"),
    ({"epoch": 0, "history": []}, "missing step, model, optimizer"),
    (None, "no training state"),
])
def test_a_foreign_or_newer_checkpoint_is_refused_by_name(tmp_path, written, message):
    if written is not None:
        torch.save(written, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=message) as err:
        TrainingState.load(tmp_path)
    assert "state.pt" in str(err.value)


def test_epoch_metrics_keep_their_reported_names_and_line():
    metrics = EpochMetrics(epoch=2, loss=1.5, lr=0.01, images_per_second=123.4, negatives={"hardest_real": 0.9},
                           knn_top1=0.75, skipped_images=1)
    assert metrics.flat() == {"epoch": 2, "loss": 1.5, "lr": 0.01, "images_per_second": 123.4,
                              "neg_hardest_real": 0.9, "knn_top1": 0.75, "skipped_images": 1}
    assert EpochMetrics.from_flat(metrics.flat()) == metrics
    assert metrics.line(5) == "epoch   2/5  loss 1.5000  lr 0.0100  img/s    123.4  knn_top1 0.7500  skipped 1"


def test_evaluation_is_due_every_knn_every_epochs_and_at_the_last():
    recipe = Recipe(config("train.knn_every=2", "train.epochs=5"), steps_per_epoch=1, device=CPU)
    assert [e for e in range(1, 6) if recipe.evaluates_after(e)] == [2, 4, 5]


def test_evaluate_gives_top1s_and_the_histogram_sample_on_request():
    recipe = Recipe(config("augment.crop_size=8"), steps_per_epoch=1, device=CPU)
    metrics, none = recipe.evaluate(labelled(), labelled())
    assert set(metrics) == {"knn_top1", "linear_top1"} and none is None
    again, sample = recipe.evaluate(labelled(), labelled(), similarities=True)
    assert again == metrics  # evaluation changes nothing
    assert sample["real"].shape == (2 * 40 * (2 * 40 - 2),)  # 40 images: 80 anchors, 78 negatives each
