"""Encoders and projection head."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sscl.models import ENCODERS, SplitBatchNorm, build_encoder, build_model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_width_one_imagenet_stem_matches_torchvision(name):
    ours = build_encoder(name, stem="imagenet", width=1.0)
    reference = getattr(torchvision.models, name)()
    reference.fc = torch.nn.Identity()
    assert n_params(ours) == n_params(reference)
    assert ours.feature_dim == {"resnet18": 512, "resnet34": 512, "resnet50": 2048}[name]
    # Same layer order: torchvision's weights load into ours and give the same features.
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()})
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x))


def test_cifar_stem_keeps_resolution_and_width_scales_channels():
    enc = build_encoder("resnet18", stem="cifar", width=0.25)
    assert isinstance(enc.maxpool, torch.nn.Identity) and enc.conv1.stride == (1, 1) and enc.conv1.kernel_size == (3, 3)
    assert enc.feature_dim == 128 and enc.conv1.out_channels == 16
    assert n_params(enc) < n_params(build_encoder("resnet18", stem="cifar")) / 10
    assert enc(torch.randn(4, 3, 32, 32)).shape == (4, 128)


@pytest.mark.parametrize("head_batchnorm", [False, True])
def test_model_returns_features_and_unit_projections(head_batchnorm):
    model = build_model("resnet18", width=0.25, hidden_dim=64, out_dim=16, head_batchnorm=head_batchnorm)
    features, z = model(torch.randn(6, 3, 32, 32))
    assert features.shape == (6, 128) and z.shape == (6, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    has_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in model.head.modules())
    assert has_bn == head_batchnorm


def test_unknown_names_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        build_encoder("vit_b16")
    with pytest.raises(ValueError, match="stem"):
        build_encoder("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="width"):
        build_encoder("resnet18", width=0)
    with pytest.raises(ValueError, match="out_dim"):
        build_model(out_dim=0)
    assert set(ENCODERS) == {"resnet18", "resnet34", "resnet50"}


@pytest.mark.parametrize("shape,momentum", [((12, 5, 3, 3), 0.1), ((12, 5), 0.1), ((12, 5, 3, 3), None)])
def test_split_batchnorm_is_batchnorm_on_each_part(shape, momentum):
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    norm = layer(5, momentum=momentum)
    torch.nn.init.uniform_(norm.weight), torch.nn.init.uniform_(norm.bias)
    split = SplitBatchNorm(norm, splits=3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    split.double(), norm.double()
    out = split(x)
    grads = torch.autograd.grad(out.square().sum(), (x, split.weight, split.bias))
    parts, means, variances = [], [], []
    for part in x.tensor_split(3):  # three plain BatchNorms, one per consecutive third of the batch
        plain = layer(5, momentum=momentum)
        plain.double().load_state_dict(norm.state_dict())
        plain.weight, plain.bias = norm.weight, norm.bias  # shared: the gradients add up over the parts
        parts.append(plain(part))
        means.append(plain.running_mean), variances.append(plain.running_var)
    expected = torch.cat(parts)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (x, norm.weight, norm.bias))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12)
    assert int(split.num_batches_tracked) == 1
    # Evaluation: the plain layer with the running statistics.
    split.eval(), norm.eval()
    norm.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), norm(x), rtol=0, atol=0)
    split.train()
    with pytest.raises(ValueError, match="a batch of 2 cannot be split into 3 BatchNorm parts"):
        split(x[:2])


def test_bn_splits_replaces_every_batchnorm_and_keeps_the_state_dict():
    plain = build_model("resnet18", width=0.125, head_batchnorm=True)
    split = build_model("resnet18", width=0.125, head_batchnorm=True, bn_splits=4)
    n_norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert sum(isinstance(m, SplitBatchNorm) for m in split.modules()) == n_norms == 22
    split.load_state_dict(plain.state_dict())  # same keys and shapes: checkpoints and registered encoders carry over
    x = torch.randn(8, 3, 16, 16)
    plain.eval(), split.eval()
    torch.testing.assert_close(split(x)[1], plain(x)[1], rtol=0, atol=0)
    split.train()
    z = split.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))[1]
    assert z.shape == (8, 128) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="bn_splits must be >= 1, got 0"):
        build_model(bn_splits=0)
