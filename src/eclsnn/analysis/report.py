"""Reports of an analysis (:func:`eclsnn.analysis.decomposition.analyze`): the Markdown tables and the figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from eclsnn.analysis.counting import E_AC_PJ, E_MAC_PJ
from eclsnn.analysis.decomposition import ERRORS

__all__ = ["format_analysis", "plot_analysis"]

def _si(n: float | None) -> str:
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _theta_str(theta) -> str:
    if isinstance(theta, list):
        return f"{min(theta):.3g}..{max(theta):.3g}"
    return f"{theta:.3g}"


def format_analysis(results: dict[str, Any]) -> str:
    """Three Markdown tables: per-layer errors and firing rates, per-layer operations, totals."""
    T = results["time_steps"]
    lines = [
        f"Errors per neuron layer at T = {T}, each layer against its own mean SNN input Ī: mean |e| in units "
        "of θ (signed mean in brackets); firing rates in spikes per neuron per step.",
        "",
        "| variant | layer | θ | clipping | quantization | unevenness | total | clipped | rate + | rate − |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, res in results["variants"].items():
        for n in res["neurons"]:
            cells = [f"{n['errors'][k]['mean_abs_theta']:.4f} ({n['errors'][k]['mean_theta']:+.4f})" for k in ERRORS]
            lines.append(f"| {v} | {n['name']} | {_theta_str(n['theta'])} | " + " | ".join(cells)
                         + f" | {100 * n['clipped_fraction']:.2f}% | {n['firing_rate']['positive']:.4f} | {n['firing_rate']['negative']:.4f} |")
    pools = [(v, p) for v, res in results["variants"].items() for p in res.get("pools", [])]
    if pools:
        lines += [
            "",
            f"Spiking max pools (maxpool='cummax') at T = {T}: `self` is the largest |r_out − maxpool(r_in)| (0: exact on "
            "the SNN's own counts); `bias` is r_out − maxpool(clamp(Ī, 0, θ)) of the neuron layer feeding it, in units of θ, "
            "mean |·| (signed mean); rate − counts the retractions.",
            "",
            "| variant | pool | fed by | self | bias | rate + | rate − | comparisons |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v, p in pools:
            b = p["bias"]
            bias = "–" if b["mean_abs_theta"] is None else f"{b['mean_abs_theta']:.4f} ({b['mean_theta']:+.4f})"
            lines.append(f"| {v} | {p['name']} | {p['source'] or 'concatenation'} | {p['self_error_max']:.2g} | {bias} | "
                         f"{p['firing_rate']['positive']:.4f} | {p['firing_rate']['negative']:.4f} | {_si(p['comparisons'])} |")
    lines += [
        "",
        f"Operations per image over T = {T} steps (ANN: one pass).",
        "",
        "| variant | layer | input | ANN MACs | SNN SOPs | SNN MACs | SOPs if pool folded |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, res in results["variants"].items():
        for s in res["synapses"]:
            lines.append(f"| {v} | {s['name']} | {s['input']} | {_si(s['ann_macs'])} | {_si(s['snn_sops'])} | "
                         f"{_si(s['snn_macs'])} | {_si(s['snn_sops_pool_folded'])} |")
    lines += [
        "",
        f"Totals per image (E_AC = {E_AC_PJ} pJ/SOP, E_MAC = {E_MAC_PJ} pJ/MAC).",
        "",
        "| variant | SNN acc. | SOPs | MACs | neuron updates/step | E_SNN (µJ) | E_ANN (µJ) | E_SNN/E_ANN | same, pool folded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, res in results["variants"].items():
        t = res["totals"]
        folded = t.get("energy_ratio_snn_ann_pool_folded")
        lines.append(f"| {v} | {100 * res['snn_accuracy']:.2f} | {_si(t['snn_sops'])} | {_si(t['snn_macs'])} | "
                     f"{_si(t['neuron_updates_per_step'])} | {t['snn_energy_uj']:.3f} | {t['ann_energy_uj']:.3f} | "
                     f"{t['energy_ratio_snn_ann']:.3f} | {'–' if folded is None else f'{folded:.3f}'} |")
    if results.get("ann_accuracy") is not None:
        lines += ["", f"ANN accuracy: {100 * results['ann_accuracy']:.2f} % on {results['num_samples']} images."]
    return "\n".join(lines)


def plot_analysis(results: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Per-layer errors (one panel per error), firing rates and energy, every variant side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["variants"])
    layers = [n["name"] for n in results["variants"][variants[0]]["neurons"]]
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, key in zip(axes[0], ERRORS[:3]):
        for i, v in enumerate(variants):
            values = [n["errors"][key]["mean_abs_theta"] for n in results["variants"][v]["neurons"]]
            ax.bar([j + i * width for j in range(len(layers))], values, width, label=v)
        ax.set_title(f"{key} error, mean |e| / θ")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[1][0]
    for i, v in enumerate(variants):
        neurons = results["variants"][v]["neurons"]
        xs = [j + i * width for j in range(len(layers))]
        bars = ax.bar(xs, [n["firing_rate"]["positive"] for n in neurons], width, label=f"{v} +")
        ax.bar(xs, [-n["firing_rate"]["negative"] for n in neurons], width, color=bars.patches[0].get_facecolor(), hatch="//", alpha=0.6)
    ax.axhline(0, color="k", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title("firing rate per neuron per step (negative spikes below 0)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    synapses = [s["name"] for s in results["variants"][variants[0]]["synapses"]]
    for i, v in enumerate(variants):
        syn = results["variants"][v]["synapses"]
        energy = [(E_AC_PJ * s["snn_sops"] + E_MAC_PJ * s["snn_macs"]) * 1e-6 for s in syn]
        ax.bar([j + i * width for j in range(len(synapses))], energy, width, label=v)
    ann = [E_MAC_PJ * s["ann_macs"] * 1e-6 for s in results["variants"][variants[0]]["synapses"]]
    ax.scatter([j + 0.4 - width / 2 for j in range(len(synapses))], ann, color="k", marker="_", s=300, label="ANN", zorder=3)
    ax.set_title(f"energy per layer per image (µJ), T = {results['time_steps']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(synapses))], synapses, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][2]
    totals = [results["variants"][v]["totals"] for v in variants]
    folded = all("snn_energy_uj_pool_folded" in t for t in totals)
    w = 0.4 if folded else 0.6
    ax.bar([i - (w / 2 if folded else 0) for i in range(len(variants))], [t["snn_energy_uj"] for t in totals], w,
           label="SNN (pooled spikes as MACs)")
    if folded:
        ax.bar([i + w / 2 for i in range(len(variants))], [t["snn_energy_uj_pool_folded"] for t in totals], w,
               label="SNN (pools folded: SOPs)")
    ax.axhline(totals[0]["ann_energy_uj"], color="k", linestyle="--", label="ANN")
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax.set_title("total energy per image (µJ)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
