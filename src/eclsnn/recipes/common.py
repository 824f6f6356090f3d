"""The glue between a trained checkpoint and the numbers a user reads: data splits for evaluation and
calibration, converting a checkpoint, evaluating ANN and SNN variants in one pass, tables, plots and
result files. (SNN folders live in :mod:`eclsnn.io.snn_folder`; the names are re-exported here.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn._util import atomic_write_json
from eclsnn.config import DataConfig
from eclsnn.errors import ConfigError, SimulationError
from eclsnn.io.snn_folder import SNN_SPEC, SNN_THRESHOLDS, convert_kwargs, is_snn_folder, load_ann, load_snn, save_snn
from eclsnn.recipes.variants import DEMO_VARIANTS
from eclsnn.simulation import SpikingNetwork, check_time_steps, simulate

__all__ = [
    "load_split", "eval_loader", "calibration_batches", "load_ann", "convert_kwargs", "save_snn", "load_snn",
    "evaluate_variants", "format_table", "check_output", "plot_accuracy_vs_t", "write_json", "DEMO_VARIANTS", "is_snn_folder",
    "SNN_SPEC", "SNN_THRESHOLDS",
]

# ---- data -----------------------------------------------------------------------------------------

def load_split(data: DataConfig, split: str, seed: int, max_samples: int | None = None):
    """``(dataset, indices)`` of ``split``: "test" (the test set), or "val"/"train" (the seeded split of
    the training set that training used). ``max_samples`` keeps a seeded subset."""
    from eclsnn.data import load_dataset, split_train_val

    if split not in ("test", "val", "train"):
        raise SimulationError(f"split must be 'test', 'val' or 'train', got {split!r}")
    dataset = load_dataset(data.dataset, train=split != "test", data_dir=data.data_dir, download=data.download)
    if split == "test":
        indices = torch.arange(len(dataset))
    else:
        train_idx, val_idx = split_train_val(len(dataset), data.val_fraction, seed)
        indices = train_idx if split == "train" else val_idx
        if len(indices) == 0:
            raise SimulationError(f"the {split} split is empty (data.val_fraction = {data.val_fraction}); raise val_fraction")
    if max_samples is not None and max_samples < len(indices):
        keep = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:max_samples]
        indices = indices[keep.sort().values]
    return dataset, indices


def eval_loader(dataset, indices, batch_size: int, device: str | torch.device = "cpu", progress: str | None = None):
    from eclsnn.data import BatchLoader

    return BatchLoader(dataset, indices, batch_size=batch_size, shuffle=False, augment=False, device=device, progress=progress)


def calibration_batches(data: DataConfig, seed: int, batch_size: int, num_batches: int, device="cpu") -> list[torch.Tensor]:
    """Inputs for threshold calibration, from the validation split (data-chosen values are chosen on
    held-out training data, never on the test set)."""
    dataset, indices = load_split(data, "val", seed)
    batches = []
    for x, _ in eval_loader(dataset, indices, batch_size, device):
        batches.append(x)
        if len(batches) >= num_batches:
            break
    return batches


# ---- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_variants(
    model: nn.Module, loader: Iterable, time_steps: int, variants: dict[str, SpikingNetwork], reduce=None,
) -> dict[str, Any]:
    """ANN accuracy and, for each converted variant, SNN accuracy at every t = 1…T, in one pass over
    the data (each batch is loaded once and run through every network). ``reduce(tensor)`` sums integer
    counts over processes (:mod:`eclsnn.recipes.sharding`; None: this process's data is all)."""
    T = check_time_steps(time_steps)
    model.eval()
    counts = torch.zeros(2, dtype=torch.long)  # ANN correct, samples
    correct = {name: torch.zeros(T, dtype=torch.long) for name in variants}
    for x, y in loader:
        counts[0] += (model(x).argmax(-1) == y).sum().item()
        for name, snn in variants.items():
            out = simulate(snn, x, T)
            correct[name] += (out.argmax(-1) == y).sum(1).cpu()
        counts[1] += y.shape[0]
    if reduce is not None:
        counts = reduce(counts)
        correct = {name: reduce(c) for name, c in correct.items()}
    correct_ann, total = int(counts[0]), int(counts[1])
    if total == 0:
        raise SimulationError("no samples to evaluate")
    return {
        "num_samples": total,
        "time_steps": T,
        "ann_accuracy": correct_ann / total,
        "snn_accuracy": {name: {str(t + 1): int(c[t]) / total for t in range(T)} for name, c in correct.items()},
    }


def format_table(results: dict[str, Any], steps: list[int] | None = None) -> str:
    """A Markdown table: one row per variant, one column per t, the ANN on top."""
    T = results["time_steps"]
    steps = steps or list(range(1, T + 1))
    head = "| network | " + " | ".join(f"T={t}" for t in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    rows = [head, rule, f"| ANN | {100 * results['ann_accuracy']:.2f} (all T) " + "| " * (len(steps) - 1) + "|"]
    for name, accs in results["snn_accuracy"].items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * accs[str(t)]:.2f}" for t in steps) + " |")
    return "\n".join(rows)


def plot_accuracy_vs_t(results: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy against time steps for every variant, with the ANN as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, accs in results["snn_accuracy"].items():
        ts = sorted(int(t) for t in accs)
        ax.plot(ts, [100 * accs[str(t)] for t in ts], marker="o", label=name)
    ax.axhline(100 * results["ann_accuracy"], color="k", linestyle="--", label="ANN")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def check_output(path: str | os.PathLike, folder: bool = False, what: str = "output") -> Path:
    """Check, before any long work, that ``path`` can be written: a file (or with ``folder`` a folder) whose
    existing part is not a file in the way and whose nearest existing folder is writable. A ConfigError
    says what is wrong and what to do."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a folder; choose another path")
        if not folder and path.is_dir():
            raise ConfigError(f"{what} {path} is a folder; give a file name")
    parent = path.parent if not path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path} cannot be written: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {parent} is not writable; choose another path")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (eclsnn._util's writer: a temporary file, fsynced, then renamed)."""
    return atomic_write_json(path, obj, indent=2)
