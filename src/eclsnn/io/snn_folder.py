"""SNN folders: a converted network saved as what rebuilds it — the ANN checkpoint's path, the
conversion settings (JSON) and the thresholds θ (safetensors), never a pickled module."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn._util import atomic_write_json
from eclsnn.conversion.converter import convert
from eclsnn.errors import CheckpointError, ThresholdWarning
from eclsnn.io.checkpoint import Checkpoint, build_model, load_checkpoint, resolve_checkpoint
from eclsnn.io.safetensors_io import _read_json, _read_safetensors
from eclsnn.simulation import SpikingNetwork

__all__ = ["SNN_SPEC", "SNN_THRESHOLDS", "load_ann", "convert_kwargs", "save_snn", "is_snn_folder", "load_snn"]

SNN_SPEC = "snn.json"
SNN_THRESHOLDS = "thresholds.safetensors"


def load_ann(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """The trained ANN of a checkpoint (run folder, checkpoint folder or its weights file), in eval mode."""
    ckpt = load_checkpoint(resolve_checkpoint(path))
    return build_model(ckpt).to(device).eval(), ckpt


def convert_kwargs(settings, **overrides) -> dict[str, Any]:
    """Keyword arguments of :func:`eclsnn.convert` from a ``[convert]`` section (the config's dataclass or a dict)."""
    d = asdict(settings) if not isinstance(settings, dict) else dict(settings)
    d.update(overrides)
    keys = ("neuron", "v_init", "theta_neg", "maxpool", "threshold_rule", "percentile")
    return {k: d[k] for k in keys if k in d}


def save_snn(folder: str | os.PathLike, checkpoint: Path, snn: SpikingNetwork, settings: dict[str, Any]) -> Path:
    """Save a converted SNN as what rebuilds it: the ANN checkpoint's path, the conversion settings
    (JSON) and the thresholds θ (safetensors) — never a pickled module."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    thetas = {k: v.contiguous() for k, v in snn.thresholds().items()}
    save_file(thetas, str(folder / SNN_THRESHOLDS))
    spec = {
        "format": "eclsnn-snn", "version": 1, "checkpoint": str(Path(checkpoint).resolve()), "convert": settings,
        "neurons": [{"name": k, "theta": v.tolist()} for k, v in thetas.items()],
    }
    atomic_write_json(folder / SNN_SPEC, spec, indent=2)
    return folder


def is_snn_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / SNN_SPEC).is_file()


def load_snn(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SpikingNetwork, nn.Module, Checkpoint, dict]:
    """Rebuild a saved SNN by converting its ANN checkpoint again with the stored settings and θ."""
    folder = Path(folder)
    spec_path, thetas_path = folder / SNN_SPEC, folder / SNN_THRESHOLDS
    for path in (spec_path, thetas_path):
        if not path.is_file():
            raise CheckpointError(f"cannot read the SNN in {folder}: {path.name} is missing; convert the checkpoint "
                                  "again with 'eclsnn convert'")
    spec = _read_json(spec_path)
    _check_spec(spec, spec_path)
    thetas = _read_safetensors(thetas_path)
    _check_thetas(thetas, thetas_path)
    model, ckpt = load_ann(spec["checkpoint"], device)
    kwargs = convert_kwargs(spec["convert"])
    relu_thetas = {k: v for k, v in thetas.items() if not _is_clip_layer(model, k)}
    snn = convert(model, thresholds=relu_thetas or None, **kwargs)
    return snn, model, ckpt, spec


def _check_spec(spec: Any, path: Path) -> None:
    """The fields of ``snn.json`` that :func:`load_snn` reads: a format marker, the checkpoint's path, the
    conversion settings (their values are checked by :func:`eclsnn.convert`)."""
    again = "; convert the checkpoint again with 'eclsnn convert'"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path} must be a JSON object, got {type(spec).__name__}{again}")
    if spec.get("format") != "eclsnn-snn":
        raise CheckpointError(f"{path} is not an eclsnn SNN description (no \"format\": \"eclsnn-snn\")")
    if not isinstance(spec.get("checkpoint"), str) or not spec["checkpoint"]:
        raise CheckpointError(f"{path}: field 'checkpoint' must be the path of the ANN checkpoint (a string), got "
                              f"{spec.get('checkpoint')!r}{again}")
    if not isinstance(spec.get("convert"), dict):
        raise CheckpointError(f"{path}: field 'convert' must be a JSON object of conversion settings, got "
                              f"{spec.get('convert')!r}{again}")
    for key, value in spec["convert"].items():  # their values are checked by convert; their types here
        kind = _CONVERT_TYPES.get(key)
        if kind is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
            expected = "a string" if kind is str else "a number"
            raise CheckpointError(f"{path}: field 'convert.{key}' must be {expected}, got {value!r}{again}")


_CONVERT_TYPES = {"neuron": str, "maxpool": str, "threshold_rule": str,
                  "v_init": (int, float), "theta_neg": (int, float), "percentile": (int, float)}


def _check_thetas(thetas: dict[str, torch.Tensor], path: Path) -> None:
    """θ as :func:`eclsnn.convert` writes them: floating point, finite, positive, one number or one per
    channel. Conversion clamps θ to the floor ``LAMBDA_MIN``; a stored value at it is a layer that never
    fired on the calibration data (or whose λ collapsed), which a warning says."""
    from eclsnn.core.functional import LAMBDA_MIN

    for name, theta in thetas.items():
        if not theta.dtype.is_floating_point or theta.dim() > 1:
            raise CheckpointError(f"{path}: θ of {name!r} is stored as {str(theta.dtype).removeprefix('torch.')} of "
                                  f"shape {tuple(theta.shape)}, not as floating-point numbers (one, or one per "
                                  "channel); convert the checkpoint again with 'eclsnn convert'")
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            bad = theta[~torch.isfinite(theta) | (theta <= 0)].flatten()[:4].tolist()
            raise CheckpointError(f"{path}: θ of {name!r} holds {bad}; thresholds must be finite and positive. The file "
                                  "is corrupt; convert the checkpoint again with 'eclsnn convert'")
        if (theta <= torch.tensor(LAMBDA_MIN, dtype=theta.dtype)).any():
            warnings.warn(f"{path}: θ of {name!r} sits at the floor {LAMBDA_MIN} (the layer never fired on the "
                          "calibration data, or its λ collapsed in training); it passes almost nothing",
                          ThresholdWarning, stacklevel=3)


def _is_clip_layer(model: nn.Module, name: str) -> bool:
    """Whether neuron ``name`` takes its θ from a learned λ (else it was calibrated, e.g. a ReLU
    module or a functional ReLU that conversion gave its own module)."""
    from eclsnn.core.clip import ThresholdClip

    try:
        return isinstance(model.get_submodule(name), ThresholdClip)
    except AttributeError:
        return False
