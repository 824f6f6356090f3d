"""Small helpers every layer may use (nothing of eclsnn's own is imported here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["__version__", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "DEFAULT_INIT_THRESHOLD"]

#: the package version (eclsnn.__version__; checkpoints record it)
__version__ = "0.1.0"

#: the initial λ of every ThresholdClip, wherever one is made (config, models.create, ThresholdClip, prepare);
#: chosen on the validation split by ``benchmarks/tune_init_threshold.py`` (docs/METHOD.md)
DEFAULT_INIT_THRESHOLD = 2.0


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either the old file or the whole new
    one: a temporary file beside it, flushed and fsynced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
