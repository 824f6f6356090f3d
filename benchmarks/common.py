"""Trained Fashion-MNIST networks shared by the benchmarks: trained once per (activation, L, seed,
epochs) under benchmarks/runs/, with a file lock so two benchmarks never train the same run at once."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from eclsnn.config import load_config
from eclsnn.recipes import runs
from eclsnn.recipes.runs import run_name  # noqa: F401  (the benchmarks name runs with it)
from eclsnn.training.trainer import train

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
CONFIG = ROOT.parent / "configs" / "fmnist-cnn.toml"


def ensure_run(activation: str = "clip", levels: int | None = 4, seed: int = 0, epochs: int = 4, tag: str = "",
               **overrides) -> Path:
    """The run folder of cnn-fmnist trained with the demo config (same budget and seed for every
    activation); trains it (or finishes it) if needed. ``overrides`` (config keys) change the recipe;
    ``tag`` then names the variant in the run folder's name."""
    return runs.ensure_run(RUNS, activation, levels, seed, epochs, overrides=overrides, config_path=CONFIG, tag=tag)


def ensure_loop_run(levels: int, seed: int, epochs: int, snn_epochs: int, snn_lr: float, **overrides) -> Path:
    """cnn-fmnist with ThresholdClip at L = ``levels``, trained ``epochs`` epochs in all: the plain run
    of ``epochs - snn_epochs`` epochs, then ``snn_epochs`` epochs with the T = 2 SNN in the loop
    (train.snn_epochs, a restarted cosine from ``snn_lr``). It continues the plain run's last
    checkpoint; with a restarted schedule this is step for step the uninterrupted run. With
    ``snn_lr = 0`` (one cosine schedule over all epochs) it is trained from scratch."""
    if not snn_lr:
        return ensure_run("clip", levels, seed, epochs, tag=f"snn{snn_epochs}",
                          **{"train.snn_epochs": snn_epochs}, **overrides)
    plain = ensure_run("clip", levels, seed, epochs - snn_epochs)
    name = f"fmnist-clip-L{levels}-e{epochs}-snn{snn_epochs}-lr{snn_lr:g}-s{seed}"
    with open(RUNS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = RUNS / name
        if runs.is_finished(run):
            return run
        if not (run / "checkpoints" / "last").is_dir():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(plain / "checkpoints" / "last", run / "checkpoints" / "last")
        cfg = load_config(CONFIG, {
            "model.activation": "clip", "model.levels": levels, "train.seed": seed, "train.epochs": epochs,
            "train.snn_epochs": snn_epochs, "train.snn_lr": snn_lr, "train.output": str(RUNS),
            "train.run_name": name, "train.resume": True, "train.progress": False, **overrides,
        })
        return train(cfg)
