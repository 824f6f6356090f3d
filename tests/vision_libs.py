"""torchvision and timm model definitions for the tests and benchmarks, on any torch build.

A torchvision wheel built against another torch build (here: a CUDA build next to our CPU torch) fails at
``import torchvision``: its compiled operators do not load, and its meta registrations then fail with
"operator torchvision::nms does not exist". Its model definitions are plain Python and need none of those
operators. :func:`import_vision_libs` imports torchvision as it is; only when that import fails this way it
defines the schemas of the two operators that torchvision registers unconditionally (``nms``, ``qnms``; no
kernels: calling them still fails) and imports again. Where torchvision imports cleanly nothing is changed,
so a user with a matching torch and torchvision sees no workaround; the library itself
(``eclsnn.models.external``) never uses this module.

The versions are pinned in ``tests/requirements-zoo.txt`` (installed with ``--no-deps`` so that pip never
replaces torch; ``make test`` does it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["import_vision_libs", "vision_libs_available", "version", "synthetic_images", "recalibrate_batchnorm",
           "SHIMMED_OPERATORS"]

#: the torchvision operators registered at import time whatever the build (``torchvision/_meta_registrations.py``)
SHIMMED_OPERATORS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # the torch.library fragment holding the schemas (kept alive for the process)
shimmed = False  # True once the schemas had to be defined


def _define_schemas() -> None:
    global _LIBRARY, shimmed
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in SHIMMED_OPERATORS.items():
            if not hasattr(torch.ops.torchvision, name):
                _LIBRARY.define(schema)
        shimmed = True


def _import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    _define_schemas()
    return importlib.import_module("torchvision")


def import_vision_libs():
    """``(torchvision, timm)``, importing torchvision through the schema shim if it needs one."""
    torchvision = _import_torchvision()
    import timm

    return torchvision, timm


def vision_libs_available() -> bool:
    """Whether torchvision and timm are installed (not whether they import; :func:`import_vision_libs` says)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torchvision", "timm"))


def version(module: str) -> str:
    """The installed version of ``module`` (without importing it)."""
    from importlib.metadata import version as installed

    return installed(module)


# ---- random-weight models that mean something (tests/test_zoo.py, benchmarks/zoo_coverage.py) ----------------

def synthetic_images(n: int, seed: int, side: int = 64) -> torch.Tensor:
    """``n`` smooth random images ``[n, 3, side, side]``: an 8×8 Gaussian field upsampled, plus a little pixel
    noise (fixed ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False) + \
        0.1 * torch.randn(n, 3, side, side, generator=g)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """Replace every BatchNorm's running statistics by those of ``images`` (a cumulative average; dropout
    off), so that a randomly initialised network's activations have a trained network's scale; returns
    the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    if norms:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        with torch.no_grad():
            for batch in images.split(batch_size):
                model(batch)
    return model.eval()
