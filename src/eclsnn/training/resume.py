"""Resuming a run from its ``checkpoints/last``.

:func:`find_resume` decides whether a start continues a run: it refuses a run folder that already
holds a checkpoint unless ``train.resume`` is set, refuses settings that would make it a different
experiment (:data:`RESUME_MUST_MATCH`, the ``[model]`` section), and notes those that may change
(:data:`RESUME_MAY_CHANGE`; the run is then no longer identical to an uninterrupted one).
:func:`restore` puts the checkpoint's state back: weights, optimizer, schedule, progress, GradScaler
and the global RNG, so that an unchanged resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn.config import Config, TrainConfig, config_to_dict
from eclsnn.errors import CheckpointError, ConfigError
from eclsnn.io.checkpoint import Checkpoint, find_checkpoint, load_checkpoint, load_weights, restore_rng_state
from eclsnn.training.distributed import Dist
from eclsnn.training.run_files import Progress
from eclsnn.training.schedule import apply_hyperparameters, in_the_loop

__all__ = ["RESUME_MUST_MATCH", "RESUME_MAY_CHANGE", "find_resume", "restore"]

# Settings that make a resumed run a different experiment if they change.
RESUME_MUST_MATCH = (
    ("data", "dataset"), ("data", "val_fraction"), ("data", "augment"), ("train", "seed"),
    ("train", "batch_size"), ("train", "max_train_samples"), ("train", "init_from"),
)
# Settings a resumed run may change (e.g. a lower lr after a NaN); the run is then no longer identical
# to an uninterrupted one, and a note says so. The optimizer ones are re-applied after loading its state.
RESUME_MAY_CHANGE = (
    ("train", "epochs"), ("train", "lr"), ("train", "momentum"), ("train", "nesterov"), ("train", "weight_decay"),
    ("train", "threshold_weight_decay"), ("train", "label_smoothing"), ("train", "warmup_epochs"),
    ("train", "snn_epochs"), ("train", "snn_time_steps"), ("train", "snn_lr"), ("convert", "neuron"), ("convert", "v_init"),
    ("convert", "theta_neg"), ("train", "amp"), ("train", "channels_last"), ("train", "device"),
)


def find_resume(cfg: Config, run: Path, ddp: Dist) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint to resume from (None: start from scratch) and the keys of the settings that
    changed since it was written. Raises :class:`ConfigError` where the run cannot go on."""
    t = cfg.train
    last = find_checkpoint(run / "checkpoints" / "last")
    if not t.resume:
        if last is not None:
            raise ConfigError(
                f"run folder {run} already holds a checkpoint; set train.resume = true (--resume) to "
                "continue it, or choose another train.run_name / train.output for a new run"
            )
        return None, []
    if last is None:
        ddp.log(f"resume: no checkpoint in {run / 'checkpoints'} yet; starting from scratch")
        return None, []
    ckpt = load_checkpoint(last)
    saved = ckpt.meta.get("config") or {}
    now = config_to_dict(cfg)
    for section, key in RESUME_MUST_MATCH:
        before = (saved.get(section) or {}).get(key)
        if before != now[section][key]:
            raise ConfigError(
                f"resume: {section}.{key} was {before!r} in the checkpoint {ckpt.path} but is "
                f"{now[section][key]!r} now; resume with the run's own settings ({run / 'config.json'}) "
                "or start a new run"
            )
    # A setting added after the checkpoint was written counts as its default (e.g. model.width = 1.0).
    defaults = config_to_dict(type(cfg)())["model"]
    saved_model = {**{k: v for k, v in defaults.items() if k not in (saved.get("model") or {})},
                   **(saved.get("model") or {})} if isinstance(saved.get("model"), dict) else saved.get("model")
    if saved_model != now["model"]:
        raise ConfigError(
            f"resume: the [model] settings differ from those of checkpoint {ckpt.path} "
            f"({saved.get('model')} vs {now['model']}); resume with the run's own settings or start a new run"
        )
    changes = []
    for section, key in RESUME_MAY_CHANGE:
        before = (saved.get(section) or {}).get(key)
        if before != now[section][key]:
            changes.append(key)
            ddp.log(f"resume: {section}.{key} changes from {before!r} to {now[section][key]!r}; the "
                    "resumed run is no longer identical to an uninterrupted one")
    return ckpt, changes


def restore(ckpt: Checkpoint, changes: list[str], t: TrainConfig, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler, scaler, steps_per_epoch: int,
            device: torch.device) -> Progress:
    """Load ``ckpt`` into the model, optimizer, scheduler, GradScaler and the global RNG (in that
    order, the RNG last); re-apply the optimizer settings if any changed; return the run's progress.
    A state file that does not fit (wrong types, another optimizer) is a CheckpointError naming it."""
    load_weights(model, ckpt.state_dict, what=f"checkpoint {ckpt.path}")
    opt_state = ckpt.load_optimizer_state()
    sched_state = ckpt.load_scheduler_state()
    if opt_state is None or sched_state is None:
        raise ConfigError(f"checkpoint {ckpt.path} has no optimizer/scheduler state, so the run cannot be resumed")
    with _state_file(ckpt, "optimizer.json"):
        optimizer.load_state_dict(_to_device(_expect(opt_state, dict, ckpt, "optimizer.json"), device))
    with _state_file(ckpt, "scheduler.json"):
        scheduler.load_state_dict(_expect(sched_state, dict, ckpt, "scheduler.json"))
    extra = _expect(ckpt.load_extra_state() or {}, dict, ckpt, "extra.json")
    progress = Progress(history=_expect(extra.get("history") or [], list, ckpt, "extra.json", "history"),
                        best_epoch=_expect(extra.get("best_epoch"), (int, type(None)), ckpt, "extra.json", "best_epoch"),
                        best_val_acc=_expect(extra.get("best_val_acc"), (int, float, type(None)), ckpt, "extra.json",
                                             "best_val_acc"))
    if not all(isinstance(m, dict) and type(m.get("epoch")) is int for m in progress.history):
        raise CheckpointError(f"{ckpt.path / 'extra.json'}: field 'history' must list one object per epoch, each with its "
                              "epoch number; the checkpoint is corrupt — use another one")
    if extra.get("grad_scaler") and scaler.is_enabled():
        with _state_file(ckpt, "extra.json"):
            scaler.load_state_dict(_expect(extra["grad_scaler"], dict, ckpt, "extra.json", "grad_scaler"))
    progress.start_epoch = _expect(ckpt.meta.get("epoch"), int, ckpt, "meta.json", "epoch") + 1
    if t.snn_epochs and (progress.best_epoch is None or not in_the_loop(t, progress.best_epoch)):
        # the best checkpoint is chosen among the epochs with the SNN in the loop, by the SNN's accuracy
        progress.best_epoch = progress.best_val_acc = None
    if changes:
        apply_hyperparameters(optimizer, scheduler, steps_per_epoch, t)
    rng = ckpt.load_rng_state()
    if rng:
        with _state_file(ckpt, "rng.json"):
            restore_rng_state(_expect(rng, dict, ckpt, "rng.json"))
    return progress


def _expect(value: Any, kind, ckpt: Checkpoint, name: str, field: str | None = None) -> Any:
    """``value`` if it is of ``kind`` (bool is no number here), else a CheckpointError naming the file and field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return value
    where = f"field '{field}'" if field else "its content"
    raise CheckpointError(f"{ckpt.path / name}: {where} is a {type(value).__name__} ({str(value)[:60]}), which eclsnn "
                          "never writes there; the checkpoint is corrupt — use another one")


@contextlib.contextmanager
def _state_file(ckpt: Checkpoint, name: str):
    """Turn what torch raises on a state that does not fit its object into a CheckpointError naming the file."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{ckpt.path / name} does not fit this run ({type(exc).__name__}: {first[:200]}); the "
                              "checkpoint is corrupt or from another optimizer or schedule — use another one") from None


def _to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
