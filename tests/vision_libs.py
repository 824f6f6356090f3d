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

__all__ = ["import_vision_libs", "vision_libs_available", "SHIMMED_OPERATORS"]

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
