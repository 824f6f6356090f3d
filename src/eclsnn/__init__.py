"""eclsnn — ANN-to-SNN conversion with error compensation learning (Liu et al., ICML 2025)."""

from .clip import ThresholdClip
from .errors import CheckpointError, ConfigError, ConversionError, DataError, EclsnnError, SimulationError

__version__ = "0.1.0"

__all__ = [
    "ThresholdClip",
    "EclsnnError",
    "ConversionError",
    "SimulationError",
    "ConfigError",
    "CheckpointError",
    "DataError",
]
