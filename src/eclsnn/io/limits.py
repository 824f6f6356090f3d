"""The limits on what eclsnn reads, re-exported from :mod:`eclsnn.limits` (their one home, below the data
layer, which reads files too)."""

from eclsnn.limits import (  # noqa: F401 - re-exported
    DEFAULT_MAX_LOAD_BYTES,
    LOAD_LIMIT_ENV,
    MAX_IMAGE_VALUES,
    MAX_IN_CHANNELS,
    MAX_JSON_BYTES,
    MAX_NUM_CLASSES,
    MAX_SEED,
    load_limit_hint,
    max_load_bytes,
)

__all__ = ["LOAD_LIMIT_ENV", "DEFAULT_MAX_LOAD_BYTES", "MAX_JSON_BYTES", "MAX_NUM_CLASSES", "MAX_IN_CHANNELS",
           "MAX_IMAGE_VALUES", "MAX_SEED", "max_load_bytes", "load_limit_hint"]
