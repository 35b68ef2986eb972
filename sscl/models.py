"""Encoders: torchvision ResNet blocks with a CIFAR or ImageNet stem and a width multiplier, plus a
SimCLR projection head.

The width multiplier scales every stage's channels (64, 128, 256, 512 at width 1), so a quick run
with ``width=0.25`` fits a 2-core CPU while ``width=1`` is torchvision's ResNet exactly.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["ENCODERS", "ContrastiveModel", "ProjectionHead", "ResNetEncoder", "SplitBatchNorm", "build_encoder",
           "build_model"]

Stem = Literal["cifar", "imagenet"]
STEMS = ("cifar", "imagenet")


class ResNetEncoder(nn.Module):
    """ResNet backbone without the classifier: images (N, 3, H, W) -> features (N, feature_dim).

    Built from torchvision's ``BasicBlock``/``Bottleneck`` in torchvision's layer order, so at
    ``width=1`` with the ImageNet stem it has the parameters of ``torchvision.models.resnetXX``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        stem: Stem = "cifar",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if stem == "cifar":  # 3x3 stride-1 conv, no max-pool: keeps 32-px images at full size
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, 3, H, W) float images. Returns: (N, feature_dim) features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _resnet18(**kw) -> ResNetEncoder:
    return ResNetEncoder(BasicBlock, (2, 2, 2, 2), **kw)


def _resnet34(**kw) -> ResNetEncoder:
    return ResNetEncoder(BasicBlock, (3, 4, 6, 3), **kw)


def _resnet50(**kw) -> ResNetEncoder:
    return ResNetEncoder(Bottleneck, (3, 4, 6, 3), **kw)


ENCODERS: dict[str, Callable[..., ResNetEncoder]] = {
    "resnet18": _resnet18,
    "resnet34": _resnet34,
    "resnet50": _resnet50,
}


def build_encoder(name: str, *, stem: Stem = "cifar", width: float = 1.0) -> ResNetEncoder:
    """Builds a registered backbone.

    Args:
        name: one of ``ENCODERS``.
        stem: "cifar" (3x3 stride-1 conv, no max-pool) or "imagenet" (7x7 stride-2 conv + max-pool).
        width: channel multiplier (1.0 = torchvision).

    Raises:
        ValueError: on an unknown name (listing the valid ones), stem or width.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[name](stem=stem, width=width)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: Linear-[BN]-ReLU-Linear[-BN]: (N, in_dim) -> (N, out_dim)."""

    def __init__(self, in_dim: int, *, hidden_dim: int = 512, out_dim: int = 128, batchnorm: bool = False) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class ContrastiveModel(nn.Module):
    """Backbone + projection head; ``forward`` returns features and normalised projections."""

    def __init__(self, encoder: ResNetEncoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x: (N, 3, H, W). Returns: features (N, feature_dim), z (N, out_dim) unit rows."""
        features = self.encoder(x)
        return features, F.normalize(self.head(features), dim=1)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of each of ``splits`` consecutive parts of the batch,
    as if every part were on a GPU of its own (MoCo's SplitBatchNorm, for MoCo on one GPU).

    In evaluation mode it is the BatchNorm it replaces; the running statistics follow the mean of the
    parts' statistics. State dict as the replaced layer's.

    Args:
        norm: the ``BatchNorm1d``/``BatchNorm2d`` layer to replace (its parameters and buffers are copied).
        splits: parts of every training batch; the batch size must be at least ``splits``.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, splits: int) -> None:
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        self.load_state_dict(norm.state_dict())
        self.splits = splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected (N, C), (N, C, L) or (N, C, H, W) input, got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or self.splits == 1:
            return super().forward(x)
        if len(x) < self.splits:
            raise ValueError(f"a batch of {len(x)} cannot be split into {self.splits} BatchNorm parts")
        tracking = self.running_mean is not None
        if tracking:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum  # None: a cumulative average, as BatchNorm's
        if momentum is None:
            momentum = 1 / float(self.num_batches_tracked) if tracking else 0.0
        outputs, updated = [], []
        for part in x.tensor_split(self.splits):  # (N / splits, C, ...) each
            stats = (self.running_mean.clone(), self.running_var.clone()) if tracking else (None, None)
            outputs.append(F.batch_norm(part, *stats, self.weight, self.bias, True, momentum, self.eps))
            updated.append(stats)
        if tracking:  # each part updated its own copy of the running statistics in place
            with torch.no_grad():
                self.running_mean.copy_(torch.stack([mean for mean, _ in updated]).mean(0))
                self.running_var.copy_(torch.stack([var for _, var in updated]).mean(0))
        return torch.cat(outputs)


def _split_batchnorm(module: nn.Module, splits: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            _split_batchnorm(child, splits)


def build_model(
    encoder: str = "resnet18",
    *,
    stem: Stem = "cifar",
    width: float = 1.0,
    hidden_dim: int = 512,
    out_dim: int = 128,
    head_batchnorm: bool = False,
    bn_splits: int = 1,
) -> ContrastiveModel:
    """Builds the encoder and its projection head (keywords equal the ``model`` config fields).

    ``bn_splits`` > 1 replaces every BatchNorm by a :class:`SplitBatchNorm` of that many parts.
    """
    if bn_splits < 1:
        raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
    backbone = build_encoder(encoder, stem=stem, width=width)
    head = ProjectionHead(backbone.feature_dim, hidden_dim=hidden_dim, out_dim=out_dim, batchnorm=head_batchnorm)
    model = ContrastiveModel(backbone, head)
    if bn_splits > 1:
        _split_batchnorm(model, bn_splits)
    return model
