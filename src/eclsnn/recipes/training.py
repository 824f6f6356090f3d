"""``eclsnn train``: train a network by its config (eclsnn.training does the work), after checking that
the output folder can be written."""

from __future__ import annotations

from pathlib import Path

from eclsnn.config import Config
from eclsnn.recipes.common import check_output
from eclsnn.training.trainer import train as _train

__all__ = ["train"]


def train(cfg: Config) -> Path:
    """Check ``train.output`` (a folder that can be created or written), then train; returns the run folder."""
    check_output(cfg.train.output, folder=True, what="train.output")
    return _train(cfg)
