"""The ``eclsnn`` command line: ``train``, ``convert``, ``evaluate``, ``demo``, ``analyze``, ``ablate``.

Settings come from a TOML config (``--config``), then ``--set section.key=value`` overrides, then the
named flags. Errors a user can cause print one line (``eclsnn: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eclsnn import config
from eclsnn.errors import EclsnnError

# flag dest -> dotted config key (flags override --config and --set)
_TRAIN_FLAGS = {
    "dataset": "data.dataset", "data_dir": "data.data_dir", "download": "data.download",
    "arch": "model.arch", "activation": "model.activation", "levels": "model.levels",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "device": "train.device", "output": "train.output", "run_name": "train.run_name", "resume": "train.resume",
    "init_from": "train.init_from", "max_train_samples": "train.max_train_samples",
}
_CONVERT_FLAGS = {
    "neuron": "convert.neuron", "v_init": "convert.v_init", "theta_neg": "convert.theta_neg",
    "maxpool": "convert.maxpool", "threshold_rule": "convert.threshold_rule", "percentile": "convert.percentile",
    "calibration_batches": "convert.calibration_batches",
}
_EVAL_FLAGS = {
    "time_steps": "evaluate.time_steps", "eval_batch_size": "evaluate.batch_size", "split": "evaluate.split",
    "max_samples": "evaluate.max_samples", "data_dir": "data.data_dir",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit status is 2 as well; keep one format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.lr=0.05 (repeatable)")


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--neuron", choices=config.NEURON_CHOICES, help="dual-threshold, plain IF, or burst (graded-spike dual-threshold) neurons")
    g.add_argument("--v-init", type=float, help="initial membrane potential in units of θ (0.5 = θ/2)")
    g.add_argument("--theta-neg", type=float, help="negative threshold of the dual neuron, in units of θ")
    g.add_argument("--maxpool", choices=config.MAXPOOL_CHOICES, help="max-pooling policy")
    g.add_argument("--threshold-rule", choices=config.THRESHOLD_RULE_CHOICES, help="θ of ReLU layers from calibration data")
    g.add_argument("--percentile", type=float)
    g.add_argument("--calibration-batches", type=int)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--time-steps", "-T", type=int, help="simulate T steps; accuracy at every t = 1..T")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--split", choices=config.SPLIT_CHOICES)
    g.add_argument("--max-samples", type=int, help="evaluate a seeded subset of the split")
    g.add_argument("--data-dir", help="folder with the data set files")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eclsnn", description="ANN-to-SNN conversion with error compensation learning.")
    parser.add_argument("--version", action="version", version=f"eclsnn {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train an ANN (ThresholdClip or ReLU); works under torchrun")
    _add_config_args(p)
    g = p.add_argument_group("common settings")
    g.add_argument("--dataset", choices=config.DATASET_CHOICES)
    g.add_argument("--data-dir")
    g.add_argument("--download", action="store_const", const=True, help="fetch the data set if it is not found")
    g.add_argument("--arch", help="a model of the zoo, or torchvision:NAME / timm:NAME (docs/MODELS.md)")
    g.add_argument("--activation", choices=config.ACTIVATION_CHOICES)
    g.add_argument("--levels", type=int, help="quantisation levels L of the clip (0: plain clip)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device")
    g.add_argument("--output", help="folder that holds run folders")
    g.add_argument("--run-name")
    g.add_argument("--resume", action="store_const", const=True, help="continue the run from its last checkpoint")
    g.add_argument("--init-from", metavar="CHECKPOINT", help="start from a trained ReLU network (via eclsnn.prepare)")
    g.add_argument("--max-train-samples", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert a trained checkpoint to an SNN and save its description")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    _add_config_args(p)
    _add_convert_args(p)
    p.add_argument("--data-dir", help="data for calibrating ReLU networks")
    p.add_argument("--output", "-o", help="output folder (default: CHECKPOINT_RUN/snn-NEURON)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("evaluate", help="ANN accuracy and SNN accuracy at every t = 1..T")
    p.add_argument("checkpoint", help="run folder, checkpoint folder, model.safetensors, or a converted SNN folder")
    _add_config_args(p)
    _add_convert_args(p)
    _add_eval_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_out", help="write the results here (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("adaptive latency")
    g.add_argument("--adaptive", action="store_true",
                   help="also run adaptive-latency inference (early stop on the logit margin, calibrated on the validation split)")
    g.add_argument("--max-accuracy-loss", type=float, default=0.005,
                   help="accuracy loss against fixed T allowed when calibrating the margin (default 0.005)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a converted SNN for hardware (npz or json) or as a NIR graph (nir)")
    p.add_argument("checkpoint", help="run folder, checkpoint folder, model.safetensors, or a converted SNN folder")
    _add_config_args(p)
    _add_convert_args(p)
    p.add_argument("--format", choices=["npz", "json", "nir"], default="npz",
                   help="container (npz/json: docs/EXPORT.md; nir: docs/NIR.md)")
    p.add_argument("--nir-neurons", choices=["exact", "if"], default="exact",
                   help="NIR only: neurons as exact I/Threshold/Scale compositions (default) or as NIR IF nodes")
    p.add_argument("--data-dir", help="data for calibrating ReLU networks")
    p.add_argument("--output", "-o", help="output file (default: RUN/snn.FORMAT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train on Fashion-MNIST, convert, compare IF / IF θ/2 / dual at T = 1..8")
    p.add_argument("--output", "-o", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2, to stay under 5 minutes on 2 cores)")
    p.add_argument("--max-train-samples", type=int, help="train on a seeded subset (quicker)")
    p.add_argument("--max-samples", type=int, help="evaluate on a seeded subset of the test set")
    p.add_argument("--time-steps", "-T", type=int, default=8)
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="per-layer conversion errors, firing rates, SOPs and energy of a checkpoint")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    p.add_argument("--time-steps", "-T", type=int, default=8, help="simulate T steps (default 8)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--max-samples", type=int, help="analyse a seeded subset of the split")
    p.add_argument("--output", "-o", help="output folder (default: RUN/analysis)")
    g = p.add_argument_group("conversion (default: the variants if-v0, if-v0.5 and dual-v0.5)")
    g.add_argument("--neuron", choices=config.NEURON_CHOICES, help="analyse only this neuron (default dual)")
    g.add_argument("--v-init", type=float, help="initial membrane potential in units of θ (default 0.5)")
    g.add_argument("--theta-neg", type=float, help="negative threshold of the dual neuron, in units of θ (default 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("ablate", help="the paper's ablation on Fashion-MNIST: threshold x neuron x v(0) x T, and θ_neg")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4, help="training epochs of every network (default 4)")
    p.add_argument("--output", "-o", default="ablation-output", help="output folder (default: ablation-output)")
    p.add_argument("--runs-dir", help="folder of the trained networks (default: OUTPUT/runs; benchmarks/runs to share them)")
    p.add_argument("--max-samples", type=int, help="evaluate on a seeded subset of the test and validation splits")
    p.add_argument("--max-train-samples", type=int, help="train on a seeded subset (quicker; the run name says so)")
    p.add_argument("--time-steps", "-T", type=int, nargs="+", default=[1, 2, 4, 8], help="reported T (default 1 2 4 8)")
    p.add_argument("--levels", type=int, default=4, help="quantisation levels L of the clip network (default 4)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--calibration-batches", type=int, default=8, help="validation batches for the ReLU thresholds")
    p.add_argument("--data-dir")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="training config override")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ablate)
    return parser


def _version() -> str:
    from eclsnn._util import __version__

    return __version__


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """``--set`` overrides, then the named flags (dotted config keys)."""
    out = config.parse_overrides(getattr(args, "set", []) or [])
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[key] = value
    return out


# ---- commands: flags to settings, settings to a recipe, its results to lines ---------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from eclsnn.recipes.settings import layered_config
    from eclsnn.recipes.training import train

    run = train(layered_config(_overrides(args, _TRAIN_FLAGS), getattr(args, "config", None)))
    print(f"run folder: {run}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from eclsnn.recipes.conversion import convert_to_folder

    out, snn, kwargs, ckpt = convert_to_folder(args.checkpoint, args.output,
                                               _overrides(args, {**_CONVERT_FLAGS, "data_dir": "data.data_dir"}), getattr(args, "config", None))
    print(f"converted {ckpt.meta.get('model', {}).get('arch', 'model')} ({len(snn.neurons())} neuron layers, "
          f"{kwargs['neuron']} neurons, v_init={kwargs['v_init']}·θ) -> {out}")
    for name, neuron in snn.neurons():
        theta = neuron.theta
        shown = f"{theta.item():.4g}" if theta.dim() == 0 else f"{theta.min().item():.4g}..{theta.max().item():.4g} ({theta.numel()} ch)"
        print(f"  {name:<32} θ = {shown}")
    for name, mode in snn.settings.get("maxpool_modes", {}).items():
        print(f"  {name:<32} max pool: {mode}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from eclsnn.recipes.evaluation import run_evaluate

    _, out = run_evaluate(args.checkpoint, _overrides(args, {**_CONVERT_FLAGS, **_EVAL_FLAGS}), getattr(args, "config", None),
                          device=args.device, progress=not args.no_progress, adaptive=args.adaptive,
                          max_accuracy_loss=args.max_accuracy_loss, json_out=args.json_out)
    if out is not None:  # (under torchrun only rank 0 prints and writes)
        print(f"results: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from eclsnn.recipes.export import run_export

    out, snn, notes = run_export(args.checkpoint, args.format, args.output,
                                 _overrides(args, {**_CONVERT_FLAGS, "data_dir": "data.data_dir"}), args.config,
                                 nir_neurons=args.nir_neurons)
    if args.format == "nir":
        for note in notes:  # what lives only in NIR metadata, as one line
            print(f"eclsnn: warning: {note}", file=sys.stderr)
        print(f"exported {len(snn.neurons())} neuron layers -> {out} (NIR, neurons: {args.nir_neurons}; docs/NIR.md)")
        return 0
    print(f"exported {len(snn.neurons())} neuron layers -> {out} (format: docs/EXPORT.md)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eclsnn.recipes.demo import run_demo

    run_demo(args)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from eclsnn.recipes.analysis import analysis_variants, analyze_checkpoint, format_analysis

    variants = analysis_variants(args.neuron, args.v_init, args.theta_neg)
    results, out = analyze_checkpoint(
        args.checkpoint, variants, time_steps=args.time_steps, split=args.split, max_samples=args.max_samples,
        output=args.output, batch_size=args.batch_size, data_dir=args.data_dir, device=args.device,
        progress=not args.no_progress,
    )
    if out is None:  # under torchrun only rank 0 prints and writes
        return 0
    print(f"{args.split} split, {results['num_samples']} images, T = {results['time_steps']}\n")
    print(format_analysis(results))
    print(f"\nwritten: {out / 'analysis.json'}, {out / 'analysis.md'}, {out / 'analysis.png'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from eclsnn.recipes.ablation import format_ablation, run_ablation

    results = run_ablation(
        seeds=args.seeds, epochs=args.epochs, output=args.output, runs_dir=args.runs_dir, max_samples=args.max_samples,
        max_train_samples=args.max_train_samples, time_steps=args.time_steps, levels=args.levels,
        batch_size=args.batch_size, calibration_batches=args.calibration_batches, data_dir=args.data_dir,
        train_overrides=config.parse_overrides(args.set), progress=not args.no_progress,
    )
    print()
    print(format_ablation(results))
    print(f"\nwritten: {Path(args.output) / 'ablation.json'}, {Path(args.output) / 'ablation.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EclsnnError as exc:
        print(f"eclsnn: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (full disk, permissions, a path in the way): one line
        print(f"eclsnn: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eclsnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
