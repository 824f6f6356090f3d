"""``eclsnn analyze``: a trained checkpoint, converted as one or more neuron variants, analysed per layer
(the three conversion errors, firing rates, operations, energy; :mod:`eclsnn.analysis`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eclsnn.analysis import analyze, format_analysis, plot_analysis
from eclsnn.recipes.common import eval_loader, load_ann, load_split, write_json
from eclsnn.recipes.settings import layered_config
from eclsnn.recipes.conversion import convert_checkpoint, relu_thresholds
from eclsnn.recipes.sharding import shard_from_env
from eclsnn.recipes.variants import DEMO_VARIANTS, variant_name
from eclsnn.simulation import check_time_steps

__all__ = ["analyze_checkpoint", "analysis_variants"]


def analysis_variants(neuron: str | None = None, v_init: float | None = None,
                      theta_neg: float | None = None) -> dict[str, dict[str, Any]]:
    """The variants to analyse: the demo's three when no setting is given, else the one given (missing
    settings: dual, v(0) = θ/2, θ_neg = 0); each named by :func:`variant_name`."""
    if neuron is None and v_init is None and theta_neg is None:
        chosen = [dict(kw) for kw in DEMO_VARIANTS.values()]
    else:
        chosen = [{"neuron": neuron or "dual", "v_init": 0.5 if v_init is None else v_init,
                   "theta_neg": 0.0 if theta_neg is None else theta_neg}]
    return {variant_name(**kw): kw for kw in chosen}


def analyze_checkpoint(
    checkpoint: str | os.PathLike,
    variants: dict[str, dict[str, Any]],
    time_steps: int = 8,
    split: str = "test",
    max_samples: int | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    data_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Analyse a trained checkpoint converted as each of ``variants`` (name → :func:`eclsnn.convert`
    keyword arguments) on ``split``; ReLU networks get their thresholds from the validation split
    (the rule and batch count of the checkpoint's ``[convert]`` settings), computed once and shared
    by every variant. Writes ``analysis.json``, ``analysis.md`` and ``analysis.png`` into ``output``
    (default: ``RUN/analysis``). Returns the results and the output folder. Under ``torchrun`` the split
    is sharded over the processes (:mod:`eclsnn.recipes.sharding`); every rank returns the combined
    results, only rank 0 writes (the other ranks get None for the folder)."""
    check_time_steps(time_steps)
    shard = shard_from_env(device)
    try:
        return _analyze(checkpoint, variants, time_steps, split, max_samples, output, batch_size, data_dir, shard,
                        progress and shard.is_main)
    finally:
        shard.close()


def _analyze(checkpoint, variants, time_steps, split, max_samples, output, batch_size, data_dir, shard, progress):
    device = shard.device
    model, ckpt = load_ann(checkpoint, device)
    cfg = layered_config({"data.data_dir": data_dir} if data_dir else {}, None, ckpt.meta.get("config"))
    seed = ckpt.meta.get("seed", cfg.train.seed)
    thresholds = relu_thresholds(model, ckpt, cfg, device, batch_size)
    # a setting a variant leaves out is eclsnn.convert's default (θ_neg = 0), not the checkpoint's
    snns = convert_checkpoint(model, ckpt, cfg, {k: {"theta_neg": 0.0, **kw} for k, kw in variants.items()}, device,
                              thresholds=thresholds)
    dataset, indices = load_split(cfg.data, split, seed, max_samples)
    loader = eval_loader(dataset, shard.take(indices), batch_size, device)
    results = analyze(model, snns, loader, time_steps, progress=f"analyze T={time_steps}" if progress else None,
                      reduce=shard.reduce if shard.enabled else None)
    if not shard.is_main:
        return results, None
    out = Path(output) if output else ckpt.path.parent.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    results.update(checkpoint=str(ckpt.path), split=split, seed=seed, convert_variants=variants,
                   relu_thresholds={k: v.tolist() for k, v in thresholds.items()} if thresholds else None)
    write_json(out / "analysis.json", results)
    (out / "analysis.md").write_text(format_analysis(results) + "\n")
    arch = ckpt.meta.get("model", {}).get("arch", "model")
    plot_analysis(results, out / "analysis.png", title=f"{arch}, {split} split, {results['num_samples']} images, T = {time_steps}")
    return results, out
