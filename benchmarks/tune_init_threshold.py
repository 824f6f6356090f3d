"""Choose the initial clip threshold λ₀ of the Fashion-MNIST demo on the validation split.

    python benchmarks/tune_init_threshold.py [--samples 16000] [--inits 4 2 1]

Trains cnn-fmnist (ThresholdClip, L = 4) for one epoch on a seeded subset for each λ₀ and prints the
validation accuracy of the ANN and of the dual-threshold / IF SNNs at T = 1, 2, 4, 8. The test set is
not touched.
"""

import argparse
import tempfile

from eclsnn import convert
from eclsnn.config import load_config
from eclsnn.recipes.common import eval_loader, evaluate_variants, load_ann, load_split
from eclsnn.training.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--inits", type=float, nargs="+", default=[4.0, 2.0, 1.0])
    ap.add_argument("--levels", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for init in args.inits:
            cfg = load_config(None, {
                "train.epochs": 1, "train.max_train_samples": args.samples, "train.output": out,
                "train.run_name": f"init{init}", "model.init_threshold": init, "model.levels": args.levels,
                "data.val_fraction": 0.05, "train.eval_test": False, "train.progress": False,
            })
            model, _ = load_ann(train(cfg))
            data, idx = load_split(cfg.data, "val", cfg.train.seed)
            r = evaluate_variants(model, eval_loader(data, idx, 256), 8, {"dual": convert(model), "if": convert(model, neuron="if")})
            row = " ".join(f"{n} T={t}: {100 * r['snn_accuracy'][n][str(t)]:.1f}" for n in ("dual", "if") for t in (1, 2, 4, 8))
            print(f"lambda0={init}: val ANN {100 * r['ann_accuracy']:.1f} | {row}", flush=True)


if __name__ == "__main__":
    main()
