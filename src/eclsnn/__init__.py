"""eclsnn — ANN-to-SNN conversion with error compensation learning (Liu et al., ICML 2025).

Train with :class:`ThresholdClip` in place of ReLU, :func:`convert` to integrate-and-fire neurons
(dual-threshold by default, membrane starting at θ/2), and :func:`simulate` / :func:`evaluate` at any
number of time steps. :class:`SpikingLoop` (``train.snn_epochs``) fine-tunes the ANN on its own SNN's
activations at a small T.
"""

from eclsnn.core.clip import ThresholdClip
from eclsnn.conversion.converter import convert, fold_batchnorm, prepare
from eclsnn.core.backends import use_backend
from eclsnn.errors import (BackendError, CheckpointError, ConfigError, ConversionError, DataError, EclsnnError,
                           SimulationError, SpikingLoopError, TrainingError)
from eclsnn.training.spiking_loop import SpikingLoop
from eclsnn.core.neurons import BurstNeuron, DualThresholdIFNeuron, IFNeuron, SpikingNeuron
from eclsnn.io.nir import from_nir, to_nir
from eclsnn.simulation import SpikingNetwork, evaluate, evaluate_ann, simulate

from eclsnn._util import __version__

__all__ = [
    "ThresholdClip",
    "IFNeuron",
    "DualThresholdIFNeuron",
    "BurstNeuron",
    "SpikingNeuron",
    "SpikingNetwork",
    "convert",
    "prepare",
    "SpikingLoop",
    "fold_batchnorm",
    "simulate",
    "evaluate",
    "evaluate_ann",
    "to_nir",
    "from_nir",
    "use_backend",
    "EclsnnError",
    "BackendError",
    "ConversionError",
    "SimulationError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "TrainingError",
    "SpikingLoopError",
]
