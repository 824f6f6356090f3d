"""The files of a run folder (the layout is in :mod:`eclsnn.training.trainer`): where it is,
``config.json``, the checkpoints of an epoch, ``metrics.jsonl`` and ``summary.json``.

Only rank 0 writes (the trainer calls these there). Every file is replaced atomically
(:mod:`eclsnn._util`, checkpoints by :func:`~eclsnn.io.checkpoint.save_checkpoint`), so a process
killed at any moment leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from eclsnn._util import atomic_write_json, atomic_write_text
from eclsnn.config import Config, TrainConfig, config_to_dict
from eclsnn.errors import ConfigError
from eclsnn.io.checkpoint import save_checkpoint

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

def lock_file(run: Path) -> Path:
    """The lock file of a run folder, beside it (``.<run name>.train.lock``), so the run folder holds only the
    run (``.<run name>.lock`` is the lock of :func:`eclsnn.recipes.runs.ensure_run`, held around a train)."""
    return run.parent / f".{run.name}.train.lock"

__all__ = ["default_run_name", "run_folder", "run_lock", "lock_file", "Progress", "write_config", "checkpoint_meta", "save_epoch",
           "write_metrics", "run_summary", "write_summary"]


def default_run_name(cfg: Config) -> str:
    m = cfg.model
    return f"{m.arch.replace(':', '-')}-{cfg.data.dataset}-{m.activation}-L{m.levels or 0}-s{cfg.train.seed}"


def run_folder(cfg: Config) -> Path:
    """``train.output / (train.run_name or default_run_name(cfg))``."""
    return Path(cfg.train.output) / (cfg.train.run_name or default_run_name(cfg))


@contextlib.contextmanager
def run_lock(run: Path, enabled: bool = True):
    """Hold the run folder's lock while training writes into it: an OS lock (flock), which the system
    releases when the process dies, so a killed run can be resumed at once. A second ``train`` on the same
    folder gets a ConfigError naming the holder's pid."""
    if not enabled or fcntl is None:
        yield
        return
    run.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_file(run), "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(f"run folder {run} is being written by another eclsnn train (pid {holder}); wait for it "
                              "to finish, or choose another train.run_name / train.output") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # (closing releases the lock)


@dataclass
class Progress:
    """How far a run is: the metrics of every finished epoch, the best epoch so far, and the epoch to
    start at. Kept in every checkpoint (:meth:`extra_state`) and read back on resume."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_acc: float | None = None
    start_epoch: int = 1

    def extra_state(self, scaler) -> dict[str, Any]:
        """The checkpoint's extra state: this progress and, with fp16 AMP, the GradScaler's state."""
        extra: dict[str, Any] = {"history": self.history, "best_epoch": self.best_epoch,
                                 "best_val_acc": self.best_val_acc}
        if scaler.is_enabled():
            extra["grad_scaler"] = scaler.state_dict()
        return extra

    def last_good(self, run: Path) -> str:
        """The sentence an error message ends with: which checkpoint is left to resume from."""
        last = run / "checkpoints" / "last"
        if self.history:
            return f"The last good checkpoint is {last} (epoch {self.history[-1]['epoch']}), left intact."
        return "No checkpoint was written yet."


def write_config(run: Path, cfg: Config) -> None:
    """Create the run folder and write the settings of this start of the run to ``config.json``."""
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", config_to_dict(cfg), indent=1)


def checkpoint_meta(cfg: Config, run: Path, model_kwargs: dict[str, Any], info, world_size: int, epoch: int,
                    metrics: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """A checkpoint's ``meta``: what rebuilds the model (``model``, ``dataset``) and where it came from."""
    return {
        "model": model_kwargs,
        "dataset": {"name": info.name, "num_classes": info.num_classes, "channels": info.channels,
                    "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std)},
        "epoch": epoch,
        "seed": cfg.train.seed,
        "world_size": world_size,
        "run": str(run),
        "config": config_to_dict(cfg),
        "metrics": metrics,
        "best": {"epoch": progress.best_epoch, "val_acc": progress.best_val_acc},
    }


def save_epoch(run: Path, model: nn.Module, optimizer, scheduler, scaler, meta: dict[str, Any],
               progress: Progress, is_best: bool) -> None:
    """The files of a finished epoch: ``checkpoints/best`` (if it is the best), ``checkpoints/last``,
    then ``metrics.jsonl``."""
    ckpts = run / "checkpoints"
    extra = progress.extra_state(scaler)
    # best before last: if the process dies in between, the resumed run redoes this epoch and
    # rewrites best identically; the other order could leave best behind last's record of it.
    if is_best:
        save_checkpoint(ckpts / "best", model, meta, optimizer, scheduler, extra)
    save_checkpoint(ckpts / "last", model, meta, optimizer, scheduler, extra)
    write_metrics(run, progress.history)


def write_metrics(run: Path, history: list[dict[str, Any]], final: dict[str, Any] | None = None) -> None:
    """``metrics.jsonl``: one line per finished epoch, then ``final`` (the test evaluation) if given."""
    lines = [json.dumps(m) for m in history]
    if final is not None:
        lines.append(json.dumps(final))
    atomic_write_text(run / "metrics.jsonl", "".join(line + "\n" for line in lines))


def run_summary(run: Path, t: TrainConfig, progress: Progress) -> dict[str, Any]:
    """``summary.json`` of a finished run (the test evaluation, if any, is added by the caller)."""
    return {
        "run": str(run), "epochs": t.epochs, "best_epoch": progress.best_epoch, "best_val_acc": progress.best_val_acc,
        "best_by": f"val_snn_acc (T={t.snn_time_steps})" if t.snn_epochs else "val_acc",
        "final": progress.history[-1] if progress.history else None,
        "checkpoint_last": str(run / "checkpoints" / "last"),
        "checkpoint_best": str(run / "checkpoints" / "best") if progress.best_epoch else None,
    }


def write_summary(run: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run / "summary.json", summary, indent=1)
