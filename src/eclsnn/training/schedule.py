"""The optimizer and its learning-rate schedule.

SGD with momentum over three parameter groups (:func:`parameter_groups`), a per-step warmup + cosine
schedule (:func:`lr_lambda`), restarted from ``train.snn_lr`` for the epochs with the SNN in the loop
(:func:`schedule_factor`), and, on a resume with changed settings, those settings put back into the
loaded optimizer (:func:`apply_hyperparameters`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from eclsnn.config import TrainConfig
from eclsnn.core.clip import ThresholdClip

__all__ = ["parameter_groups", "lr_lambda", "schedule_factor", "in_the_loop", "build_optimizer", "build_scheduler",
           "apply_hyperparameters"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, weight_decay: float, threshold_weight_decay: float) -> list[dict[str, Any]]:
    """SGD parameter groups: conv/linear weights with `weight_decay`; BatchNorm parameters and biases
    without (decaying a BN scale or a bias only fights the normalisation); the thresholds λ of
    :class:`ThresholdClip` with `threshold_weight_decay` (their own group, so λ's decay is a separate
    choice: decaying it pulls the clip range towards 0). Empty groups are left out."""
    thresholds, no_decay, decay = [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            if isinstance(module, ThresholdClip):
                thresholds.append(param)
            elif isinstance(module, _NORM_TYPES) or name == "bias" or param.dim() <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"name": "weights", "params": decay, "weight_decay": weight_decay},
        {"name": "norm_and_bias", "params": no_decay, "weight_decay": 0.0},
        {"name": "thresholds", "params": thresholds, "weight_decay": threshold_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at optimizer step `step` (0-based): linear warmup to 1 over `warmup_steps`, then a
    cosine decay to 0 at `total_steps` (per step, not per epoch)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_factor(step: int, steps_per_epoch: int, t) -> float:
    """LR factor (times ``train.lr``) at optimizer step ``step`` for the settings ``t`` (a
    TrainConfig): one warmup + cosine schedule over all epochs; or, with ``snn_lr > 0`` and
    ``snn_epochs``, that schedule over the plain epochs, then a second cosine from ``snn_lr`` to 0
    over the epochs with the SNN in the loop."""
    total, warmup = t.epochs * steps_per_epoch, t.warmup_epochs * steps_per_epoch
    if not (t.snn_epochs and t.snn_lr):
        return lr_lambda(step, warmup, total)
    plain = (t.epochs - t.snn_epochs) * steps_per_epoch
    if step < plain:
        return lr_lambda(step, warmup, plain)
    return t.snn_lr / t.lr * lr_lambda(step - plain, 0, total - plain)


def in_the_loop(t: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (1-based) is one of the last ``train.snn_epochs``, with the SNN in the loop."""
    return epoch > t.epochs - t.snn_epochs


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        parameter_groups(model, t.weight_decay, t.threshold_weight_decay),
        lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`schedule_factor`, stepped once per optimizer step. (A lambda, not a
    callable object: LambdaLR's state_dict then leaves it out.)"""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, steps_per_epoch, t))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          steps_per_epoch: int, t: TrainConfig) -> None:
    """Put the config's optimizer settings into the param groups (loading the optimizer state
    brought back the old ones) and rescale the LR schedule to the new base lr and length."""
    factor = schedule_factor(scheduler.last_epoch, steps_per_epoch, t)
    decay = {"weights": t.weight_decay, "norm_and_bias": 0.0, "thresholds": t.threshold_weight_decay}
    for group in optimizer.param_groups:
        group.update(initial_lr=t.lr, lr=t.lr * factor, momentum=t.momentum, nesterov=t.nesterov,
                     weight_decay=decay.get(group.get("name"), group["weight_decay"]))
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
