"""eclsnn — ANN-to-SNN conversion with error compensation learning (Liu et al., ICML 2025).

Train with :class:`ThresholdClip` in place of ReLU, :func:`convert` to integrate-and-fire neurons
(dual-threshold by default, membrane starting at θ/2), and :func:`simulate` / :func:`evaluate` at any
number of time steps. :class:`SpikingLoop` (``train.snn_epochs``) fine-tunes the ANN on its own SNN's
activations at a small T.
"""

from .clip import ThresholdClip
from .convert import convert, fold_batchnorm, prepare
from .errors import CheckpointError, ConfigError, ConversionError, DataError, EclsnnError, SimulationError
from .finetune import SpikingLoop
from .neurons import DualThresholdIFNeuron, IFNeuron, SpikingNeuron
from .nir_io import from_nir, to_nir
from .simulate import SpikingNetwork, evaluate, evaluate_ann, simulate

__version__ = "0.1.0"

__all__ = [
    "ThresholdClip",
    "IFNeuron",
    "DualThresholdIFNeuron",
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
    "EclsnnError",
    "ConversionError",
    "SimulationError",
    "ConfigError",
    "CheckpointError",
    "DataError",
]
