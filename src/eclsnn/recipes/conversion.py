"""Convert a trained checkpoint: the one place that knows how (ReLU networks get their thresholds from
the validation split, by the ``[convert]`` settings; clip networks need no data)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn.config import Config
from eclsnn.conversion.converter import convert
from eclsnn.core.clip import ThresholdClip
from eclsnn.io.checkpoint import Checkpoint
from eclsnn.recipes.common import calibration_batches, check_output, convert_kwargs, load_ann, save_snn
from eclsnn.recipes.settings import layered_config
from eclsnn.simulation import SpikingNetwork

__all__ = ["needs_calibration", "relu_thresholds", "convert_checkpoint", "convert_to_folder"]

_CALIBRATION_KEYS = ("maxpool", "threshold_rule", "percentile")


def needs_calibration(model: nn.Module) -> bool:
    """True for ReLU networks (no ThresholdClip): their thresholds come from data."""
    return not any(isinstance(m, ThresholdClip) for m in model.modules())


def relu_thresholds(model: nn.Module, ckpt: Checkpoint, cfg: Config, device: str | torch.device = "cpu",
                    batch_size: int | None = None, threshold_rule: str | None = None) -> dict[str, torch.Tensor] | None:
    """θ of every ReLU layer from ``cfg.convert.calibration_batches`` batches of the validation split (of the
    checkpoint's seed), by ``cfg.convert``'s rule (or ``threshold_rule``); None for a clip network."""
    if not needs_calibration(model):
        return None
    seed = ckpt.meta.get("seed", cfg.train.seed)
    calib = calibration_batches(cfg.data, seed, batch_size or cfg.evaluate.batch_size, cfg.convert.calibration_batches, device)
    kwargs = {k: v for k, v in convert_kwargs(cfg.convert).items() if k in _CALIBRATION_KEYS}
    if threshold_rule is not None:
        kwargs["threshold_rule"] = threshold_rule
    return convert(model, calibration=calib, **kwargs).thresholds()


def convert_checkpoint(model: nn.Module, ckpt: Checkpoint, cfg: Config, variants: dict[str, dict[str, Any]] | None = None,
                       device: str | torch.device = "cpu", batch_size: int | None = None,
                       thresholds: dict[str, torch.Tensor] | None = None) -> dict[str, SpikingNetwork]:
    """The checkpoint's ANN converted as each of ``variants`` (name → :func:`eclsnn.convert` keyword
    arguments over ``cfg.convert``'s); None: one variant, ``cfg.convert`` itself, named by its neuron.
    ReLU networks are calibrated once (:func:`relu_thresholds`, unless ``thresholds`` are given) and every
    variant gets the same thresholds."""
    base = convert_kwargs(cfg.convert)
    if variants is None:
        variants = {base["neuron"]: {}}
    if thresholds is None:
        thresholds = relu_thresholds(model, ckpt, cfg, device, batch_size)
    return {name: convert(model, thresholds=thresholds, **{**base, **kw}) for name, kw in variants.items()}


def convert_to_folder(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None,
                      overrides: dict[str, Any] | None = None, config_path: str | os.PathLike | None = None):
    """``eclsnn convert``: convert a checkpoint by its config (← ``config_path`` ← ``overrides``) and save
    the SNN folder (default ``RUN/snn-<neuron>``). Returns ``(folder, snn, convert kwargs, checkpoint)``."""
    model, ckpt = load_ann(checkpoint)
    cfg = layered_config(overrides, config_path, ckpt.meta.get("config"))
    kwargs = convert_kwargs(cfg.convert)
    out = check_output(Path(output) if output else ckpt.path.parent.parent / f"snn-{kwargs['neuron']}", folder=True)
    snn = convert_checkpoint(model, ckpt, cfg)[kwargs["neuron"]]
    save_snn(out, ckpt.path, snn, kwargs)
    return out, snn, kwargs, ckpt
