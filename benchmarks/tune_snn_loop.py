"""Choose how to train with the SNN in the loop (train.snn_epochs) on the validation split.

    python benchmarks/tune_snn_loop.py [--seed 0] [--levels 2 4]

For cnn-fmnist on Fashion-MNIST (the demo config), each ThresholdClip network (L = 2 and 4) is
trained in these variants, and its dual-threshold SNN (θ/2) is evaluated on the seed's validation
split at T = 1, 2, 4, 8 (the test set is not touched):

- 4 epochs, plain (the budget of benchmarks/accuracy_vs_peers.py);
- 4 epochs, the last 1 or 2 with the T = 2 SNN in the loop, on the one cosine schedule;
- 5 epochs: plain; the last 1 in the loop on the one schedule; 4 plain epochs, then 1 in the loop
  with the schedule restarted at snn_lr = 0.003, 0.01, 0.03.

Runs are cached in benchmarks/runs/ (see common.py). Writes benchmarks/results/snn_loop/tune.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eclsnn  # noqa: E402
from common import CONFIG, ensure_loop_run, ensure_run  # noqa: E402
from eclsnn.config import load_config  # noqa: E402
from eclsnn.recipes.common import eval_loader, evaluate_variants, load_ann, load_split, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "snn_loop"
STEPS = (1, 2, 4, 8)


def variants(L: int, seed: int, lrs: list[float]) -> dict[str, Path]:
    runs = {"4 epochs, plain": ensure_run("clip", L, seed, 4)}
    for k in (1, 2):
        runs[f"4 epochs, last {k} in the loop (one schedule)"] = ensure_run(
            "clip", L, seed, 4, tag=f"snn{k}", **{"train.snn_epochs": k})
    runs["5 epochs, plain"] = ensure_run("clip", L, seed, 5)
    runs["5 epochs, last 1 in the loop (one schedule)"] = ensure_loop_run(L, seed, 5, 1, 0.0)
    for lr in lrs:
        runs[f"4 plain + 1 in the loop, snn_lr {lr:g}"] = ensure_loop_run(L, seed, 5, 1, lr)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    args = ap.parse_args()
    data = load_config(CONFIG).data
    ds, idx = load_split(data, "val", args.seed)
    loader = eval_loader(ds, idx, 256)
    rows = []
    for L in args.levels:
        for name, run in variants(L, args.seed, args.lrs).items():
            model, _ = load_ann(run)
            r = evaluate_variants(model, loader, max(STEPS), {"dual": eclsnn.convert(model)})
            rows.append({"L": L, "variant": name, "run": run.name, "val_ann": 100 * r["ann_accuracy"],
                         "val_snn": {str(t): 100 * r["snn_accuracy"]["dual"][str(t)] for t in STEPS}})
            print(f"L={L} {name}: ANN {rows[-1]['val_ann']:.2f}  " +
                  "  ".join(f"T={t} {rows[-1]['val_snn'][str(t)]:.2f}" for t in STEPS), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/tune_snn_loop.py " + " ".join(sys.argv[1:])
    write_json(OUT / "tune.json", {"command": command, "seed": args.seed, "validation_images": len(idx), "rows": rows})
    lines = ["# Training with the SNN in the loop: choices on the validation split\n", f"Command: `{command}`\n",
             f"Seed {args.seed}, {len(idx)} validation images (one standard error ≈ 0.4 points), dual-threshold SNN "
             "with θ/2; the in-the-loop epochs simulate T = 2. The test set is not used.\n",
             "| L | variant | ANN | " + " | ".join(f"SNN T={t}" for t in STEPS) + " |", "|---|---|---|" + "---|" * len(STEPS)]
    for r in rows:
        lines.append(f"| {r['L']} | {r['variant']} | {r['val_ann']:.2f} | " + " | ".join(f"{r['val_snn'][str(t)]:.2f}" for t in STEPS) + " |")
    (OUT / "tune.md").write_text("\n".join(lines) + "\n")
    print((OUT / "tune.md").read_text())


if __name__ == "__main__":
    main()
