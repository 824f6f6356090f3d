"""VGG-16 with BatchNorm (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015; BatchNorm after every convolution, Ioffe & Szegedy 2015).

Thirteen 3×3 convolutions in five blocks, each block closed by a 2×2 pool, then three linear layers.

- ``stem="cifar"`` (default, 32×32 input): the CIFAR variant used in ANN–SNN conversion work (QCFS,
  Bu et al., ICLR 2022) with a small 512-wide classifier; a global average pool before it makes the
  net accept other input sizes as well (at 32×32 it is a no-op on the 1×1 map).
- ``stem="imagenet"`` (224×224 input): the original classifier, 7×7 adaptive average pool and two
  4096-wide hidden layers. Parameter names match torchvision's ``vgg16_bn``.
- ``stem="pad28"`` (28×28 input, e.g. Fashion-MNIST): the CIFAR variant after a 2-pixel zero padding to
  32×32 (five 2×2 pools would meet a 1×1 map at the fourth block otherwise). The padding acts on the input
  image only, so it is part of the SNN's static prefix and converts exactly.
- ``width``: every convolution and hidden layer has ``round(width × channels)`` channels (at least 1);
  ``width=0.25`` is a quarter-width VGG-16 (1/16 of the multiply-accumulates).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import activation_factory, conv_bn_act, init_weights, make_dropout, make_pool
from .registry import register
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["VGG", "VGG16_CONFIG"]

#: Output channels of each 3×3 convolution, ``"P"`` marking a 2×2 pool (configuration "D").
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P"
)  # fmt: skip


class VGG(nn.Module):
    """VGG feature extractor (conv–BN–activation, pools) and a three-layer classifier."""

    def __init__(
        self,
        config: tuple[int | str, ...],
        num_classes: int,
        activation: str = "clip",
        levels: int | None = 4,
        init_threshold: float = DEFAULT_INIT_THRESHOLD,
        per_channel: bool = False,
        in_channels: int = 3,
        pool: str = "avg",
        stem: str = "cifar",
        dropout: float = 0.0,
        width: float = 1.0,
    ):
        super().__init__()
        act = activation_factory(activation, levels, init_threshold, per_channel)
        layers: list[nn.Module] = [nn.ZeroPad2d(2)] if stem == "pad28" else []
        channels = in_channels
        for v in config:
            if v == "P":
                layers.append(make_pool(pool, 2, 2))
            else:
                out = max(1, round(width * int(v)))
                layers += conv_bn_act(channels, out, act)
                channels = out
        self.features = nn.Sequential(*layers)
        if stem == "imagenet":
            grid, hidden = 7, 4096
        else:
            grid, hidden = 1, 512
        hidden = max(1, round(width * hidden))
        self.avgpool = nn.AdaptiveAvgPool2d(grid)
        # Flatten in forward, not in the Sequential, so the indices match torchvision's vgg16_bn.
        self.classifier = nn.Sequential(
            nn.Linear(channels * grid * grid, hidden),
            act(hidden),
            make_dropout(dropout),
            nn.Linear(hidden, hidden),
            act(hidden),
            make_dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register("vgg16", {"in_channels": 3, "image_size": 32, "stem": "cifar",
                   "stems": {"cifar": 32, "imagenet": 224, "pad28": 28}, "width": True})
def vgg16(**kwargs) -> VGG:
    """VGG-16 (13 conv + 3 linear layers, 15 activations)."""
    return VGG(VGG16_CONFIG, **kwargs)
