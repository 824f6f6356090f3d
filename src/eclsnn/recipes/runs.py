"""Trained Fashion-MNIST runs shared by the ablation and the benchmarks: one folder per (activation, L,
seed, epochs[, training subset][, tag]), trained once — or finished, if interrupted — with a file lock so
two processes never train the same run at once."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from eclsnn.config import load_config
from eclsnn.training.trainer import train

__all__ = ["run_name", "ensure_run", "is_finished"]


def run_name(activation: str, levels: int | None, seed: int, epochs: int, max_train_samples: int | None = None) -> str:
    """``fmnist-relu-e4-s0`` / ``fmnist-clip-L4-e4-s0``; a training subset adds ``-n512``."""
    kind = "relu" if activation == "relu" else f"clip-L{levels}"
    return f"fmnist-{kind}-e{epochs}-s{seed}" + (f"-n{max_train_samples}" if max_train_samples else "")


def is_finished(run: Path) -> bool:
    return (run / "summary.json").is_file() and (run / "checkpoints" / "last").is_dir()


def ensure_run(
    runs_dir: str | os.PathLike, activation: str, levels: int | None, seed: int, epochs: int,
    max_train_samples: int | None = None, overrides: dict[str, Any] | None = None, progress: bool = False,
    config_path: str | os.PathLike | None = None, tag: str = "",
) -> Path:
    """The run folder of the network of ``config_path`` (default: the demo config, cnn-fmnist) trained with
    ``activation`` (same budget and seed for both activations), under ``runs_dir``; ``overrides`` (config
    keys) change the recipe and ``tag`` then names the variant in the folder's name."""
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    name = run_name(activation, levels, seed, epochs, max_train_samples) + (f"-{tag}" if tag else "")
    with open(runs / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = runs / name
        if is_finished(run):
            return run
        cfg = load_config(config_path, {
            "model.activation": activation, "model.levels": levels if activation != "relu" else 4,
            "train.seed": seed, "train.epochs": epochs, "train.output": str(runs), "train.run_name": name,
            "train.resume": True, "train.progress": progress,
            **({"train.max_train_samples": max_train_samples} if max_train_samples else {}), **(overrides or {}),
        })
        return train(cfg)
