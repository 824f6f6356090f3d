"""Which networks people have convert? A fixed list of classification models from torchvision and timm
(random weights, no downloads), each taken through ``eclsnn.prepare`` and ``eclsnn.convert``.

Per model: does it prepare (ReLU/ReLU6 → ThresholdClip, L = 4)? Does it convert, and with which max-pool
policy — ``"error"`` (exact modes only: static pools and swaps onto static input), else ``"auto"`` (adds the
spiking max pool, cummax: exact on the SNN's own counts), else ``"avg"`` (an approximation, counted apart)?
For those that convert: the SNN's logits against the BN-folded prepared (quantised) ANN's at T = L and
T = 4L — relative L2 error ||snn − ann|| / ||ann|| over the batch and top-1 agreement. For those that do not:
the ConversionError's reasons, counted.

Random weights need care to mean something: every BatchNorm's statistics are first recalibrated on 200
synthetic images (smooth random fields, fixed seed), so activations have the scale of a trained network's;
λ of each clip is the 99.9th percentile of its ReLU's output on 64 more; the error is measured on 32 others.
Input 3×64×64, 10 classes, dual-threshold neurons with v(0) = θ/2 (the defaults of ``eclsnn.convert``).
One more column: the error at T = 4L against the same network with unquantised clips (``prepare(levels=None)``),
the ANN the SNN's rates approach as T grows. Untrained, the L = 4 network's activations sit far below λ and
most round to 0, so the quantised ANN is far from both (the table says how far); a network trained with the
clip uses the levels, and that gap is what training closes.

    PYTHONPATH=src python benchmarks/zoo_coverage.py            # ~10-20 min on 2 cores
    PYTHONPATH=src python benchmarks/zoo_coverage.py --models torchvision:resnet18 timm:vgg11_bn

writes benchmarks/results/zoo_coverage.md and .json (a run with --models writes nothing unless --output).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # vision_libs: the model definitions on any torch build

import vision_libs  # noqa: E402
from vision_libs import recalibrate_batchnorm, synthetic_images  # noqa: E402

import eclsnn  # noqa: E402
from eclsnn.conversion.converter import fold_batchnorm  # noqa: E402
from eclsnn.conversion.graph import normalise, trace  # noqa: E402
from eclsnn.errors import ConversionError  # noqa: E402
from eclsnn.models import create  # noqa: E402

LEVELS = 4
SIDE = 64
CLASSES = 10

#: (arch, family): the fixed list
MODELS = [
    ("torchvision:resnet18", "ResNet"), ("torchvision:resnet50", "ResNet"),
    ("torchvision:resnext50_32x4d", "ResNeXt"), ("torchvision:wide_resnet50_2", "Wide ResNet"),
    ("torchvision:vgg11", "VGG"), ("torchvision:vgg11_bn", "VGG-BN"), ("torchvision:alexnet", "AlexNet"),
    ("torchvision:mobilenet_v2", "MobileNet v2"), ("torchvision:mobilenet_v3_small", "MobileNet v3"),
    ("torchvision:densenet121", "DenseNet"), ("torchvision:squeezenet1_1", "SqueezeNet"),
    ("torchvision:shufflenet_v2_x0_5", "ShuffleNet v2"), ("torchvision:googlenet", "GoogLeNet"),
    ("torchvision:mnasnet0_5", "MNASNet"), ("torchvision:regnet_x_400mf", "RegNet X"),
    ("torchvision:regnet_y_400mf", "RegNet Y"), ("torchvision:efficientnet_b0", "EfficientNet"),
    ("torchvision:convnext_tiny", "ConvNeXt"),
    ("timm:resnet18", "ResNet"), ("timm:resnet18d", "ResNet-D"), ("timm:resnet26t", "ResNet-D"),
    ("timm:vgg11_bn", "VGG-BN"), ("timm:dla34", "DLA"), ("timm:dpn68", "DPN"), ("timm:selecsls42b", "SelecSLS"),
    ("timm:hrnet_w18_small", "HRNet"), ("timm:regnetx_002", "RegNet X"), ("timm:mobilenetv2_050", "MobileNet v2"),
    ("timm:seresnet18", "SE-ResNet"), ("timm:efficientnet_b0", "EfficientNet"), ("timm:convnext_atto", "ConvNeXt"),
    ("timm:vit_tiny_patch16_224", "ViT"),
]


def folded(prepared: nn.Module) -> nn.Module:
    """The prepared ANN with BatchNorm folded, as the converter computes it (the reference of the SNN)."""
    gm = trace(prepared)
    normalise(gm)
    return fold_batchnorm(gm).eval()


def reasons(exc: Exception) -> str:
    """The reasons of a ConversionError, each with its count (one line)."""
    text = str(exc)
    lines = [ln[4:] for ln in text.splitlines() if ln.startswith("  - ")]
    if not lines:
        return text.splitlines()[0]
    whys = Counter(ln.split(": ", 1)[1].split(";")[0] if ": " in ln else ln for ln in lines)
    return "; ".join(f"{why} ×{n}" for why, n in whys.most_common())


def _pool_refusal(exc: ConversionError) -> bool:
    return re.match(r"cannot convert \d+ max pool", str(exc)) is not None


def one_model(arch: str, family: str, bn_images, calibration, x) -> dict:
    t0 = time.perf_counter()
    row: dict = {"arch": arch, "family": family}
    torch.manual_seed(0)
    model = create(arch, num_classes=CLASSES, activation="relu", pool="max")
    recalibrate_batchnorm(model, bn_images)
    try:
        prepared = eclsnn.prepare(model, levels=LEVELS, calibration=calibration, maxpool="swap")
        row["prepares"] = True
    except ConversionError as exc:
        prepared, row["prepares"], row["prepare_reason"] = None, False, reasons(exc)
    snn, error = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "avg" warns; it is reported in the table
        for policy in ("error", "auto", "avg"):
            try:
                snn = eclsnn.convert(prepared if prepared is not None else model, maxpool=policy,
                                     calibration=None if prepared is not None else calibration)
                row["policy"] = policy
                break
            except ConversionError as exc:
                error = exc
                if not _pool_refusal(exc):
                    break
    row["converts"] = snn is not None
    if snn is None:
        row["reason"] = reasons(error)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    modes = snn.settings.get("maxpool_modes", {})
    row["pools"] = dict(Counter(modes.values()))
    row["category"] = "avg" if "avg" in modes.values() else "meaning-preserving"
    with torch.no_grad():
        ann = folded(prepared)(x)
        out = eclsnn.simulate(snn, x, 4 * LEVELS)
        unquantised = folded(eclsnn.prepare(model, levels=None, calibration=calibration, maxpool="swap"))(x)
    for T in (LEVELS, 4 * LEVELS):
        s = out[T - 1]
        row[f"rel_l2_T{T}"] = float((s - ann).norm() / ann.norm())
        row[f"agree_T{T}"] = float((s.argmax(1) == ann.argmax(1)).float().mean())
    row[f"rel_l2_T{4 * LEVELS}_unquantised"] = float((out[-1] - unquantised).norm() / unquantised.norm())
    row["quantised_vs_unquantised"] = float((ann - unquantised).norm() / unquantised.norm())
    row["neuron_layers"] = len(snn.neurons())
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | family | prepares | converts (policy) | max pools | rel. L2 T=4 | top-1 agree T=4 | "
            "rel. L2 T=16 | top-1 agree T=16 | rel. L2 T=16 vs unquantised | quantised vs unquantised ANN | s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pools = ", ".join(f"{k} ×{v}" for k, v in r.get("pools", {}).items()) or "–"
        if r["converts"]:
            cells = [f"yes ({r['policy']})", pools, f"{r['rel_l2_T4']:.3f}", f"{r['agree_T4']:.2f}",
                     f"{r['rel_l2_T16']:.3f}", f"{r['agree_T16']:.2f}", f"{r['rel_l2_T16_unquantised']:.3f}",
                     f"{r['quantised_vs_unquantised']:.3f}"]
        else:
            cells = [f"**no**: {r['reason']}", "", "", "", "", "", "", ""]
        lines.append(f"| {r['arch']} | {r['family']} | {'yes' if r['prepares'] else 'no'} | " + " | ".join(cells)
                     + f" | {r['seconds']} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    exact = [r for r in rows if r["converts"] and r["category"] == "meaning-preserving"]
    avg = [r for r in rows if r["converts"] and r["category"] == "avg"]
    refused = [r for r in rows if not r["converts"]]
    return {"models": len(rows), "meaning_preserving": len(exact),
            "exact_modes_only": sum(r["policy"] == "error" for r in exact),
            "meaning_preserving_families": sorted({r["family"] for r in exact}),
            "avg_only": len(avg), "refused": len(refused),
            "refused_models": [r["arch"] for r in refused]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="only these (arch names of the list, or any torchvision:/timm: name)")
    ap.add_argument("--output", help="folder for zoo_coverage.md/.json (default: benchmarks/results for the full list)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    vision_libs.import_vision_libs()
    families = dict(MODELS)
    chosen = [(a, families.get(a, "?")) for a in args.models] if args.models else MODELS
    bn_images, calibration, x = (synthetic_images(n, seed, SIDE) for n, seed in ((200, 1), (64, 2), (32, 3)))
    t0 = time.perf_counter()
    rows = []
    for arch, family in chosen:
        row = one_model(arch, family, bn_images, calibration, x)
        rows.append(row)
        shown = (f"{row['policy']}, {row['pools']}, rel L2 T=4 {row['rel_l2_T4']:.3f} / T=16 {row['rel_l2_T16']:.3f}, "
                 f"agree {row['agree_T4']:.2f} / {row['agree_T16']:.2f}" if row["converts"] else f"refused: {row['reason']}")
        print(f"{arch:<32} {row['seconds']:>6.1f}s  {shown}", flush=True)
    total = time.perf_counter() - t0
    s = summary(rows)
    print(json.dumps(s))
    print(f"total {total:.0f} s")
    out = Path(args.output) if args.output else (ROOT / "results" if not args.models else None)
    if out is None:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "torchvision": vision_libs.version("torchvision"),
                "timm": vision_libs.version("timm"), "eclsnn": eclsnn.__version__}
    (out / "zoo_coverage.json").write_text(json.dumps({"summary": s, "rows": rows, "versions": versions,
                                                       "seconds": round(total)}, indent=1) + "\n")
    md = [
        "# Zoo coverage: torchvision and timm models through prepare → convert → simulate",
        "",
        "`PYTHONPATH=src python benchmarks/zoo_coverage.py` (random weights, BatchNorm statistics recalibrated on 200 "
        f"synthetic 3×64×64 images, L = {LEVELS}, dual-threshold neurons v(0) = θ/2; {', '.join(f'{k} {v}' for k, v in versions.items())}; "
        f"{round(total)} s on this machine, 2 cores shared with other jobs).",
        "",
        f"**{s['models']} models: {s['meaning_preserving']} convert in meaning-preserving modes "
        f"({len(s['meaning_preserving_families'])} families: {', '.join(s['meaning_preserving_families'])}; "
        f"{s['exact_modes_only']} of them with exact modes only, policy `error`, the others with spiking max pools); "
        f"{s['avg_only']} only with max pools replaced by average pooling; {s['refused']} refused with a ConversionError.**",
        "",
        "Policy: the first of `error` (exact modes only), `auto` (adds the spiking max pool, exact on the SNN's counts), "
        "`avg` (an approximation) that converts. Max pools: the mode of each pool (static, swap, cummax, avg). "
        "Errors are against the BN-folded prepared (quantised) ANN on 32 other synthetic images, at T = L and T = 4L.",
        "",
        table(rows),
        "",
    ]
    (out / "zoo_coverage.md").write_text("\n".join(md))
    print(f"written: {out / 'zoo_coverage.md'}, {out / 'zoo_coverage.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
