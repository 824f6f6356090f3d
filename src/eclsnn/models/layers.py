"""Building blocks shared by every model of the zoo: activations, pooling, dropout, conv–BN–act.

Conversion to a spiking network (docs/METHOD.md, "What conversion must handle") puts three demands on them:
every activation is its own module (its threshold λ becomes one layer's θ), BatchNorm sits directly
after the convolution it folds into (so that convolution has no bias), and average pooling is the
default because max pooling has no exact spiking form.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConfigError
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = [
    "ACTIVATIONS",
    "POOLS",
    "ActivationFactory",
    "make_activation",
    "activation_factory",
    "make_pool",
    "make_dropout",
    "conv_bn_act",
    "init_weights",
]

#: Values accepted for ``activation``: the learnable threshold clip of the paper, or plain ReLU.
ACTIVATIONS = ("clip", "relu")
#: Values accepted for ``pool``: average pooling (converts exactly) or max pooling.
POOLS = ("avg", "max")

#: Builds a fresh activation module for a layer with the given number of channels.
ActivationFactory = Callable[[int], nn.Module]


def _check_choice(kind: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


def _check_clip_args(levels: int | None, init_threshold: float) -> None:
    if levels is not None and (isinstance(levels, bool) or int(levels) != levels or levels < 0):
        raise ConfigError(f"levels must be a non-negative integer or None, got {levels!r}")
    if not init_threshold > 0:
        raise ConfigError(f"init_threshold must be positive, got {init_threshold!r}")


def make_activation(
    activation: str = "clip",
    levels: int | None = 4,
    init_threshold: float = DEFAULT_INIT_THRESHOLD,
    per_channel: bool = False,
    num_channels: int | None = None,
) -> nn.Module:
    """A new activation module: ``"clip"`` → :class:`~eclsnn.ThresholdClip`, ``"relu"`` → ``nn.ReLU()``.

    ``levels``, ``init_threshold``, ``per_channel`` and ``num_channels`` (the width λ gets with
    ``per_channel``) only concern ``"clip"``. Call it once per layer: a shared module would force
    one threshold on several layers and is called twice in the traced graph.
    """
    _check_choice("activation", activation, ACTIVATIONS)
    if activation == "relu":
        return nn.ReLU()
    _check_clip_args(levels, init_threshold)
    return ThresholdClip(
        levels=levels, init_threshold=init_threshold, per_channel=per_channel, num_channels=num_channels
    )


def activation_factory(
    activation: str = "clip", levels: int | None = 4, init_threshold: float = DEFAULT_INIT_THRESHOLD, per_channel: bool = False
) -> ActivationFactory:
    """Validate the activation settings once and return ``num_channels -> new activation module``."""
    _check_choice("activation", activation, ACTIVATIONS)
    if activation == "clip":
        _check_clip_args(levels, init_threshold)

    def factory(num_channels: int) -> nn.Module:
        return make_activation(activation, levels, init_threshold, per_channel, num_channels)

    return factory


def make_pool(pool: str, kernel_size: int, stride: int | None = None, padding: int = 0) -> nn.Module:
    """``nn.AvgPool2d`` for ``"avg"`` (the default of every model), ``nn.MaxPool2d`` for ``"max"``."""
    _check_choice("pool", pool, POOLS)
    if pool == "avg":
        return nn.AvgPool2d(kernel_size, stride, padding)
    return nn.MaxPool2d(kernel_size, stride, padding)


def make_dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` for ``p = 0`` so the default graph carries no dropout."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p!r}")
    return nn.Dropout(p) if p > 0 else nn.Identity()


def conv_bn_act(
    in_channels: int, out_channels: int, act: ActivationFactory, kernel_size: int = 3, stride: int = 1
) -> list[nn.Module]:
    """``[Conv2d (no bias, 'same' padding for odd kernels), BatchNorm2d, activation]``."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        act(out_channels),
    ]


def init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions (He et al., ICCV 2015), unit/zero BatchNorm affine."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
