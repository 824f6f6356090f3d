"""SNN folders: a converted network saved as what rebuilds it — the ANN checkpoint's path, the
conversion settings (JSON) and the thresholds θ (safetensors), never a pickled module."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn._util import atomic_write_json
from eclsnn.conversion.converter import convert
from eclsnn.errors import CheckpointError
from eclsnn.io.checkpoint import Checkpoint, build_model, load_checkpoint, resolve_checkpoint
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
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        spec = json.loads((folder / SNN_SPEC).read_text())
        thetas = load_file(str(folder / SNN_THRESHOLDS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the SNN in {folder}: {exc}; convert the checkpoint again with 'eclsnn convert'") from None
    if spec.get("format") != "eclsnn-snn":
        raise CheckpointError(f"{folder / SNN_SPEC} is not an eclsnn SNN description")
    model, ckpt = load_ann(spec["checkpoint"], device)
    kwargs = convert_kwargs(spec["convert"])
    relu_thetas = {k: v for k, v in thetas.items() if not _is_clip_layer(model, k)}
    snn = convert(model, thresholds=relu_thetas or None, **kwargs)
    return snn, model, ckpt, spec


def _is_clip_layer(model: nn.Module, name: str) -> bool:
    """Whether neuron ``name`` takes its θ from a learned λ (else it was calibrated, e.g. a ReLU
    module or a functional ReLU that conversion gave its own module)."""
    from eclsnn.core.clip import ThresholdClip

    try:
        return isinstance(model.get_submodule(name), ThresholdClip)
    except AttributeError:
        return False
