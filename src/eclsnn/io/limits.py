"""Bounds on what eclsnn reads from files, checked before anything is allocated: a file may declare any
size, and a number read from it must not decide how much memory the process takes.

- :func:`max_load_bytes`: the most bytes of arrays one file may hold (a checkpoint's safetensors files,
  an SNN folder's thresholds, a NIR graph), 4 GiB unless ``ECLSNN_MAX_LOAD_BYTES`` says otherwise —
  a network larger than that is legitimate, so the limit can be raised;
- :data:`MAX_JSON_BYTES`: the most bytes of one JSON file of a checkpoint or SNN folder (they hold
  settings and structure, never arrays);
- :data:`MAX_NUM_CLASSES`, :data:`MAX_IN_CHANNELS`, :data:`MAX_IMAGE_VALUES`: sizes a checkpoint's
  ``meta.json`` gives the model and its input (ImageNet's classes and images are far below them);
- :data:`MAX_SEED`: the seeds eclsnn accepts (numpy's range; the data loader's ``seed · 1 000 003 +
  epoch`` then stays within the 64 bits of a torch generator).
"""

from __future__ import annotations

import os

from eclsnn.errors import ConfigError

__all__ = ["LOAD_LIMIT_ENV", "DEFAULT_MAX_LOAD_BYTES", "MAX_JSON_BYTES", "MAX_NUM_CLASSES", "MAX_IN_CHANNELS",
           "MAX_IMAGE_VALUES", "MAX_SEED", "max_load_bytes", "load_limit_hint"]

LOAD_LIMIT_ENV = "ECLSNN_MAX_LOAD_BYTES"
DEFAULT_MAX_LOAD_BYTES = 4 * 2**30
MAX_JSON_BYTES = 64 * 2**20
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANNELS = 4096
MAX_IMAGE_VALUES = 2**26  # channels x image_size^2 of one input image
MAX_SEED = 2**32 - 1


def max_load_bytes() -> int:
    """The most bytes of arrays eclsnn reads from one file: ``ECLSNN_MAX_LOAD_BYTES`` (a positive integer)
    or 4 GiB."""
    raw = os.environ.get(LOAD_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_LOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{LOAD_LIMIT_ENV}={raw!r} must be a positive number of bytes, e.g. {LOAD_LIMIT_ENV}={2**33}")
    return value


def load_limit_hint(declared: int) -> str:
    """The end of the message that refuses ``declared`` bytes: the limit and how to raise it."""
    return (f"more than the {max_load_bytes()} bytes eclsnn loads from one file; if the network really is that "
            f"large, set {LOAD_LIMIT_ENV} to at least {declared}")
