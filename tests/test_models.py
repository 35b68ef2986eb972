"""Encoders and projection head."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sscl.models import ENCODERS, build_encoder, build_model


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
