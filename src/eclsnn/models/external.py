"""Models by name from torchvision and timm: ``"torchvision:resnet18"``, ``"timm:resnet18d"``.

A name is looked up in that library's own model registry only (``torchvision.models.list_models`` /
``get_model``, ``timm.list_models`` / ``create_model``), never imported from an arbitrary path: checkpoints
store the name, and loading a checkpoint must not run code the name points to. The models are built with
random weights (no downloads); the libraries are imported when a name is first used, and eclsnn depends on
neither.

The zoo's keyword arguments mean the same here (docs/MODELS.md):

- ``activation="relu"``: the network as the library builds it; ``"clip"``: the same after
  :func:`eclsnn.prepare` (each ReLU / ReLU6 a :class:`~eclsnn.ThresholdClip`; an ``fx.GraphModule``).
- ``pool="max"`` keeps the library's max pooling; ``"avg"`` replaces every ``MaxPool`` module by average
  pooling with the same window (converts exactly; docs/METHOD.md, "Max pooling").
- ``in_channels``: the first convolution is rebuilt for that many input channels (timm: its ``in_chans``).
- ``stem="small"`` (for small images such as 28×28 or 32×32): the first convolution becomes a 3×3 stride-1
  convolution and a max pool before the second convolution (the stem pool) is dropped.
"""

from __future__ import annotations

import difflib
import importlib

import torch
from torch import nn

from eclsnn.errors import ConfigError, ConversionError

__all__ = ["LIBRARIES", "STEMS", "is_external", "split_arch", "list_external", "check_arch", "create_external"]

#: prefix -> what to install
LIBRARIES = {"torchvision": "torchvision", "timm": "timm"}
#: input adaptations (``stem``) of external models; None: as the library builds it
STEMS = ("small",)

# Classification models whose constructors need a keyword to give one output (GoogLeNet and Inception v3
# return auxiliary logits while training unless told not to).
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                       "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_external(arch: object) -> bool:
    """Whether ``arch`` names a model of an external library (``"LIBRARY:NAME"``)."""
    return isinstance(arch, str) and arch.partition(":")[0] in LIBRARIES and ":" in arch


def split_arch(arch: str) -> tuple[str, str]:
    library, _, name = arch.partition(":")
    if library not in LIBRARIES or not name:
        raise ConfigError(f"model {arch!r}: external models are named 'torchvision:NAME' or 'timm:NAME'")
    return library, name


def _import(library: str, arch: str):
    try:
        return importlib.import_module(library)
    except Exception as exc:  # noqa: BLE001 - missing, or built for another torch (a RuntimeError at import)
        raise ConfigError(
            f"model {arch!r} needs {library}, which could not be imported ({type(exc).__name__}: {exc}); install a "
            f"{library} build that matches your torch {torch.__version__}: pip install {LIBRARIES[library]}"
        ) from None


def list_external(library: str) -> list[str]:
    """The classification models of ``library`` (its registry's names), sorted."""
    lib = _import(library, f"{library}:")
    if library == "torchvision":
        return sorted(lib.models.list_models(module=lib.models))
    return sorted(lib.list_models())


def check_arch(arch: str) -> None:
    """Raise a ConfigError unless ``arch`` names a model in its library's registry."""
    library, name = split_arch(arch)
    names = list_external(library)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(repr(f'{library}:{c}') for c in close)}?)" if close else ""
        raise ConfigError(f"unknown model {arch!r}{hint}: {library} has no classification model named {name!r}")


def _build(library: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    lib = _import(library, f"{library}:{name}")
    if library == "torchvision":
        model = lib.models.get_model(name, weights=None, num_classes=num_classes, **_TORCHVISION_KWARGS.get(name, {}))
        return _adapt_first_conv(model, in_channels, small=False) if in_channels != 3 else model
    return lib.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _first(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, kind)), None)


def _set(model: nn.Module, qualname: str, module: nn.Module) -> None:
    owner, _, attr = qualname.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def _adapt_first_conv(model: nn.Module, in_channels: int, small: bool) -> nn.Module:
    """Rebuild the first convolution for ``in_channels`` (and as 3×3 stride 1 with ``small``)."""
    found = _first(model, nn.Conv2d)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} input channels")
    name, conv = found
    kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if small else (conv.kernel_size, conv.stride, conv.padding)
    _set(model, name, nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, 1 if small else conv.dilation,
                                bias=conv.bias is not None, padding_mode=conv.padding_mode))
    return model


def _drop_stem_pool(model: nn.Module) -> None:
    """Replace a max pool that comes before the second convolution (in module order) by the identity."""
    convs = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            convs += 1
            if convs >= 2:
                return
        elif isinstance(mod, nn.MaxPool2d):
            _set(model, name, nn.Identity())
            return


def _avg_pools(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            if mod.dilation not in (1, (1, 1)) or mod.return_indices:
                raise ConfigError(f"pool = 'avg': the max pool {name} has dilation or returns indices; use pool = 'max'")
            _set(model, name, nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode,
                                           count_include_pad=False))


def create_external(arch: str, num_classes: int, activation: str = "relu", levels: int | None = 4,
                    init_threshold: float = 1.0, per_channel: bool = False, in_channels: int | None = None,
                    pool: str = "max", stem: str | None = None, dropout: float = 0.0) -> nn.Module:
    """Build ``arch`` (``"torchvision:NAME"`` or ``"timm:NAME"``) with random weights; the arguments are
    those of :func:`eclsnn.models.create` (module docstring). Raises ConfigError for an unknown name, a
    missing library or an option external models do not take."""
    from eclsnn.conversion.converter import prepare

    library, name = split_arch(arch)
    check_arch(arch)
    if stem is not None and stem not in STEMS:
        raise ConfigError(f"unknown stem {stem!r} for {arch!r}; external models take stem = '' (as built) or "
                          f"{', '.join(repr(s) for s in STEMS)}")
    if dropout:
        raise ConfigError(f"model {arch!r} brings its own dropout; leave model.dropout = 0 (got {dropout})")
    model = _build(library, name, num_classes, in_channels or 3)
    if stem == "small":
        _adapt_first_conv(model, in_channels or 3, small=True)
        _drop_stem_pool(model)
    if pool == "avg":
        _avg_pools(model)
    if activation == "relu":
        return model
    # λ starts at init_threshold, and training moves it (train.init_from starts from a trained ReLU network
    # with λ from its activations instead).
    try:
        return prepare(model, levels=levels, init_threshold=init_threshold, per_channel=per_channel, maxpool="swap")
    except ConversionError as exc:
        raise ConfigError(f"model {arch!r} with activation = 'clip': {exc}") from None
