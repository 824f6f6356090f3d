"""``eclsnn ablate``: the paper's ablation on Fashion-MNIST, written as one table.

The grid (Liu et al., ICML 2025: each of the three fixes switched on and off):

- **threshold**: *fixed* — the network trained with ReLU, θ of each layer the maximum activation on
  the validation split (the classic data-based conversion) — or *learnable* — the network trained with
  :class:`~eclsnn.ThresholdClip` (L levels), θ = the learned λ. Both are ``cnn-fmnist`` trained with the
  demo config under the same budget and seed;
- **neuron**: plain IF or dual-threshold;
- **membrane initialisation**: v(0) = 0 or θ/2;
- **time steps** T (default 1, 2, 4, 8; one simulation to the largest T gives all of them);

and the **θ_neg sweep** of the dual-threshold neuron (v(0) = θ/2, learnable-threshold network): −ε
(ε = 10⁻³), −θ/2, −θ and the current default 0. The θ_neg to keep is **chosen on the validation split**
(highest validation accuracy averaged over the reported T and the seeds; a tie keeps the earlier entry
of :data:`THETA_NEG_SWEEP`, i.e. the default); the test set is only reported, for every setting.

Accuracies are mean ± sample standard deviation over the seeds. Trained networks are cached in
``RUNS_DIR/fmnist-{relu|clip-L4}-e{epochs}-s{seed}`` (the naming and file lock of
``benchmarks/common.py``, so ``--runs-dir benchmarks/runs`` reuses the benchmark networks), and the
measurements of each seed in ``OUTPUT/seeds/`` (a rerun with more seeds only measures the new ones).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eclsnn.errors import ConfigError
from eclsnn.recipes.runs import ensure_run, run_name
from eclsnn.recipes.variants import variant_name

__all__ = [
    "THETA_NEG_SWEEP", "NEURON_SETTINGS", "DEFAULT_STEPS", "EPSILON", "run_name", "ensure_run",
    "grid_variants", "theta_neg_variants", "run_ablation", "format_ablation",
]

#: Neuron settings of the grid: (neuron, v_init in units of θ).
NEURON_SETTINGS: tuple[tuple[str, float], ...] = (("if", 0.0), ("if", 0.5), ("dual", 0.0), ("dual", 0.5))
#: ε of the "−ε" negative threshold.
EPSILON = 1e-3
#: The θ_neg candidates (units of θ), the current default first (it wins ties).
THETA_NEG_SWEEP: tuple[float, ...] = (0.0, -EPSILON, -0.5, -1.0)
DEFAULT_STEPS: tuple[int, ...] = (1, 2, 4, 8)
THRESHOLDS = {"fixed": "relu", "learnable": "clip"}
_RESULT_VERSION = 1


# ---- trained networks ------------------------------------------------------------------------------

# ---- variants --------------------------------------------------------------------------------------------

def _label(neuron: str, v_init: float, theta_neg: float = 0.0) -> str:
    return variant_name(neuron, v_init, theta_neg, show_theta_neg=True)


def grid_variants() -> dict[str, dict[str, Any]]:
    """The four neuron settings of the grid, as :func:`eclsnn.convert` keyword arguments (θ_neg = 0)."""
    return {_label(n, v): {"neuron": n, "v_init": v, "theta_neg": 0.0} for n, v in NEURON_SETTINGS}


def theta_neg_variants() -> dict[str, dict[str, Any]]:
    """The θ_neg sweep: dual-threshold neuron, v(0) = θ/2."""
    return {_label("dual", 0.5, t): {"neuron": "dual", "v_init": 0.5, "theta_neg": t} for t in THETA_NEG_SWEEP}


# ---- one seed -----------------------------------------------------------------------------------------

def _measure_seed(
    seed: int, relu_run: Path, clip_run: Path, steps: Sequence[int], max_samples: int | None, batch_size: int,
    calibration_batches: int, data_dir: str | None, progress: bool,
) -> dict[str, Any]:
    """Test accuracy of every grid/sweep variant on both networks and validation accuracy of the sweep."""
    from eclsnn.config import config_from_dict
    from eclsnn.recipes.common import eval_loader, evaluate_variants, load_ann, load_split
    from eclsnn.recipes.conversion import convert_checkpoint, relu_thresholds

    T = max(steps)
    relu, relu_ckpt = load_ann(relu_run)
    clip, clip_ckpt = load_ann(clip_run)
    cfg = config_from_dict(clip_ckpt.meta["config"], source="the checkpoint's config")
    if data_dir:
        cfg.data.data_dir = data_dir
    cfg.train.seed = seed
    cfg.convert.calibration_batches = calibration_batches
    # fixed thresholds: the maximum of each ReLU layer on the validation split, shared by all variants
    thresholds = relu_thresholds(relu, relu_ckpt, cfg, "cpu", batch_size, threshold_rule="max")
    grid = grid_variants()
    sweep = theta_neg_variants()
    relu_snns = convert_checkpoint(relu, relu_ckpt, cfg, grid, thresholds=thresholds)
    clip_snns = convert_checkpoint(clip, clip_ckpt, cfg, {**grid, **sweep})

    def run(model, snns, split, what):
        dataset, indices = load_split(cfg.data, split, seed, max_samples)
        loader = eval_loader(dataset, indices, batch_size, "cpu", f"seed {seed}: {what} ({split})" if progress else None)
        res = evaluate_variants(model, loader, T, snns)
        return {"ann": res["ann_accuracy"], "num_samples": res["num_samples"],
                "snn": {k: {str(t): v[str(t)] for t in steps} for k, v in res["snn_accuracy"].items()}}

    return {
        "seed": seed, "relu_run": str(relu_run), "clip_run": str(clip_run),
        "relu_thresholds": {k: v.tolist() for k, v in thresholds.items()},
        "test": {"fixed": run(relu, relu_snns, "test", "fixed thresholds"),
                 "learnable": run(clip, clip_snns, "test", "learnable thresholds")},
        "val": {"learnable": run(clip, {k: clip_snns[k] for k in sweep}, "val", "θ_neg sweep")},
    }


# ---- the whole ablation ------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def run_ablation(
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 4,
    output: str | os.PathLike = "ablation-output",
    runs_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    max_train_samples: int | None = None,
    time_steps: Sequence[int] = DEFAULT_STEPS,
    levels: int = 4,
    batch_size: int = 256,
    calibration_batches: int = 8,
    data_dir: str | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or reuse) the networks, measure every seed (or reuse its measurement), and write
    ``ablation.json`` and ``ablation.md`` into ``output``. Returns the results (see :func:`format_ablation`)."""
    steps = sorted({int(t) for t in time_steps})
    if not seeds:
        raise ConfigError("ablate needs at least one seed")
    if not steps or steps[0] < 1:
        raise ConfigError(f"time steps must be positive integers, got {list(time_steps)}")
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    out = Path(output)
    runs = Path(runs_dir) if runs_dir else out / "runs"
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    from eclsnn.recipes.common import write_json

    per_seed = []
    started = time.perf_counter()
    for seed in seeds:
        relu_run = ensure_run(runs, "relu", None, seed, epochs, max_train_samples, train_overrides)
        clip_run = ensure_run(runs, "clip", levels, seed, epochs, max_train_samples, train_overrides)
        key = {"version": _RESULT_VERSION, "relu_run": str(relu_run.resolve()), "clip_run": str(clip_run.resolve()),
               "steps": steps, "max_samples": max_samples, "batch_size": batch_size,
               "calibration_batches": calibration_batches, "theta_neg_sweep": list(THETA_NEG_SWEEP)}
        cache = out / "seeds" / f"seed{seed}.json"
        cached = _read_json(cache)
        if cached is not None and cached.get("key") == key:
            log(f"seed {seed}: reusing {cache}")
            per_seed.append(cached)
            continue
        t0 = time.perf_counter()
        measured = _measure_seed(seed, relu_run, clip_run, steps, max_samples, batch_size, calibration_batches, data_dir, progress)
        measured.update(key=key, seconds=time.perf_counter() - t0)
        write_json(cache, measured)
        log(f"seed {seed}: measured in {measured['seconds']:.0f} s")
        per_seed.append(measured)

    results = _summarise(per_seed, steps)
    results.update(seeds=list(seeds), epochs=epochs, levels=levels, max_samples=max_samples,
                   max_train_samples=max_train_samples, calibration_batches=calibration_batches, runs_dir=str(runs),
                   seconds=time.perf_counter() - started, per_seed=per_seed)
    write_json(out / "ablation.json", results)
    (out / "ablation.md").write_text(format_ablation(results) + "\n")
    return results


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summarise(per_seed: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    rows = []
    for threshold in ("fixed", "learnable"):
        rows.append({"threshold": threshold, "variant": "ann",
                     "accuracy": _stats([s["test"][threshold]["ann"] for s in per_seed])})
        names = list(grid_variants()) + (list(theta_neg_variants())[1:] if threshold == "learnable" else [])
        all_kw = {**grid_variants(), **theta_neg_variants()}
        for name in names:
            rows.append({"threshold": threshold, "variant": name, **all_kw[name],
                         "accuracy": {str(t): _stats([s["test"][threshold]["snn"][name][str(t)] for s in per_seed]) for t in steps}})
    val = []
    for name, kw in theta_neg_variants().items():
        accs = {str(t): _stats([s["val"]["learnable"]["snn"][name][str(t)] for s in per_seed]) for t in steps}
        val.append({"variant": name, "theta_neg": kw["theta_neg"], "accuracy": accs,
                    "mean_over_steps": sum(a["mean"] for a in accs.values()) / len(accs)})
    best = max(val, key=lambda r: r["mean_over_steps"])  # max keeps the first of equal values: the default wins ties
    return {
        "steps": steps, "test_samples": per_seed[0]["test"]["fixed"]["num_samples"],
        "val_samples": per_seed[0]["val"]["learnable"]["num_samples"], "rows": rows,
        "theta_neg_validation": val, "theta_neg_best": best["theta_neg"],
        "theta_neg_rule": "highest validation accuracy averaged over the reported T and the seeds; ties keep the default",
    }


# ---- the table -----------------------------------------------------------------------------------

def _fmt(stat: dict[str, Any]) -> str:
    m = f"{100 * stat['mean']:.2f}"
    return m if stat["std"] is None else f"{m} ± {100 * stat['std']:.2f}"


def _theta_neg_str(value: float) -> str:
    return "0" if value == 0 else f"−{-value:g}θ"


def format_ablation(results: dict[str, Any]) -> str:
    """The ablation as Markdown: the test table (grid and θ_neg sweep) and the validation sweep that
    chose θ_neg."""
    steps = results["steps"]
    n = len(results["seeds"])
    levels = results.get("levels", 4)
    thr_name = {"fixed": "fixed (ReLU net, max on val)", "learnable": f"learnable λ (clip net, L={levels})"}
    head = "| threshold | neuron | v(0) | θ_neg | " + " | ".join(f"T={t}" for t in steps) + " |"
    rule = "|---|---|---|---|" + "---|" * len(steps)
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        f"Fashion-MNIST test set ({results['test_samples']} images), cnn-fmnist trained {results['epochs']} epochs; "
        f"top-1 accuracy (%) {'mean ± std over' if n > 1 else 'of'} {n} seed{'s' if n > 1 else ''} ({seeds}).",
        "", head, rule,
    ]
    for row in results["rows"]:
        thr = thr_name[row["threshold"]]
        if row["variant"] == "ann":
            lines.append(f"| {thr} | ANN | – | – | {_fmt(row['accuracy'])} (all T) " + "| " * (len(steps) - 1) + "|")
            continue
        neuron = "dual" if row["neuron"] == "dual" else "IF"
        v0 = "θ/2" if row["v_init"] == 0.5 else f"{row['v_init']:g}"
        tneg = _theta_neg_str(row["theta_neg"]) if row["neuron"] == "dual" else "–"
        lines.append(f"| {thr} | {neuron} | {v0} | {tneg} | " + " | ".join(_fmt(row["accuracy"][str(t)]) for t in steps) + " |")
    lines += [
        "",
        f"θ_neg sweep on the validation split ({results['val_samples']} images; dual-threshold neuron, v(0) = θ/2, "
        f"learnable-λ network): chosen θ_neg = **{_theta_neg_str(results['theta_neg_best'])}** "
        f"({results['theta_neg_rule']}).",
        "",
        "| θ_neg | " + " | ".join(f"T={t}" for t in steps) + " | mean over T |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for row in results["theta_neg_validation"]:
        mark = " (chosen)" if row["theta_neg"] == results["theta_neg_best"] else ""
        lines.append(f"| {_theta_neg_str(row['theta_neg'])}{mark} | " + " | ".join(_fmt(row["accuracy"][str(t)]) for t in steps)
                     + f" | {100 * row['mean_over_steps']:.2f} |")
    return "\n".join(lines)

