"""Evaluation of a frozen encoder: weighted kNN and a linear probe, each returning top-1 accuracy."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_features", "knn_top1", "linear_probe_top1"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module, batches: Iterable[Mapping[str, Any]], *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a frozen encoder over labelled batches.

    Args:
        encoder: (N, 3, H, W) float -> (N, F) features (e.g. ``ContrastiveModel.encoder``).
        batches: dicts with ``image`` float (N, 3, H, W) already normalised, and ``label`` (N,).

    Returns:
        features (M, F) float32 on CPU, labels (M,) int64.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in batches:
        x = batch["image"]
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        feats.append(encoder(x.to(device).float()).float().cpu())
        y = batch["label"]
        labels.append(torch.as_tensor(np.asarray(y)).long())
    encoder.train(was_training)
    if not feats:
        raise ValueError("no evaluation batches: the evaluation dataset is empty")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
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
    """Weighted kNN accuracy (Wu et al. 2018, InstDisc): each of the k nearest training samples by
    cosine similarity votes for its class with weight ``exp(sim / temperature)``.

    Args:
        train_features: (M, F). train_labels: (M,) int.
        test_features: (T, F). test_labels: (T,) int.
        k: neighbours (clipped to M).
        temperature: vote temperature > 0.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("kNN needs non-empty train and test features")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (t, M)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk_size]).sum())
    return correct / len(test)


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Linear classifier on frozen, standardised features (SGD + cosine schedule, cross-entropy).

    Args:
        train_features: (M, F). train_labels: (M,).
        test_features: (T, F). test_labels: (T,).
        epochs, lr, weight_decay, batch_size: the probe's training settings.
        seed: for the initialisation and shuffling.

    Returns:
        Top-1 accuracy on the test features, in [0, 1].
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = nn.Linear(x_train.shape[1], n_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(x_train), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(probe(x_train[idx]), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    with torch.no_grad():
        return float((probe(x_test).argmax(dim=1) == test_labels).float().mean())
