"""``eclsnn train``: train a network by its config (eclsnn.training does the work)."""

from eclsnn.training.trainer import train

__all__ = ["train"]
