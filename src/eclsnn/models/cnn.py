"""``cnn-fmnist``: a small VGG-style network for 1×28×28 images (Fashion-MNIST; Xiao, Rasul &
Vollgraf 2017), in the style of VGG (Simonyan & Zisserman, ICLR 2015): 3×3 conv–BN–activation
layers, 2×2 pools, a small classifier.

Sized (≈ 6 M multiply-accumulates per image) to train an epoch of Fashion-MNIST in about a minute on
two CPU cores and to reach about 91–92 % within a few epochs, which makes it the network of the quick
end-to-end runs and tests. The input must be 28×28: the classifier expects a 7×7 map.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import activation_factory, conv_bn_act, init_weights, make_dropout, make_pool
from .registry import register
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["FashionCNN"]


class FashionCNN(nn.Module):
    """conv(1→32) · pool · conv(32→64) · pool · conv(64→64) · linear(3136→128) · linear(128→classes).

    Each conv is followed by BatchNorm and an activation, the hidden linear layer by an activation.
    Multiply-accumulates per 28×28 image (counted in ``tests/test_models.py``)::

        conv 1→32   @28×28   28·28·32·1·9   =   225,792
        conv 32→64  @14×14   14·14·64·32·9  = 3,612,672
        conv 64→64  @7×7      7·7·64·64·9   = 1,806,336
        linear 3136→128                     =   401,408
        linear 128→10                       =     1,280
        total                               = 6,047,488  (≈ 6.0 M MACs; pools and BN not counted)

    4 activations.
    """

    def __init__(
        self,
        num_classes: int = 10,
        activation: str = "clip",
        levels: int | None = 4,
        init_threshold: float = DEFAULT_INIT_THRESHOLD,
        per_channel: bool = False,
        in_channels: int = 1,
        pool: str = "avg",
        dropout: float = 0.0,
        hidden: int = 128,
    ):
        super().__init__()
        act = activation_factory(activation, levels, init_threshold, per_channel)
        self.features = nn.Sequential(
            *conv_bn_act(in_channels, 32, act),
            make_pool(pool, 2, 2),
            *conv_bn_act(32, 64, act),
            make_pool(pool, 2, 2),
            *conv_bn_act(64, 64, act),
        )
        self.classifier = nn.Sequential(
            make_dropout(dropout),
            nn.Linear(64 * 7 * 7, hidden),
            act(hidden),
            make_dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("cnn-fmnist", {"in_channels": 1, "image_size": 28, "stem": None, "stems": {}})
def cnn_fmnist(stem: str | None = None, **kwargs) -> FashionCNN:
    """The small Fashion-MNIST CNN (28×28 input only; no stem variants)."""
    return FashionCNN(**kwargs)
