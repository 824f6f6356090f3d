"""Residual networks with basic blocks (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016).

- ``resnet18`` / ``resnet34``: four stages of 64/128/256/512 channels with [2, 2, 2, 2] / [3, 4, 6, 3]
  blocks. ``stem="cifar"`` (default): one 3×3 stride-1 conv, no pool, for 32×32 input.
  ``stem="imagenet"``: 7×7 stride-2 conv + BN + activation + 3×3 stride-2 pool, for 224×224 input.
- ``resnet20``: the CIFAR ResNet of the same paper (Sec. 4.2), three stages of 16/32/64 channels with
  three blocks each. Its shortcuts that change shape are 1×1 conv + BN (the paper's option B) so
  that every operation is a convolution the converter understands.

For conversion the residual addition comes *before* the block's last activation — both branches'
currents add into the same membrane (docs/METHOD.md, "What conversion must handle").
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ActivationFactory, activation_factory, init_weights, make_dropout, make_pool
from .registry import register
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers; ``act2(bn2(conv2(·)) + shortcut(x))``."""

    def __init__(self, in_channels: int, channels: int, stride: int, act: ActivationFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = act(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of :class:`BasicBlock` (the first block of each later stage halves the size),
    global average pool and a linear readout."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        activation: str = "clip",
        levels: int | None = 4,
        init_threshold: float = DEFAULT_INIT_THRESHOLD,
        per_channel: bool = False,
        in_channels: int = 3,
        pool: str = "avg",
        stem: str = "cifar",
        dropout: float = 0.0,
    ):
        super().__init__()
        act = activation_factory(activation, levels, init_threshold, per_channel)
        # Top-level names follow torchvision (conv1, bn1, layer1…, fc) so its checkpoints map over
        # with little renaming (its block ``downsample`` is our ``shortcut``).
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = act(widths[0])
        self.pool = make_pool(pool, 3, 2, 1) if stem == "imagenet" else nn.Identity()
        channels = widths[0]
        self.num_stages = len(blocks)
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(channels, width, stride, act))
                channels = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = make_dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.dropout(self.flatten(self.avgpool(x))))


_STEMS = {"cifar": 32, "imagenet": 224}


@register("resnet18", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": dict(_STEMS)})
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: [2, 2, 2, 2] basic blocks, 64–512 channels (17 activations)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register("resnet34", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": dict(_STEMS)})
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: [3, 4, 6, 3] basic blocks, 64–512 channels (33 activations)."""
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), **kwargs)


@register("resnet20", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": {"cifar": 32}})
def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20: 3 stages × 3 basic blocks, 16/32/64 channels (19 activations)."""
    return ResNet((3, 3, 3), (16, 32, 64), **kwargs)


@register("resnet8", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": {"cifar": 32}})
def resnet8(**kwargs) -> ResNet:
    """CIFAR ResNet-8: 3 stages × 1 basic block, 16/32/64 channels (7 activations); with resnet14/20/32 the
    family compares gap against depth (benchmarks/depth.py)."""
    return ResNet((1, 1, 1), (16, 32, 64), **kwargs)


@register("resnet14", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": {"cifar": 32}})
def resnet14(**kwargs) -> ResNet:
    """CIFAR ResNet-14: 3 stages × 2 basic blocks, 16/32/64 channels (13 activations)."""
    return ResNet((2, 2, 2), (16, 32, 64), **kwargs)


@register("resnet32", {"in_channels": 3, "image_size": 32, "stem": "cifar", "stems": {"cifar": 32}})
def resnet32(**kwargs) -> ResNet:
    """CIFAR ResNet-32: 3 stages × 5 basic blocks, 16/32/64 channels (31 activations)."""
    return ResNet((5, 5, 5), (16, 32, 64), **kwargs)
