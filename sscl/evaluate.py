"""Evaluation of a frozen encoder: weighted kNN and a linear probe, each returning top-1 accuracy."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sscl.data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize_images
from sscl.data.decode import DataError

__all__ = ["check_bank", "evaluate_encoder", "extract_features", "gather_rows", "knn_predict", "knn_top1", "linear_probe_top1"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    image_size: int | None = None,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a frozen encoder over labelled batches under the evaluation transform.

    Args:
        encoder: (N, 3, H, W) float -> (N, F) features (e.g. ``ContrastiveModel.encoder``, or a
            registered, exported encoder, which is already in inference mode).
        batches: dicts with ``image`` uint8 (N, H, W, 3) and ``label`` (N,), numpy or torch.
        device: where the encoder runs; the features stay there.
        image_size: images are resized to this side first (the training crop); None keeps them.
        mean, std: the normalisation used in training.

    Returns:
        features (M, F) float32 and labels (M,) int64, on ``device``.

    Raises:
        ValueError: if there are no batches.
    """
    was_training = getattr(encoder, "training", False)
    try:
        encoder.eval()
    except NotImplementedError:  # a torch.export module: frozen in inference mode already
        was_training = False
    feats, labels = [], []
    for batch in batches:
        x = normalize_images(torch.as_tensor(np.asarray(batch["image"])).to(device), mean=mean, std=std)
        if image_size is not None and x.shape[-1] != image_size:
            x = F.interpolate(x, size=image_size, mode="bilinear", antialias=True)
        feats.append(encoder(x).float())
        labels.append(torch.as_tensor(np.asarray(batch["label"])).long().to(device))
    if was_training:
        encoder.train()
    if not feats:
        raise ValueError("no evaluation batches: the evaluation dataset is empty")
    return torch.cat(feats), torch.cat(labels)


def check_bank(k: int, bank_images: int) -> None:
    """kNN needs fewer neighbours than the bank holds images.

    Raises:
        DataError: naming ``train.knn_k`` and the bank's size.
    """
    if k > bank_images:
        raise DataError(f"train.knn_k={k}: more neighbours than the {bank_images} images of the kNN bank (the "
                        "labelled training images, at most train.knn_max_images); lower train.knn_k")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's rows (ranks may hold different numbers) in rank order; ``x`` as
    it is without ``torch.distributed``. Works with gloo and NCCL (pads to the longest)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _over_ranks(value: int, device: torch.device, op: str = "SUM") -> int:
    """``value`` reduced over the ranks with ``torch.distributed.ReduceOp.<op>`` (itself in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    reduced = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(reduced, op=getattr(torch.distributed.ReduceOp, op))
    return int(reduced.item())


@torch.no_grad()
def evaluate_encoder(
    encoder: nn.Module,
    train_batches: Iterable[Mapping[str, Any]],
    test_batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    image_size: int | None = None,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    k: int = 200,
    temperature: float = 0.1,
    linear_epochs: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """kNN (and optionally linear-probe) top-1 of a frozen encoder, in one process or on every rank.

    Under ``torch.distributed`` each rank passes its own shard of both sets: the bank
    (``train_batches``) is gathered to every rank, each rank classifies its test shard, and the
    correct counts are summed, so the result equals one process on all the features. The probe
    runs on rank 0's device with the gathered features (full-batch, so their order does not
    matter) and is broadcast.

    Args:
        encoder, device, image_size, mean, std: as ``extract_features``.
        train_batches: the labelled bank / probe training set (this rank's shard).
        test_batches: the labelled test set (this rank's shard; may be empty on some ranks).
        k, temperature: ``knn_top1``'s.
        linear_epochs: L-BFGS iterations of the linear probe; 0 skips it.
        seed: the probe's initialisation.

    Returns:
        ``{"knn_top1": ...}`` and, with ``linear_epochs``, ``"linear_top1"``; the same on every rank.
    """
    device = torch.device(device)
    options = dict(device=device, image_size=image_size, mean=mean, std=std)
    # Any rank's shard of either set may be empty (fewer images than ranks, or uneven blocks).
    bank, bank_labels = _features_or_empty(encoder, train_batches, options)
    test, test_labels = _features_or_empty(encoder, test_batches, options)
    return score_features(bank, bank_labels, test, test_labels, k=k, temperature=temperature,
                          linear_epochs=linear_epochs, seed=seed)


def score_features(bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, *,
                   k: int = 200, temperature: float = 0.1, linear_epochs: int = 0, seed: int = 0) -> dict[str, float]:
    """kNN (and optionally linear-probe) top-1 of frozen features: ``evaluate_encoder`` once the
    features exist (this rank's shards under ``torch.distributed``), or of stored features.

    Args:
        bank, bank_labels: (N, F) features and (N,) labels of the bank / probe training set, on one device.
        test, test_labels: (M, F) and (M,) of the test set, on the same device.
        k, temperature, linear_epochs, seed: as ``evaluate_encoder``.
    """
    device = bank.device
    dim = _over_ranks(max(bank.shape[1], test.shape[1]), device, "MAX")
    bank, test = bank.reshape(len(bank), dim), test.reshape(len(test), dim)
    bank, bank_labels = gather_rows(bank), gather_rows(bank_labels)
    bank_classes = len(torch.unique(bank_labels))
    if bank_classes < 2:
        raise DataError(f"the kNN bank (the labelled training images) holds {len(bank_labels)} image(s) of "
                        f"{bank_classes} class(es): evaluation needs at least two classes (with one, every prediction "
                        "is right)")
    check_bank(k, len(bank))
    local_top = max(int(bank_labels.max()), int(test_labels.max()) if len(test_labels) else 0)
    n_classes = _over_ranks(local_top + 1, device, "MAX")
    predicted = knn_predict(bank, bank_labels, test, k=k, temperature=temperature, n_classes=n_classes)
    correct = _over_ranks(int((predicted == test_labels).sum()), device)
    total = _over_ranks(len(test_labels), device)
    if total == 0:
        raise ValueError("no evaluation images: the evaluation test set is empty")
    result = {"knn_top1": correct / total}
    if linear_epochs:
        all_test, all_test_labels = gather_rows(test), gather_rows(test_labels)
        accuracy = torch.zeros(1, dtype=torch.float64, device=device)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            accuracy[0] = linear_probe_top1(bank, bank_labels, all_test, all_test_labels, epochs=linear_epochs,
                                            seed=seed)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(accuracy, src=0)
        result["linear_top1"] = float(accuracy[0])
    return result


def _features_or_empty(encoder: nn.Module, batches: Iterable[Mapping[str, Any]],
                       options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features``, or (0, 0) features when this rank's shard is empty."""
    try:
        return extract_features(encoder, batches, **options)
    except DataError:  # a bad file met while reading the shard: not an empty shard
        raise
    except ValueError:
        device = options["device"]
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    n_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN classification (Wu et al. 2018, InstDisc): each of the k nearest training samples
    by cosine similarity votes for its class with weight ``exp(sim / temperature)``.

    Args:
        train_features: (M, F). train_labels: (M,) int.
        test_features: (T, F).
        k: neighbours (clipped to M).
        temperature: vote temperature > 0.
        n_classes: number of classes (default: the largest training label + 1).

    Returns:
        Predicted labels (T,) int64, on the features' device.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(train_features) == 0:
        raise ValueError("kNN needs a non-empty training bank")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    n_classes = n_classes or int(train_labels.max()) + 1
    k = min(k, len(train))
    predicted = []
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (t, M)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        predicted.append(votes.argmax(dim=1))
    return torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long, device=test.device)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy in [0, 1] (``knn_predict`` on the test features)."""
    if len(test_features) == 0:
        raise ValueError("kNN needs non-empty train and test features")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature,
                            n_classes=n_classes, chunk_size=chunk_size)
    return int((predicted == test_labels.to(predicted.device)).sum()) / len(test_labels)


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Multinomial logistic regression on frozen, standardised features, fitted full-batch with
    L-BFGS (cross-entropy + L2), so the result does not depend on the order of the rows.

    Args:
        train_features: (M, F). train_labels: (M,).
        test_features: (T, F). test_labels: (T,).
        epochs: L-BFGS iterations (each a pass over the whole training set).
        weight_decay: L2 strength on the weights.
        seed: for the initialisation.

    Returns:
        Top-1 accuracy on the test features, in [0, 1]; computed on the features' device.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = train_features.device
    train_features, test_features = train_features.float(), test_features.float().to(device)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(n_classes, x_train.shape[1], generator=generator)).to(device).requires_grad_(True)
    bias = torch.zeros(n_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x_train @ weight.T + bias, train_labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return int(((x_test @ weight.T + bias).argmax(dim=1) == test_labels).sum()) / len(test_labels)
