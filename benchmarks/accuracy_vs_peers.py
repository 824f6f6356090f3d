"""Accuracy against time steps: eclsnn vs SpikingJelly's ann2snn on the same trained networks.

    nice -n 19 python benchmarks/accuracy_vs_peers.py [--seeds 0 1 2] [--epochs 4] [--max-samples N] [--T-max 64]

For every seed, the Fashion-MNIST demo CNN (cnn-fmnist) is trained (or taken from the cache in
benchmarks/runs/, see common.py) three times under the same budget and seed: with ReLU, and with
ThresholdClip at L = 2 and L = 4. Then, on the test set (the full 10k images unless --max-samples):

- the ReLU network converted by SpikingJelly (its ``RateCodingRecipe``: layer-wise and channel-wise
  99.9 % thresholds, each with and without the half-threshold initial membrane potential),
- the same ReLU network converted by eclsnn with thresholds calibrated by the same rule (99.9 %,
  layer-wise) -- with IF neurons starting at 0 this is the converter sanity check against
  SpikingJelly's plain layer-wise setting -- and with eclsnn's dual-threshold neuron,
- the ThresholdClip networks converted by eclsnn: IF with v_init 0, IF with v_init θ/2, dual-threshold.

Every SNN is run once for T_max steps per batch; the accuracy at every t <= T_max comes from the
running mean (eclsnn) or running sum (SpikingJelly) of the readout. Calibration data for both
converters is the same few batches of the seed's validation split (never the test set).

Writes benchmarks/results/accuracy_vs_peers.{json,md,png} (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eclsnn  # noqa: E402
from common import CONFIG, ensure_loop_run, ensure_run  # noqa: E402
from eclsnn.config import load_config  # noqa: E402
from eclsnn.recipes.common import calibration_batches, eval_loader, load_ann, load_split, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_STEPS = (1, 2, 4, 8, 16, 32, 64)

# name -> (network, library, settings); the network is "relu", "clip-L2" or "clip-L4".
SJ_VARIANTS = {
    "SJ layer 99.9%": dict(channel_wise=False, half=False),
    "SJ layer 99.9% half-thr": dict(channel_wise=False, half=True),
    "SJ channel 99.9%": dict(channel_wise=True, half=False),
    "SJ channel 99.9% half-thr": dict(channel_wise=True, half=True),
}
ECL_RELU_VARIANTS = {
    "eclsnn layer 99.9% IF v0": dict(neuron="if", v_init=0.0),
    "eclsnn layer 99.9% IF θ/2": dict(neuron="if", v_init=0.5),
    "eclsnn layer 99.9% dual θ/2": dict(neuron="dual", v_init=0.5),
}
ECL_CLIP_VARIANTS = {
    "IF v0": dict(neuron="if", v_init=0.0),
    "IF θ/2": dict(neuron="if", v_init=0.5),
    "dual θ/2": dict(neuron="dual", v_init=0.5),
}
SANITY_PAIR = ("SJ layer 99.9%", "eclsnn layer 99.9% IF v0")


# ---- SpikingJelly --------------------------------------------------------------------------------

def spikingjelly_version() -> str | None:
    try:
        from importlib.metadata import version

        import spikingjelly.activation_based.ann2snn  # noqa: F401

        return version("spikingjelly")
    except Exception:  # not installed, or a dependency is missing
        return None


def sj_convert(model: torch.nn.Module, calib: list[torch.Tensor], channel_wise: bool, half: bool) -> torch.nn.Module:
    """SpikingJelly 2.x ann2snn with its rate-coding recipe (robust normalisation, 99.9 %).

    Half threshold: the recipe's ``half_threshold=True`` (documented for ``channel_wise=True`` only);
    layer-wise, the same neuron (``neuron.HalfThresholdIFNode``, v(0) = θ/2) is passed through the
    recipe's documented ``neuron_factory`` hook.
    """
    from spikingjelly.activation_based import ann2snn, neuron

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(calib)), batch_size=calib[0].shape[0])
    kwargs = dict(dataloader=loader, mode="99.9%", channel_wise=channel_wise)
    if half and channel_wise:
        kwargs["half_threshold"] = True
    elif half:
        kwargs["neuron_factory"] = lambda scale: neuron.HalfThresholdIFNode(v_threshold=1.0)
    converter = ann2snn.Converter(ann2snn.RateCodingRecipe(**kwargs), device="cpu")
    return converter.convert(copy.deepcopy(model)).eval()


def sj_thresholds(snn: torch.nn.Module) -> list[list[float] | float]:
    """The calibrated scale of each converted activation, in graph order (θ in ANN units)."""
    out = []
    for node in snn.graph.nodes:
        if node.op == "call_module" and str(node.target).endswith("scaler1"):
            scale = snn.get_submodule(node.target).scale
            scale = torch.as_tensor(scale).detach().flatten()
            out.append(scale.item() if scale.numel() == 1 else scale.tolist())
    return out


@torch.no_grad()
def sj_run(snn: torch.nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    """SpikingJelly's documented evaluation loop: reset, feed the same image T times (single-step
    mode), accumulate the readout. Returns the running mean [T, B, classes]."""
    from spikingjelly.activation_based import functional

    functional.reset_net(snn)
    outs, acc = [], None
    for _ in range(T):
        y = snn(x)
        acc = y.clone() if acc is None else acc + y
        outs.append(acc)
    functional.reset_net(snn)
    steps = torch.arange(1, T + 1, dtype=x.dtype).view(T, 1, 1)
    return torch.stack(outs) / steps


# ---- one seed ------------------------------------------------------------------------------------

def layer_thresholds(snn: eclsnn.SpikingNetwork) -> list[list[float] | float]:
    return [t.item() if t.dim() == 0 else t.tolist() for t in snn.thresholds().values()]


def run_seed(seed: int, args, sj_ok: bool, log) -> dict:
    data_cfg = load_config(CONFIG).data
    runs = {"relu": ensure_run("relu", None, seed, args.epochs)}
    for L in args.levels:
        runs[f"clip-L{L}"] = ensure_run("clip", L, seed, args.epochs)
    if args.snn_epochs:  # the same budget: epochs - K plain epochs, then K with the T = 2 SNN in the loop
        for L in args.levels:
            runs[f"clip-L{L}-loop"] = ensure_loop_run(L, seed, args.epochs, args.snn_epochs, args.snn_lr)
    anns = {k: load_ann(p)[0] for k, p in runs.items()}
    calib = calibration_batches(data_cfg, seed, args.calib_batch_size, args.calib_batches)
    log(f"seed {seed}: calibration on {sum(x.shape[0] for x in calib)} validation images")

    nets: dict[str, tuple[str, str, torch.nn.Module]] = {}  # name -> (ann key, library, net)
    if sj_ok:
        for name, s in SJ_VARIANTS.items():
            if args.sj_variants and name not in args.sj_variants and name != SANITY_PAIR[0]:
                continue  # (the sanity check's setting always runs)
            nets[name] = ("relu", "spikingjelly", sj_convert(anns["relu"], calib, s["channel_wise"], s["half"]))
    for name, s in ECL_RELU_VARIANTS.items():
        snn = eclsnn.convert(anns["relu"], calibration=calib, threshold_rule="percentile", percentile=99.9,
                             threshold_granularity="layer", **s)
        nets[name] = ("relu", "eclsnn", snn)
    for L in args.levels:
        for name, s in ECL_CLIP_VARIANTS.items():
            nets[f"eclsnn clip L={L} {name}"] = (f"clip-L{L}", "eclsnn", eclsnn.convert(anns[f"clip-L{L}"], **s))
        if args.snn_epochs:  # trained for the dual neuron at T = 2: that is the one to run
            nets[f"eclsnn clip L={L} SNN-loop dual θ/2"] = (f"clip-L{L}-loop", "eclsnn",
                                                            eclsnn.convert(anns[f"clip-L{L}-loop"], **ECL_CLIP_VARIANTS["dual θ/2"]))

    thresholds = {name: (sj_thresholds(n) if lib == "spikingjelly" else layer_thresholds(n))
                  for name, (_, lib, n) in nets.items() if "clip" not in name}

    # The same thresholds in both simulators: eclsnn IF v0 with SpikingJelly's layer-wise scales must
    # give (nearly) the same outputs; any gap in the sanity pair is then calibration, not simulation.
    same_thr = None
    if sj_ok:
        sj_net = nets[SANITY_PAIR[0]][2]
        ecl_ref = nets[SANITY_PAIR[1]][2]
        thr = {k: torch.tensor(float(v)) for k, v in zip(ecl_ref.thresholds(), sj_thresholds(sj_net))}
        same_thr = ("relu", "eclsnn", eclsnn.convert(anns["relu"], neuron="if", v_init=0.0, thresholds=thr))

    test, idx = load_split(data_cfg, "test", 0, args.max_samples)  # fixed subset (seed 0) for every seed
    loader = eval_loader(test, idx, args.batch_size)
    T = args.T_max
    correct = {name: torch.zeros(T, dtype=torch.long) for name in nets}
    ann_correct = dict.fromkeys(anns, 0)
    seconds = dict.fromkeys(nets, 0.0)
    agree = {"samples": 0, "same_prediction_T": 0, "max_abs_logit_diff": 0.0}
    disagree = torch.zeros(T, dtype=torch.long)  # sanity pair: images whose predictions differ at t
    total, t0 = 0, time.time()
    with torch.no_grad():
        for b, (x, y) in enumerate(loader):
            preds = {}
            for k, ann in anns.items():
                ann_correct[k] += (ann(x).argmax(-1) == y).sum().item()
            for name, (_, lib, net) in nets.items():
                t1 = time.perf_counter()
                out = sj_run(net, x, T) if lib == "spikingjelly" else eclsnn.simulate(net, x, T)
                seconds[name] += time.perf_counter() - t1
                correct[name] += (out.argmax(-1) == y).sum(1)
                if name in SANITY_PAIR:
                    preds[name] = out.argmax(-1)
                if same_thr is not None and name == SANITY_PAIR[0] and b < args.sanity_batches:
                    ref = eclsnn.simulate(same_thr[2], x, T)
                    agree["samples"] += x.shape[0]
                    agree["same_prediction_T"] += (ref[-1].argmax(-1) == out[-1].argmax(-1)).sum().item()
                    agree["max_abs_logit_diff"] = max(agree["max_abs_logit_diff"], (ref - out).abs().max().item())
            if len(preds) == 2:
                disagree += (preds[SANITY_PAIR[0]] != preds[SANITY_PAIR[1]]).sum(1)
            total += y.shape[0]
            log(f"seed {seed}: {total}/{len(idx)} test images, {time.time() - t0:.0f} s")
    return {
        "seed": seed,
        "runs": {k: str(p) for k, p in runs.items()},
        "num_samples": total,
        "ann_accuracy": {k: v / total for k, v in ann_correct.items()},
        "snn_accuracy": {name: {str(t + 1): c[t].item() / total for t in range(T)} for name, c in correct.items()},
        "network_of": {name: v[0] for name, v in nets.items()},
        "library_of": {name: v[1] for name, v in nets.items()},
        "eval_seconds": seconds,
        "thresholds": thresholds,
        "same_thresholds_check": agree if same_thr is not None else None,
        "sanity_pair_disagreement": {str(t + 1): disagree[t].item() / total for t in range(T)} if sj_ok else None,
    }


# ---- aggregation and reports -------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, s


def aggregate(per_seed: list[dict], steps: list[int]) -> dict:
    names = list(per_seed[0]["snn_accuracy"])
    agg = {"ann": {}, "snn": {}}
    for k in per_seed[0]["ann_accuracy"]:
        agg["ann"][k] = mean_std([100 * r["ann_accuracy"][k] for r in per_seed])
    for n in names:
        agg["snn"][n] = {str(t): mean_std([100 * r["snn_accuracy"][n][str(t)] for r in per_seed]) for t in steps}
    return agg


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def sanity_summary(per_seed: list[dict], steps: list[int]) -> dict | None:
    a, b = SANITY_PAIR
    if a not in per_seed[0]["snn_accuracy"]:
        return None
    rows = []
    for r in per_seed:
        n = r["num_samples"]
        diffs = {str(t): 100 * (r["snn_accuracy"][b][str(t)] - r["snn_accuracy"][a][str(t)]) for t in steps}
        thr_a, thr_b = r["thresholds"][a], r["thresholds"][b]
        rel = [abs(x - y) / y for x, y in zip(thr_a, thr_b)]
        # one standard error of a difference of two accuracies near p on n images (upper bound, unpaired)
        p = r["snn_accuracy"][a][str(steps[-1])]
        se = 100 * math.sqrt(2 * p * (1 - p) / n)
        dis = r.get("sanity_pair_disagreement") or {}
        rows.append({"seed": r["seed"], "diff_points": diffs,
                     "disagreement_percent": {str(t): 100 * dis[str(t)] for t in steps if str(t) in dis}, "max_abs_diff": max(abs(d) for d in diffs.values()),
                     "se_points_at_Tmax": se, "thresholds_sj": thr_a, "thresholds_eclsnn": thr_b,
                     "max_rel_threshold_diff": max(rel), "same_thresholds_check": r["same_thresholds_check"]})
    return {"pair": [a, b], "per_seed": rows}


def write_markdown(path: Path, meta: dict, agg: dict, sanity: dict | None, per_seed: list[dict], steps: list[int]) -> None:
    L = []
    L.append("# Accuracy vs time steps: eclsnn vs SpikingJelly (Fashion-MNIST, cnn-fmnist)\n")
    L.append(f"Command: `{meta['command']}`\n")
    L.append(f"Seeds {meta['seeds']} (mean ± sample std over seeds; a single seed shows no std), "
             f"{meta['epochs']} epochs per network (same budget and seed for ReLU and ThresholdClip), "
             f"**{meta['num_samples']} test images**{' (a seeded subset of the 10k test set, not the full set)' if meta['num_samples'] < 10000 else ' (the full test set)'}, "
             f"every SNN run once for T = {meta['T_max']} steps. Calibration: {meta['calibration_images']} images of the "
             f"validation split per seed, the same for both converters. SpikingJelly {meta['spikingjelly']}, torch {meta['torch']}, "
             f"{meta['threads']} threads.\n")
    if meta.get("notes"):
        L.append("**Notes:** " + meta["notes"] + "\n")
    head = "| network | converter / neuron | " + " | ".join(f"T={t}" for t in steps) + " |"
    L.append(head)
    L.append("|---|---|" + "---|" * len(steps))
    ann_names = {"relu": "ReLU", **{f"clip-L{L}": f"ThresholdClip L={L}" for L in meta["levels"]},
                 **{f"clip-L{L}-loop": f"ThresholdClip L={L}: {meta['epochs'] - (meta.get('snn_epochs') or 0)} plain epochs + "
                                       f"{meta.get('snn_epochs')} with the T=2 SNN in the loop ("
                                       + (f"lr restarted at {meta['snn_lr']:g})" if meta.get("snn_lr") else "one schedule)")
                    for L in meta["levels"]}}
    for k, v in agg["ann"].items():
        L.append(f"| {ann_names[k]} | ANN | {fmt(v)} (all T) " + "| " * (len(steps) - 1) + "|")
    net_of = per_seed[0]["network_of"]
    for n, accs in agg["snn"].items():
        label = n.replace(f"clip L={n.split('L=')[1].split()[0]} ", "").replace("SNN-loop ", "") if "clip L=" in n else n
        L.append(f"| {ann_names[net_of[n]]} | {label} | " + " | ".join(fmt(accs[str(t)]) for t in steps) + " |")
    L.append("")
    L.append("Evaluation time per network (seconds for all test images at T = "
             f"{meta['T_max']}, first seed, on the 2-core machine while other jobs ran at times; not a speed benchmark -- "
             "see speed.md): " + ", ".join(f"{n}: {s:.0f}" for n, s in per_seed[0]["eval_seconds"].items()) + "\n")
    if sanity:
        a, b = sanity["pair"]
        L.append(f"## Converter sanity check: `{a}` vs `{b}`\n")
        L.append("Same ReLU network, same calibration images, same rule (99.9th percentile, one threshold per layer), "
                 "IF neurons with reset by subtraction starting at 0, on both sides.\n")
        L.append("| seed | max |Δacc| over T (points) | Δacc at T=" + ", ".join(str(t) for t in steps)
                 + " (eclsnn − SJ) | images predicted differently at T=" + ", ".join(str(t) for t in steps) + " (%) | 1 s.e. of an unpaired difference | max rel. threshold diff | eclsnn with SJ's thresholds: same prediction at T_max / max |Δlogit| |")
        L.append("|---|---|---|---|---|---|---|")
        for r in sanity["per_seed"]:
            c = r["same_thresholds_check"] or {}
            same = f"{c.get('same_prediction_T', 0)}/{c.get('samples', 0)} / {c.get('max_abs_logit_diff', float('nan')):.2e}"
            L.append(f"| {r['seed']} | {r['max_abs_diff']:.2f} | " + ", ".join(f"{r['diff_points'][str(t)]:+.2f}" for t in steps)
                     + " | " + ", ".join(f"{v:.1f}" for v in r["disagreement_percent"].values()) + f" | {r['se_points_at_Tmax']:.2f} | {100 * r['max_rel_threshold_diff']:.2f} % | {same} |")
        L.append("")
        r0 = sanity["per_seed"][0]
        L.append("Thresholds (seed %d), SpikingJelly: %s; eclsnn: %s.\n" % (
            r0["seed"], ", ".join(f"{v:.4f}" for v in r0["thresholds_sj"]), ", ".join(f"{v:.4f}" for v in r0["thresholds_eclsnn"])))
        L.append(meta.get("sanity_explanation", "") + "\n")
    if meta.get("targets"):
        L.append("## Issue 4 targets\n")
        for line in meta["targets"]:
            L.append(f"- {line}")
        L.append("")
    path.write_text("\n".join(L))


def targets(agg: dict) -> list[str]:
    out = []
    sj = [n for n in agg["snn"] if n.startswith("SJ")]
    levels = sorted({int(k[6:].split("-")[0]) for k in agg["ann"] if k.startswith("clip-L")})
    if sj and "16" in agg["snn"][sj[0]]:
        best16 = max(sj, key=lambda n: agg["snn"][n]["16"][0])
        s16, s16_sd = agg["snn"][best16]["16"]
        for L, v in [(L, v) for L in levels for v in ("", " SNN-loop")]:
            n, label = f"eclsnn clip L={L}{v} dual θ/2", f"eclsnn dual (L={L}{', SNN in the loop' if v else ''})"
            if n not in agg["snn"]:
                continue
            d2, d2_sd = agg["snn"][n]["2"]
            out.append(f"{label} at T=2: {d2:.2f} ± {d2_sd:.2f} % vs SpikingJelly's best at T=16 ({best16}): "
                       f"{s16:.2f} ± {s16_sd:.2f} % -> {'met' if d2 > s16 else 'NOT met'}")
            reach = [int(t) for t, (m, _) in agg["snn"][n].items() if m >= s16]
            if reach:
                out.append(f"  ({label} first reaches SpikingJelly's T=16 accuracy at T={min(reach)})")
    for L, v in [(L, v) for L in levels for v in ("", " SNN-loop")]:
        n, label = f"eclsnn clip L={L}{v} dual θ/2", f"eclsnn dual (L={L}{', SNN in the loop' if v else ''})"
        ann = f"clip-L{L}{'-loop' if v else ''}"
        if n in agg["snn"] and "4" in agg["snn"][n]:
            gap = agg["ann"][ann][0] - agg["snn"][n]["4"][0]
            out.append(f"{label} at T=4: ANN − SNN = {gap:+.2f} points (target: at most 0.5) -> "
                       f"{'met' if gap <= 0.5 else 'NOT met'}")
    return out


def plot(path: Path, agg: dict, per_seed: list[dict], steps: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net_of = per_seed[0]["network_of"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    panels = [("ReLU network: SpikingJelly vs eclsnn", lambda n: net_of[n] == "relu", ["relu"]),
              ("ThresholdClip networks: eclsnn", lambda n: net_of[n] != "relu", ["clip-L2", "clip-L4"])]
    for ax, (title, keep, anns) in zip(axes, panels):
        for n, accs in agg["snn"].items():
            if not keep(n):
                continue
            m = [accs[str(t)][0] for t in steps]
            s = [0 if math.isnan(accs[str(t)][1]) else accs[str(t)][1] for t in steps]
            style = "--" if n.startswith("SJ") else ("-." if "L=2" in n else "-")
            ax.errorbar(steps, m, yerr=s, marker="o", ms=3, linestyle=style, capsize=2, label=n)
        for k in [a for a in anns if a in agg["ann"]]:
            ax.axhline(agg["ann"][k][0], color="k", linestyle=":" if k == "clip-L2" else "--", lw=0.8,
                       label=f"ANN {k}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(t) for t in steps])
        ax.set_xlabel("time steps T")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("top-1 test accuracy (%)")
    axes[0].set_ylim(bottom=max(0, min(min(a[str(steps[0])][0] for a in agg["snn"].values()) - 5, 80)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-samples", type=int, default=None, help="a seeded subset of the test set (default: all 10k)")
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 4], help="L of the ThresholdClip networks")
    ap.add_argument("--T-max", dest="T_max", type=int, default=64)
    ap.add_argument("--snn-epochs", type=int, default=0,
                    help="also train each ThresholdClip network with its last K of --epochs with the T=2 SNN in the loop")
    ap.add_argument("--snn-lr", type=float, default=0.0,
                    help="lr the in-the-loop epochs restart from (train.snn_lr; 0: one schedule over all epochs)")
    ap.add_argument("--sj-variants", nargs="+", choices=list(SJ_VARIANTS), default=None,
                    help="run only these SpikingJelly settings, plus the sanity check's (default: all four)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calib-batch-size", type=int, default=256)
    ap.add_argument("--sanity-batches", type=int, default=4, help="batches on which eclsnn re-runs SJ's own thresholds")
    ap.add_argument("--notes", default="", help="free text written into the results (e.g. why fewer seeds)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the Markdown, the targets and the plot from an existing accuracy_vs_peers.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [t for t in REPORT_STEPS if t <= args.T_max]
    sj = spikingjelly_version()
    if sj is None:
        print("SpikingJelly is not importable: its rows are skipped (pip install --no-deps -r benchmarks/requirements-peers.txt)")

    def log(msg):
        print(msg, flush=True)

    if args.render:
        out = json.loads((args.out / "accuracy_vs_peers.json").read_text())
        out["meta"]["targets"] = targets(out["aggregate"])
        write_json(args.out / "accuracy_vs_peers.json", out)
        write_markdown(args.out / "accuracy_vs_peers.md", out["meta"], out["aggregate"], out["sanity"], out["per_seed"],
                       out["steps"])
        plot(args.out / "accuracy_vs_peers.png", out["aggregate"], out["per_seed"], out["steps"])
        print((args.out / "accuracy_vs_peers.md").read_text())
        return

    per_seed = []
    partial = args.out / "accuracy_vs_peers.partial.json"
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args, sj is not None, log))
        write_json(partial, per_seed)
    agg = aggregate(per_seed, steps)
    sanity = sanity_summary(per_seed, steps)
    meta = {
        "command": "python benchmarks/accuracy_vs_peers.py " + " ".join(sys.argv[1:]),
        "seeds": args.seeds, "epochs": args.epochs, "snn_epochs": args.snn_epochs, "snn_lr": args.snn_lr, "levels": args.levels, "num_samples": per_seed[0]["num_samples"], "T_max": args.T_max,
        "calibration_images": args.calib_batches * args.calib_batch_size, "spikingjelly": sj or "not installed",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "notes": args.notes, "sanity_explanation": "",
    }
    meta["targets"] = targets(agg)
    if sanity:
        worst = max(r["max_abs_diff"] for r in sanity["per_seed"])
        se = max(r["se_points_at_Tmax"] for r in sanity["per_seed"])
        thr = max(r["max_rel_threshold_diff"] for r in sanity["per_seed"])
        checks = [r["same_thresholds_check"] for r in sanity["per_seed"] if r["same_thresholds_check"]]
        same = sum(c["same_prediction_T"] for c in checks)
        n = sum(c["samples"] for c in checks)
        dlogit = max((c["max_abs_logit_diff"] for c in checks), default=float("nan"))
        verdict = "agree within noise" if worst <= 2 * se else "DIFFER by more than two standard errors"
        meta["sanity_explanation"] = (
            f"Largest accuracy gap over T and seeds: {worst:.2f} points; one standard error of an unpaired difference at "
            f"T_max is {se:.2f} points, so the two converters {verdict}. Their thresholds differ by at most {100 * thr:.2f} %: "
            "SpikingJelly keeps an exponential moving average (momentum 0.1) of each calibration batch's torch.quantile "
            "(linear interpolation), eclsnn the plain mean of each batch's 99.9th-percentile order statistic. Given "
            f"SpikingJelly's own thresholds, eclsnn's simulator gives the same prediction at T_max for {same} of {n} images "
            f"(max |Δ readout| {dlogit:.1e}; SpikingJelly divides the current by the threshold and multiplies the spikes "
            "back, eclsnn compares with θ directly, so float32 rounding can flip a spike that sits exactly on the threshold).")
    out = {"meta": meta, "steps": steps, "aggregate": agg, "sanity": sanity, "per_seed": per_seed}
    write_json(args.out / "accuracy_vs_peers.json", out)
    write_markdown(args.out / "accuracy_vs_peers.md", meta, agg, sanity, per_seed, steps)
    plot(args.out / "accuracy_vs_peers.png", agg, per_seed, steps)
    partial.unlink(missing_ok=True)
    print((args.out / "accuracy_vs_peers.md").read_text())


if __name__ == "__main__":
    main()
