"""The settings of one command: the checkpoint's own config (if any), then a TOML file, then
``section.key`` overrides (the command line's ``--set`` and named flags)."""

from __future__ import annotations

import os
from typing import Any

from eclsnn.config import Config, config_from_dict, config_to_dict, load_config

__all__ = ["layered_config"]


def layered_config(overrides: dict[str, Any] | None = None, config_path: str | os.PathLike | None = None,
                   base: dict[str, Any] | None = None) -> Config:
    """Config from ``base`` (a checkpoint's stored config) ← ``config_path`` ← ``overrides``. A config file
    replaces the checkpoint's config as a whole."""
    overrides = dict(overrides or {})
    if config_path:
        return load_config(config_path, overrides)
    if base is not None:
        cfg = config_from_dict(base, source="the checkpoint's config")
        flat = {f"{section}.{key}": value for section, values in config_to_dict(cfg).items() for key, value in values.items()}
        return load_config(None, {**flat, **overrides})
    return load_config(None, overrides)
