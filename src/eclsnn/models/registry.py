"""The model registry (in the manner of timm's ``create_model``): a name → builder map, one entry per
architecture, plus each model's default input (:data:`MODEL_DEFAULTS`).

A builder is a function taking keyword arguments only — ``num_classes, activation, levels,
init_threshold, per_channel, in_channels, pool, stem, dropout`` — and returning an ``nn.Module``.
:func:`create` validates the arguments and fills in the model's defaults before calling it, so
builders can trust what they get.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from eclsnn.errors import ConfigError
from .external import create_external, is_external
from .layers import ACTIVATIONS, POOLS, _check_choice, _check_clip_args
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["MODEL_DEFAULTS", "register", "create", "list_models", "input_size"]

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}

#: Per model: ``in_channels`` and ``image_size`` (square side) of its default input, its default
#: ``stem`` (``None`` for models without variants) and ``stems``, the accepted stems mapped to the
#: input side each one expects (absent or empty: the model has no stem variants).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {}


def register(name: str, defaults: dict[str, Any] | None = None) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to the registry under ``name``.

    ``defaults`` goes to :data:`MODEL_DEFAULTS` (keys ``in_channels``, ``image_size``, ``stem``,
    ``stems``; missing keys mean 3 channels, 32×32, no stem variants).
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ConfigError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = builder
        MODEL_DEFAULTS[name] = {"in_channels": 3, "image_size": 32, "stem": None, "stems": {}, **(defaults or {})}
        return builder

    return decorator


def list_models() -> list[str]:
    """The names :func:`create` accepts, sorted."""
    return sorted(_REGISTRY)


def _unknown_model(name: object) -> ConfigError:
    available = list_models()
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown model {name!r}{hint}; available models: {', '.join(available)}")


def _resolve_stem(name: str, stem: str | None) -> str | None:
    defaults = MODEL_DEFAULTS[name]
    stems = defaults.get("stems") or {}
    if stem is None:
        return defaults.get("stem")
    if not stems:
        raise ConfigError(f"model {name!r} has no stem variants; leave stem unset (got {stem!r})")
    if stem not in stems:
        raise ConfigError(f"unknown stem {stem!r} for model {name!r}; choose one of: {', '.join(stems)}")
    return stem


def _check_positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def create(
    name: str,
    num_classes: int,
    activation: str = "clip",
    levels: int | None = 4,
    init_threshold: float = DEFAULT_INIT_THRESHOLD,
    per_channel: bool = False,
    in_channels: int | None = None,
    pool: str = "avg",
    stem: str | None = None,
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Module:
    """Build model ``name`` of the zoo (see :func:`list_models`), or ``"torchvision:NAME"`` / ``"timm:NAME"``
    from those libraries' registries (:mod:`eclsnn.models.external`; random weights).

    Args:
        num_classes: width of the final ``nn.Linear`` readout.
        activation: ``"clip"`` (learnable threshold clip, :class:`~eclsnn.ThresholdClip`) or ``"relu"``.
        levels: quantisation levels L of the clip (``None``/0: plain ``clamp(z, 0, λ)``).
        init_threshold: initial λ of every clip.
        per_channel: one λ per channel instead of one per layer.
        in_channels: input channels; default from :data:`MODEL_DEFAULTS`.
        pool: ``"avg"`` (converts exactly) or ``"max"``.
        stem: input stem variant, e.g. ``"cifar"`` or ``"imagenet"``; default from :data:`MODEL_DEFAULTS`.
        dropout: dropout probability before the classifier's linear layers (0 = none).
        width: channel multiplier of the models that have one (``MODEL_DEFAULTS[name]["width"]``; vgg16).

    Raises:
        ConfigError: unknown name, activation, pool or stem, or an out-of-range argument.
    """
    if is_external(name):  # "torchvision:NAME" / "timm:NAME" (models/external.py)
        _check_external_args(num_classes, activation, levels, init_threshold, pool, in_channels)
        return create_external(name, num_classes, activation, levels, float(init_threshold), bool(per_channel),
                               in_channels, pool, stem, float(dropout))
    if name not in _REGISTRY:
        raise _unknown_model(name)
    _check_positive_int("num_classes", num_classes)
    _check_choice("activation", activation, ACTIVATIONS)
    if activation == "clip":
        _check_clip_args(levels, init_threshold)
    _check_choice("pool", pool, POOLS)
    if in_channels is None:
        in_channels = MODEL_DEFAULTS[name]["in_channels"]
    _check_positive_int("in_channels", in_channels)
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width <= 64.0:
        raise ConfigError(f"width must be a number in (0, 64], got {width!r}")
    extra = {}
    if width != 1.0:
        if not MODEL_DEFAULTS[name].get("width"):
            with_width = sorted(n for n, d in MODEL_DEFAULTS.items() if d.get("width"))
            raise ConfigError(f"model {name!r} has no width option (models with one: {', '.join(with_width)}); "
                              "leave width at 1")
        extra["width"] = float(width)
    return _REGISTRY[name](
        num_classes=num_classes,
        activation=activation,
        levels=levels,
        init_threshold=float(init_threshold),
        per_channel=bool(per_channel),
        in_channels=in_channels,
        pool=pool,
        stem=_resolve_stem(name, stem),
        dropout=float(dropout),
        **extra,
    )


def _check_external_args(num_classes, activation, levels, init_threshold, pool, in_channels) -> None:
    _check_positive_int("num_classes", num_classes)
    _check_choice("activation", activation, ACTIVATIONS)
    if activation == "clip":
        _check_clip_args(levels, init_threshold)
    _check_choice("pool", pool, POOLS)
    if in_channels is not None:
        _check_positive_int("in_channels", in_channels)


def input_size(name: str, stem: str | None = None, in_channels: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the input model ``name`` expects with the given stem (default: its default stem;
    an external model: 224 px as built, 32 px with ``stem="small"``)."""
    if is_external(name):
        side = 32 if stem == "small" else 224
        return (in_channels or 3, side, side)
    if name not in _REGISTRY:
        raise _unknown_model(name)
    defaults = MODEL_DEFAULTS[name]
    stem = _resolve_stem(name, stem)
    side = (defaults.get("stems") or {}).get(stem, defaults["image_size"])
    return (in_channels or defaults["in_channels"], side, side)
