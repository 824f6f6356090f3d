"""``eclsnn demo``: the whole method on the embedded default data set, in a few minutes on a CPU.

Trains ``cnn-fmnist`` with the learnable threshold clipping function on Fashion-MNIST, converts it
three ways (IF with v(0) = 0, IF with v(0) = θ/2, dual-threshold with v(0) = θ/2) and reports the
ANN accuracy and the SNN accuracy at T = 1, 2, 4, 8 on the test set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eclsnn.config import load_config, parse_overrides
from eclsnn.recipes.conversion import convert_checkpoint
from eclsnn.recipes.variants import DEMO_VARIANTS
from eclsnn.recipes.common import eval_loader, evaluate_variants, format_table, load_ann, load_split, plot_accuracy_vs_t, write_json
from eclsnn.training.trainer import train

REPORTED_STEPS = (1, 2, 4, 8)


def run_demo(args: argparse.Namespace) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set or [])
    overrides.update({"train.output": str(out), "train.run_name": "run", "train.resume": True,
                      "train.progress": not args.no_progress})
    for flag, key in (("epochs", "train.epochs"), ("max_train_samples", "train.max_train_samples"),
                      ("data_dir", "data.data_dir"), ("seed", "train.seed"), ("max_samples", "evaluate.max_samples")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    run = train(cfg)
    train_seconds = time.perf_counter() - start

    model, ckpt = load_ann(run)
    variants = convert_checkpoint(model, ckpt, cfg, DEMO_VARIANTS)
    T = max(args.time_steps, 1)
    dataset, indices = load_split(cfg.data, "test", cfg.train.seed, cfg.evaluate.max_samples)
    progress = None if args.no_progress else f"simulate T={T}"
    start = time.perf_counter()
    results = evaluate_variants(model, eval_loader(dataset, indices, cfg.evaluate.batch_size, "cpu", progress), T, variants)
    results.update(
        variants=DEMO_VARIANTS, reported_steps=[t for t in REPORTED_STEPS if t <= T], checkpoint=str(ckpt.path),
        epochs=cfg.train.epochs, seed=cfg.train.seed, train_seconds=train_seconds,
        evaluate_seconds=time.perf_counter() - start, command="eclsnn demo " + " ".join(_argv_echo(args)),
    )
    write_json(out / "results.json", results)
    plot_accuracy_vs_t(results, out / "accuracy_vs_T.png", title=f"cnn-fmnist, L={cfg.model.levels}, Fashion-MNIST test")
    print(f"\nFashion-MNIST test set ({results['num_samples']} images), cnn-fmnist with ThresholdClip L={cfg.model.levels}, "
          f"{cfg.train.epochs} epochs:")
    print(format_table(results, results["reported_steps"]))
    print(f"\nwritten: {out / 'results.json'}, {out / 'accuracy_vs_T.png'}")
    return results


def _argv_echo(args: argparse.Namespace) -> list[str]:
    parts = [f"--output {args.output}"]
    for flag in ("epochs", "max_train_samples", "max_samples", "seed"):
        if getattr(args, flag, None) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    return parts
