"""Shared by the NIR export and import (docs/NIR.md): the format marker, the metadata key, the warning
class, the lazy import of the ``nir`` package and small numeric helpers."""

from __future__ import annotations


import numpy as np
import torch

from eclsnn.errors import ConversionError

FORMAT = {"name": "eclsnn-nir", "version": 1}
NEURON_FORMS = ("exact", "if")
META = "eclsnn"  # key of eclsnn's record in NIR node and graph metadata
_INSTALL = 'NIR support needs the nir package: pip install "eclsnn[nir]"'


class NIRExportWarning(UserWarning):
    """Part of the network's dynamics is stored only in NIR node metadata (see ``docs/NIR.md``)."""


def _nir():
    try:
        import nir
    except ImportError:
        raise ConversionError(_INSTALL) from None
    return nir


def _f32(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _below(c: np.ndarray) -> np.ndarray:
    """The largest float32 below ``c``: for float32 ``u``, ``u > _below(c)`` exactly when ``u ≥ c``."""
    return np.nextafter(c.astype(np.float32), np.float32(-np.inf)).astype(np.float32)


def _above(c: np.ndarray) -> np.ndarray:
    return np.nextafter(c.astype(np.float32), np.float32(np.inf)).astype(np.float32)


def _pair(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))

