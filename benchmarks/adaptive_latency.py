"""Adaptive-latency inference on Fashion-MNIST: accuracy against mean steps and against wall-clock time,
fixed T versus adaptive (early stop on the logit margin).

    python benchmarks/adaptive_latency.py RUN [--max-steps 8] [--max-samples N] [--targets 0.002 0.005 0.01 0.02]

RUN is a trained clip run folder (e.g. demo-output/run). Fixed T is ``eclsnn.simulate`` (the default fast
path) timed per batch. For each target accuracy loss the margin is calibrated on the validation split;
the block size of ``simulate_adaptive`` (steps per multi-step run between two removals of finished
samples) is chosen on the validation split too (fastest at the first target; accuracy does not depend
on it); the test split is only reported. Times are medians of ``--reps`` runs. Writes
benchmarks/results/adaptive_latency.{json,md,png}.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import statistics

from eclsnn import convert, simulate
from eclsnn.simulation.adaptive import DEFAULT_BLOCK, calibrate_margin, evaluate_adaptive
from eclsnn.config import config_from_dict
from eclsnn.recipes.common import eval_loader, load_ann, load_split

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, ckpt = load_ann(args.run)
    cfg = config_from_dict(ckpt.meta["config"])
    seed = cfg.train.seed
    snn = convert(model)
    val = list(eval_loader(*load_split(cfg.data, "val", seed, args.max_samples), args.batch_size))
    test = list(eval_loader(*load_split(cfg.data, "test", seed, args.max_samples), args.batch_size))

    def timed(fn):
        results = [fn() for _ in range(args.reps)]
        return results[0][0], statistics.median(r[1] for r in results)

    def fixed_run(T):
        start, correct, total = time.perf_counter(), 0, 0
        for x, y in test:
            correct += (simulate(snn, x, T)[-1].argmax(-1) == y).sum().item()
            total += y.shape[0]
        return (correct / total, total), time.perf_counter() - start

    def adaptive_run(data, margin, block):
        r = evaluate_adaptive(snn, data, args.max_steps, margin, block)
        return r, r.seconds

    rows = []
    for T in range(1, args.max_steps + 1):  # fixed T: eclsnn.simulate, the default fast path
        (acc, n), sec = timed(lambda: fixed_run(T))
        rows.append({"mode": "fixed", "T": T, "accuracy": acc, "mean_steps": float(T), "seconds": sec,
                     "margin": float("inf"), "num_samples": n})
    margins = {t: calibrate_margin(snn, val, args.max_steps, max_accuracy_loss=t)[0] for t in args.targets}
    block_val = {b: timed(lambda b=b: adaptive_run(val, margins[args.targets[0]], b))[1] for b in args.blocks}
    block = min(block_val, key=block_val.get)
    for target in args.targets:
        for b in sorted({block, *args.blocks}):
            r, sec = timed(lambda: adaptive_run(test, margins[target], b))
            rows.append({"mode": "adaptive", "target_loss": target, "block": b, **r.as_dict(), "seconds": sec})
    OUT.mkdir(exist_ok=True)
    meta = {"run": str(Path(args.run).resolve()), "max_steps": args.max_steps, "num_test": rows[0]["num_samples"],
            "block_seconds_on_val": block_val, "block_chosen_on_val": block, "default_block": DEFAULT_BLOCK,
            "command": "python benchmarks/adaptive_latency.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
            "when": time.strftime("%Y-%m-%d %H:%M")}
    (OUT / "adaptive_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Test images: {rows[0]['num_samples']}; seconds are medians of {args.reps} runs (2 threads). Block size "
             f"chosen on the validation split: {block} (validation seconds per block size: "
             + ", ".join(f"{b}: {v:.2f}" for b, v in block_val.items()) + f"; the library default is {DEFAULT_BLOCK}).\n",
             "| mode | T / target loss | block | margin | accuracy % | mean steps | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        key = r["T"] if r["mode"] == "fixed" else f"max {args.max_steps}, loss ≤ {100 * r['target_loss']:.1f} pt"
        lines.append(f"| {r['mode']} | {key} | {r.get('block', '–')} | {r['margin']:.3g} | {100 * r['accuracy']:.2f} | "
                     f"{r['mean_steps']:.2f} | {r['seconds']:.2f} |")
    (OUT / "adaptive_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "mean_steps", "mean time steps"), (axes[1], "seconds", "wall-clock seconds")):
        for mode, marker in (("fixed", "o-"), ("adaptive", "s--")):
            pts = sorted((r[key], 100 * r["accuracy"]) for r in rows if r["mode"] == mode and r.get("block", block) == block)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=mode)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "adaptive_latency.png", dpi=120)


if __name__ == "__main__":
    main()
