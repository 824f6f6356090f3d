"""Exceptions a user can cause. Each message says what went wrong and what to do about it."""


class EclsnnError(Exception):
    """Base class of every error eclsnn raises on purpose."""


class ConversionError(EclsnnError, ValueError):
    """The network cannot be converted faithfully (unsupported operation, missing calibration, ...)."""


class SimulationError(EclsnnError, ValueError):
    """Bad arguments to the simulator (time steps, input shape, non-finite values, ...)."""


class ConfigError(EclsnnError, ValueError):
    """A configuration file or flag is missing, unknown or ill-typed."""


class CheckpointError(EclsnnError, ValueError):
    """A checkpoint is missing, corrupt, unsafe to load or for another architecture."""


class DataError(EclsnnError, ValueError):
    """A data set cannot be found or read."""


class TrainingError(EclsnnError):
    """Training cannot continue (a non-finite loss or non-finite weights)."""


class SpikingLoopError(EclsnnError):
    """The network cannot be trained with its spiking network in the loop."""


class BackendError(EclsnnError, ValueError):
    """An unknown backend name, or a backend that was asked for and cannot run here."""


class ThresholdWarning(UserWarning):
    """A stored threshold (a clip's λ, a neuron's θ) sits at or below the floor that training and conversion
    keep thresholds above (``eclsnn.core.functional.LAMBDA_MIN``): the layer then passes at most that much
    per step, and a value below it is used as the floor."""
