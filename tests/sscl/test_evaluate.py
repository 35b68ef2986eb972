"""kNN and linear probe against independent references, on real digits and synthetic clusters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from sscl.evaluate import evaluate_encoder, extract_features, knn_top1, linear_probe_top1


def reference_knn(train_x, train_y, test_x, test_y, k, t):
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for x, y in zip(test_x, test_y):
        sims = [(float(x @ tx), int(ty)) for tx, ty in zip(train_x, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes: dict[int, float] = {}
        for s, label in sims[:k]:
            votes[label] = votes.get(label, 0.0) + torch.exp(torch.tensor(s / t)).item()
        correct += max(votes, key=votes.get) == int(y)
    return correct / len(test_y)


def test_knn_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    train_y = torch.randint(4, (120,), generator=g)
    test_y = torch.randint(4, (40,), generator=g)
    train_x = centres[train_y] + 1.2 * torch.randn(120, 8, generator=g)
    test_x = centres[test_y] + 1.2 * torch.randn(40, 8, generator=g)
    for k, t in [(1, 0.1), (10, 0.1), (50, 0.5)]:
        got = knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=t, chunk_size=7)
        assert got == pytest.approx(reference_knn(train_x, train_y, test_x, test_y, k, t))


def test_probes_on_real_digits_pixels():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    assert knn_top1(train_x, train_y, test_x, test_y, k=20) > 0.9
    ours = linear_probe_top1(train_x, train_y, test_x, test_y, epochs=30)
    reference = LogisticRegression(max_iter=2000).fit(digits.data[:1400] / 16, digits.target[:1400])
    assert ours > reference.score(digits.data[1400:] / 16, digits.target[1400:]) - 0.04
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_top1(train_x, shuffled, test_x, test_y, epochs=30) < 0.3  # chance is 0.1


def test_extract_features_runs_a_frozen_encoder_in_eval_mode():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5))
    encoder.train()
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (4, 2, 2, 3), generator=g, dtype=torch.uint8), "label": torch.arange(4)}
               for _ in range(3)]
    feats, labels = extract_features(encoder, batches, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert feats.shape == (12, 5) and labels.tolist() == list(range(4)) * 3
    assert encoder.training  # mode restored
    # The evaluation transform: (uint8 / 255 - mean) / std, channels first, in eval mode (BN running stats).
    encoder.eval()
    x = (batches[0]["image"].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(feats[:4], encoder(x))
    with pytest.raises(ValueError, match="empty"):
        extract_features(encoder, [])


def test_bad_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k"):
        knn_top1(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_top1(x, y, x, y, temperature=0)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe_top1(x, y, x, y, epochs=0)


def test_linear_probe_does_not_depend_on_row_order():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(1400, generator=torch.Generator().manual_seed(1))
    a = linear_probe_top1(x[:1400], y[:1400], x[1400:], y[1400:], epochs=30)
    b = linear_probe_top1(x[:1400][order], y[:1400][order], x[1400:], y[1400:], epochs=30)
    assert a == b


def test_evaluate_encoder_in_one_process_equals_the_parts():
    g = torch.Generator().manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6))
    images = torch.randint(0, 256, (40, 4, 4, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(40) % 3
    batches = lambda lo, hi: [{"image": images[i : i + 5], "label": labels[i : i + 5]} for i in range(lo, hi, 5)]
    got = evaluate_encoder(encoder, batches(0, 30), batches(30, 40), k=7, temperature=0.2, linear_epochs=20)
    train_f, train_y = extract_features(encoder, batches(0, 30))
    test_f, test_y = extract_features(encoder, batches(30, 40))
    assert got["knn_top1"] == knn_top1(train_f, train_y, test_f, test_y, k=7, temperature=0.2)
    assert got["linear_top1"] == linear_probe_top1(train_f, train_y, test_f, test_y, epochs=20)
