"""Every bound on what eclsnn reads from files and data, in one place, checked before anything is allocated:
a file may declare any size, and a number read from it must not decide how much memory the process takes.

Two limits guard against legitimate inputs that are merely large, so each can be raised, the same way: an
environment variable, named in the error that hits the limit.

- :func:`max_load_bytes` (``ECLSNN_MAX_LOAD_BYTES``, 4 GiB): the most bytes of one file eclsnn reads, after
  decompression — a checkpoint's safetensors files, an SNN folder's thresholds, a NIR graph's arrays, an IDX
  file of Fashion-MNIST (47 MB), a CIFAR batch file (30-150 MB);
- :func:`max_image_pixels` (``ECLSNN_MAX_IMAGE_PIXELS``): Pillow's own decompression-bomb limit,
  ``PIL.Image.MAX_IMAGE_PIXELS`` (89 million pixels; Pillow refuses images of more than twice that and warns
  above it). An image file declares its size in a few bytes of header; the limit is checked on the header,
  before any decoder (Pillow's or torchvision's) allocates. Largest ImageNet image: 16 million pixels.

The others are sizes no real network or data set comes near, fixed:

- :data:`MAX_JSON_BYTES`: the most bytes of one JSON file of a checkpoint or SNN folder (settings and
  structure, never arrays);
- :data:`MAX_NUM_CLASSES`, :data:`MAX_IN_CHANNELS`, :data:`MAX_IMAGE_VALUES`: sizes a checkpoint's
  ``meta.json`` gives the model and its input, and the classes a data set may have (its class folders, its
  largest label), and the values of one image as the evaluation transform resizes it before the centre crop;
  ImageNet's 1000 classes and 224² images are far below them;
- :data:`MAX_ARCHIVE_MEMBERS`, :data:`MAX_ARCHIVE_HEADER_BYTES`: the entries a data set's archive may have
  before the one wanted (the official CIFAR archives have at most 9) and the bytes of one extended header
  (a long name, pax attributes) in it;
- :data:`MAX_SEED`: the seeds eclsnn accepts (numpy's range; the data loader's ``seed · 1 000 003 + epoch``
  then stays within the 64 bits of a torch generator).
"""

from __future__ import annotations

import os

from eclsnn.errors import ConfigError

__all__ = ["LOAD_LIMIT_ENV", "IMAGE_PIXELS_ENV", "DEFAULT_MAX_LOAD_BYTES", "MAX_JSON_BYTES", "MAX_NUM_CLASSES",
           "MAX_IN_CHANNELS", "MAX_IMAGE_VALUES", "MAX_SEED", "MAX_ARCHIVE_MEMBERS", "MAX_ARCHIVE_HEADER_BYTES",
           "max_load_bytes", "load_limit_hint", "max_image_pixels", "image_pixels_hint"]

LOAD_LIMIT_ENV = "ECLSNN_MAX_LOAD_BYTES"
IMAGE_PIXELS_ENV = "ECLSNN_MAX_IMAGE_PIXELS"
DEFAULT_MAX_LOAD_BYTES = 4 * 2**30
MAX_JSON_BYTES = 64 * 2**20
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANNELS = 4096
MAX_IMAGE_VALUES = 2**26  # channels x image_size^2 of one input image
MAX_SEED = 2**32 - 1
MAX_ARCHIVE_MEMBERS = 64
MAX_ARCHIVE_HEADER_BYTES = 2**20


def _positive_env(name: str, example: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be a positive integer, e.g. {name}={example}")
    return value


def max_load_bytes() -> int:
    """The most bytes eclsnn reads from one file: ``ECLSNN_MAX_LOAD_BYTES`` (a positive integer) or 4 GiB."""
    value = _positive_env(LOAD_LIMIT_ENV, 2**33)
    return DEFAULT_MAX_LOAD_BYTES if value is None else value


def load_limit_hint(declared: int, what: str = "the network") -> str:
    """The end of the message that refuses ``declared`` bytes: the limit and how to raise it."""
    return (f"more than the {max_load_bytes()} bytes eclsnn loads from one file; if {what} really is that "
            f"large, set {LOAD_LIMIT_ENV} to at least {declared}")


def max_image_pixels() -> int | None:
    """``ECLSNN_MAX_IMAGE_PIXELS`` if set (it becomes ``PIL.Image.MAX_IMAGE_PIXELS`` before an image is
    opened), else None: Pillow's own limit stands."""
    return _positive_env(IMAGE_PIXELS_ENV, 2 * 89_478_485)


def image_pixels_hint() -> str:
    """How to raise the image limit, for the message that refuses an image."""
    return (f"Pillow's decompression-bomb limit (twice PIL.Image.MAX_IMAGE_PIXELS); if the images really are "
            f"that large, set {IMAGE_PIXELS_ENV} to at least half their pixel count")
