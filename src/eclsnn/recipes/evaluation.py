"""``eclsnn evaluate``: a checkpoint (converted by its settings) or a saved SNN folder, ANN and SNN
accuracy at every t = 1…T, optionally adaptive-latency inference next to fixed T."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eclsnn.config import Config
from eclsnn.errors import ConfigError
from eclsnn.recipes.common import (check_output, eval_loader, evaluate_variants, format_table, is_snn_folder, load_ann,
                                   load_snn, load_split, write_json)
from eclsnn.recipes.settings import layered_config
from eclsnn.recipes.conversion import convert_checkpoint
from eclsnn.recipes.sharding import shard_from_env
from eclsnn.simulation import SpikingNetwork
from eclsnn.simulation.adaptive import AdaptiveResult, calibrate_margin, evaluate_adaptive

__all__ = ["run_evaluate", "adaptive_vs_fixed"]


def run_evaluate(checkpoint: str | os.PathLike, overrides: dict[str, Any] | None = None,
                 config_path: str | os.PathLike | None = None, device: str = "cpu", progress: bool = True,
                 adaptive: bool = False, max_accuracy_loss: float = 0.005, json_out: str | os.PathLike | None = None,
                 log=print) -> tuple[dict[str, Any], Path | None]:
    """Evaluate ``checkpoint`` (a run/checkpoint folder: converted by its config ← ``config_path`` ←
    ``overrides``; or an SNN folder: as saved) on ``evaluate.split``; prints the table with ``log`` and
    writes the JSON (default ``RUN/evaluation.json`` or ``SNN/evaluation.json``). Returns the results and
    the JSON path. Under ``torchrun`` the split is sharded over the processes (:mod:`eclsnn.recipes.sharding`):
    every rank returns the combined results; only rank 0 logs and writes (the other ranks get None)."""
    if adaptive and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("adaptive-latency evaluation runs in one process; run it without torchrun")
    shard = shard_from_env(device)
    try:
        return _run_evaluate(checkpoint, overrides, config_path, shard, progress, adaptive, max_accuracy_loss,
                             json_out, log if shard.is_main else (lambda *a, **k: None))
    finally:
        shard.close()


def _run_evaluate(checkpoint, overrides, config_path, shard, progress, adaptive, max_accuracy_loss, json_out, log):
    device = shard.device
    if is_snn_folder(checkpoint):
        snn, model, ckpt, spec = load_snn(checkpoint, device)
        cfg = layered_config(overrides, config_path, ckpt.meta.get("config"))
        variant = f"{spec['convert']['neuron']} (saved)"
        default_json = Path(checkpoint) / "evaluation.json"
    else:
        model, ckpt = load_ann(checkpoint, device)
        cfg = layered_config(overrides, config_path, ckpt.meta.get("config"))
        variant = cfg.convert.neuron
        snn = convert_checkpoint(model, ckpt, cfg, device=device)[variant]
        default_json = ckpt.path.parent.parent / "evaluation.json"
    json_path = check_output(json_out or default_json, what="results file") if shard.is_main else None
    e = cfg.evaluate
    seed = ckpt.meta.get("seed", cfg.train.seed)
    dataset, indices = load_split(cfg.data, e.split, seed, e.max_samples)
    loader = eval_loader(dataset, shard.take(indices), e.batch_size, device,
                         f"evaluate T={e.time_steps}" if progress and shard.is_main else None)
    start = time.perf_counter()
    results = evaluate_variants(model, loader, e.time_steps, {variant: snn}, reduce=shard.reduce if shard.enabled else None)
    results.update(split=e.split, checkpoint=str(ckpt.path), convert=asdict(cfg.convert), seconds=time.perf_counter() - start)
    if shard.enabled:
        results["processes"] = shard.world
    log(f"{e.split} split, {results['num_samples']} images, T = 1..{e.time_steps}")
    log(format_table(results))
    if adaptive:
        results["adaptive"] = adaptive_vs_fixed(snn, cfg, seed, loader, e.time_steps, max_accuracy_loss, device, log)
    out = write_json(json_path, results) if shard.is_main else None
    return results, out


def adaptive_vs_fixed(snn: SpikingNetwork, cfg: Config, seed: int, loader, T: int, max_loss: float, device, log=print) -> dict:
    """Calibrate the stopping margin on the validation split, then report adaptive next to fixed T."""
    val = eval_loader(*load_split(cfg.data, "val", seed, cfg.evaluate.max_samples), cfg.evaluate.batch_size, device)
    margin, _ = calibrate_margin(snn, val, T, max_accuracy_loss=max_loss)
    fixed = evaluate_adaptive(snn, loader, T, float("inf"))
    adaptive = evaluate_adaptive(snn, loader, T, margin)
    log(f"\nadaptive latency (margin {margin:.3g}, calibrated on the validation split for <= {100 * max_loss:.1f} points loss):")
    log("| inference | accuracy % | mean steps | seconds |\n|---|---|---|---|")
    rows: tuple[tuple[str, AdaptiveResult], ...] = ((f"fixed T={T}", fixed), ("adaptive", adaptive))
    for name, r in rows:
        log(f"| {name} | {100 * r.accuracy:.2f} | {r.mean_steps:.2f} | {r.seconds:.1f} |")
    log("steps used: " + ", ".join(f"{t}: {n}" for t, n in sorted(adaptive.steps_histogram.items())))
    return {"fixed": fixed.as_dict(), "adaptive": adaptive.as_dict(), "max_accuracy_loss": max_loss}
