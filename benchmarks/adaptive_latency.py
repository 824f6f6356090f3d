"""Adaptive-latency inference on Fashion-MNIST: accuracy against mean steps and against wall-clock time,
fixed T versus adaptive (early stop on the logit margin).

    python benchmarks/adaptive_latency.py RUN [--max-steps 8] [--max-samples N] [--targets 0.002 0.005 0.01 0.02]

RUN is a trained clip run folder (e.g. demo-output/run). For each target accuracy loss the margin is
calibrated on the validation split; the test split is only reported. Writes
benchmarks/results/adaptive_latency.{json,md,png}.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from eclsnn import convert
from eclsnn.adaptive import calibrate_margin, evaluate_adaptive
from eclsnn.config import config_from_dict
from eclsnn.experiment import eval_loader, load_ann, load_split

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02])
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, ckpt = load_ann(args.run)
    cfg = config_from_dict(ckpt.meta["config"])
    seed = cfg.train.seed
    snn = convert(model)
    val = list(eval_loader(*load_split(cfg.data, "val", seed, args.max_samples), args.batch_size))
    test = list(eval_loader(*load_split(cfg.data, "test", seed, args.max_samples), args.batch_size))

    rows = []
    for T in range(1, args.max_steps + 1):  # fixed T: the same single-step loop with an infinite margin
        r = evaluate_adaptive(snn, test, T, float("inf"))
        rows.append({"mode": "fixed", "T": T, **r.as_dict()})
    for target in args.targets:
        margin, _ = calibrate_margin(snn, val, args.max_steps, max_accuracy_loss=target)
        r = evaluate_adaptive(snn, test, args.max_steps, margin)
        rows.append({"mode": "adaptive", "target_loss": target, **r.as_dict()})
    OUT.mkdir(exist_ok=True)
    meta = {"run": str(Path(args.run).resolve()), "max_steps": args.max_steps, "num_test": rows[0]["num_samples"],
            "command": "python benchmarks/adaptive_latency.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
            "when": time.strftime("%Y-%m-%d %H:%M")}
    (OUT / "adaptive_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| mode | T / target loss | margin | accuracy % | mean steps | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        key = r["T"] if r["mode"] == "fixed" else f"max {args.max_steps}, loss ≤ {100 * r['target_loss']:.1f} pt"
        lines.append(f"| {r['mode']} | {key} | {r['margin']:.3g} | {100 * r['accuracy']:.2f} | {r['mean_steps']:.2f} | {r['seconds']:.1f} |")
    (OUT / "adaptive_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "mean_steps", "mean time steps"), (axes[1], "seconds", "wall-clock seconds")):
        for mode, marker in (("fixed", "o-"), ("adaptive", "s--")):
            pts = sorted((r[key], 100 * r["accuracy"]) for r in rows if r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=mode)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "adaptive_latency.png", dpi=120)


if __name__ == "__main__":
    main()
