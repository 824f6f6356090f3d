"""Speed on CPU: eclsnn's SNN vs SpikingJelly's converted SNN vs the BN-folded ANN, on the same network.

    nice -n 19 python benchmarks/speed.py [--threads 2] [--reps 5] [--steps 1 2 4 8 16]
    nice -n 19 python benchmarks/speed.py --arch resnet20 --skip memory training   # at depth (19 spiking layers)

Network: the Fashion-MNIST demo CNN trained with ThresholdClip (L = 4, seed 0, from benchmarks/runs/,
see common.py). eclsnn converts it to dual-threshold neurons (v(0) = θ/2). SpikingJelly's converter
needs ReLU activations, so it gets a copy of the same trained weights with every ThresholdClip
replaced by nn.ReLU (thresholds calibrated by its 99.9 % rule on validation images); the layers, shapes
and therefore the work of a dense simulation are identical.

Measured, all in one process with the same torch thread count, batch 256 of real test images, after
warm-up, with the systems *interleaved* (each repetition times every system once, in turn), medians
over repetitions:

- images/s of the BN-folded ANN (``fold_batchnorm(trace(model))``) of the ThresholdClip network and of
  the same weights with ReLU, contiguous and channels-last; the fastest of the four is the baseline,
- images/s of eclsnn's SNN at each T (``snn.run(x, T)``, what ``eclsnn.simulate`` calls), and at
  ``--variant-steps`` the cumulative variants of :func:`eclsnn_variant` (reference path → fused
  kernels → neuron+pool fusion → sub-batches; and the default without the constant first layer),
  which say which trick bought what,
- a sweep of the sub-batch size ``max_rows`` (``--rows``), from which its default is chosen,
- images/s of SpikingJelly's SNN at each T in single-step mode (its documented loop: reset, call
  the network T times) and in multi-step mode (``functional.set_step_mode(net, "m")``, one call on the
  input repeated T times),
- the ratio (SNN time at T) / (T × ANN time), each from times of the same repetition,
- peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh subprocess per measurement
  (peak resident set size of the whole process, and its growth over the process after set-up),
- training images/s with ReLU vs ThresholdClip (same model, batch 128, SGD, channels-last as the trainer
  on CPU, interleaved blocks of steps), with the clip on the fused kernel and on the reference path,
- spike-for-spike check: eclsnn's fast ``snn.run(x, T)`` vs a plain single-step loop on the PyTorch
  reference path on the trained network in float64.

Writes benchmarks/results/speed.{json,md}. Absolute numbers move with the machine's load, the
side-by-side ratios much less; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eclsnn  # noqa: E402
from common import CONFIG, ensure_run  # noqa: E402
from eclsnn.config import load_config  # noqa: E402
from eclsnn.conversion.converter import fold_batchnorm, trace  # noqa: E402
from eclsnn.recipes.common import calibration_batches, eval_loader, load_ann, load_split, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- the systems ---------------------------------------------------------------------------------

def relu_copy(model: nn.Module) -> nn.Module:
    """The same trained network with every ThresholdClip replaced by nn.ReLU (for SpikingJelly)."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, eclsnn.ThresholdClip):
            parent_name, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, leaf, nn.ReLU())
    return m.eval()


#: the networks this benchmark times: the demo CNN (trained here if missing) and resnet20 (19 spiking
#: layers), trained by ``benchmarks/depth.py train`` (configs/fmnist-resnet20.toml, 10 epochs, seed 0)
ARCHS = ("cnn-fmnist", "resnet20")
RESNET20_RUN = "fmnist-clip-L4-e10-s0-resnet20"


def _config(arch: str) -> Path:
    return CONFIG if arch == "cnn-fmnist" else CONFIG.parent / "fmnist-resnet20.toml"


def build(epochs: int, calib_batches: int = 2, arch: str = "cnn-fmnist"):
    if arch == "cnn-fmnist":
        run = ensure_run("clip", 4, 0, epochs)
    else:
        from common import RUNS

        run = RUNS / RESNET20_RUN
        if not (run / "checkpoints").is_dir():
            raise SystemExit(f"{run} is not trained yet: run `python benchmarks/depth.py train --only {RESNET20_RUN}`")
    model, _ = load_ann(run)
    data = load_config(_config(arch)).data
    test, idx = load_split(data, "test", 0)
    x = next(iter(eval_loader(test, idx[:256], 256)))[0]
    calib = calibration_batches(data, 0, 256, calib_batches)
    ann = {"clip": fold_batchnorm(trace(model)).eval(), "relu": fold_batchnorm(trace(relu_copy(model))).eval()}
    ann_cl = {k: copy.deepcopy(v).to(memory_format=torch.channels_last) for k, v in ann.items()}
    snn = eclsnn.convert(model, neuron="dual", v_init=0.5)
    sj = None
    try:
        from spikingjelly.activation_based import ann2snn

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(calib)), batch_size=256)
        sj = ann2snn.Converter(ann2snn.RateCodingRecipe(dataloader=loader, mode="99.9%"), device="cpu").convert(
            relu_copy(model)).eval()
    except ImportError:
        pass
    return run, model, ann, ann_cl, snn, sj, x


def sj_single(net, x, T):
    from spikingjelly.activation_based import functional

    functional.reset_net(net)
    out = None
    for _ in range(T):
        y = net(x)
        out = y if out is None else out + y
    functional.reset_net(net)
    return out


def sj_multi(net, x, T):
    from spikingjelly.activation_based import functional

    functional.reset_net(net)
    out = net(x.unsqueeze(0).repeat(T, *([1] * x.dim()))).sum(0)
    functional.reset_net(net)
    return out


def eclsnn_variant(snn, x, T, variant: str):
    """One way of running eclsnn's simulation, to attribute the speed to its tricks (cumulative):

    - ``reference``: the PyTorch reference path (eager neuron loops), whole batch at once, first layer once;
    - ``kernels``: + the fused C neuron kernels;
    - ``fusion``: + each neuron layer fused with the average pooling after it;
    - ``addition fusion``: + each residual addition formed inside the kernel of the neuron after it;
    - ``default``: + sub-batches of ``snn.max_rows`` rows (what ``eclsnn.simulate`` does);
    - ``default, first layer T times``: the default without the constant-first-layer trick (the input fed
      as a T-step sequence through ``snn(x_seq)``, sub-batched the same way).
    """
    saved = snn.max_rows, snn.fuse_pooling, snn.fuse_additions
    try:
        if variant in ("reference", "kernels", "fusion", "addition fusion"):
            snn.max_rows = None
            snn.fuse_pooling = variant in ("fusion", "addition fusion")
            snn.fuse_additions = variant == "addition fusion"
            if variant == "reference":
                with eclsnn.core.backends.cpu.reference_only():
                    return snn.run(x, T)
            return snn.run(x, T)
        if variant == "default, first layer T times":
            chunk = max(1, (snn.max_rows or x.shape[0] * T) // T)
            return torch.cat([snn(xb.unsqueeze(0).expand(T, *xb.shape)) for xb in x.split(chunk)], 1)
        return snn.run(x, T)
    finally:
        snn.max_rows, snn.fuse_pooling, snn.fuse_additions = saved


ECL_VARIANTS = ("reference", "kernels", "fusion", "addition fusion", "default, first layer T times", "default")


def make_calls(ann, ann_cl, snn, sj, x, steps, variants=("default",), variant_steps=(8,)):
    """name -> (T or None, zero-argument callable)."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls = {}
    for act in ("clip", "relu"):
        calls[f"ANN {act} (folded, contiguous)"] = (None, lambda a=ann[act]: a(x))
        calls[f"ANN {act} (folded, channels-last)"] = (None, lambda a=ann_cl[act]: a(x_cl))
    for T in steps:
        calls[f"eclsnn dual T={T}"] = (T, lambda T=T: snn.run(x, T))
        if T in variant_steps:
            for v in variants:
                if v != "default":
                    calls[f"eclsnn dual T={T} [{v}]"] = (T, lambda T=T, v=v: eclsnn_variant(snn, x, T, v))
    if sj is not None:
        from spikingjelly.activation_based import functional

        sj_m = copy.deepcopy(sj)
        functional.set_step_mode(sj_m, "m")
        for T in steps:
            calls[f"SJ single-step T={T}"] = (T, lambda T=T: sj_single(sj, x, T))
            calls[f"SJ multi-step T={T}"] = (T, lambda T=T: sj_multi(sj_m, x, T))
    return calls


def rows_sweep(snn, x, rows_list, steps, reps, log) -> dict:
    """Seconds per batch of snn.run at each sub-batch size (interleaved), to choose the default max_rows."""
    default = snn.max_rows

    def call(r, T):
        snn.max_rows = r
        try:
            return snn.run(x, T)
        finally:
            snn.max_rows = default

    calls = {f"rows={r} T={T}": (T, lambda r=r, T=T: call(r, T)) for T in steps for r in rows_list}
    times = time_interleaved(calls, reps, 1, log)
    return {"rows": rows_list, "steps": steps, "default": default,
            "median_s": {k: statistics.median(v) for k, v in times.items()}}


# ---- timing --------------------------------------------------------------------------------------

@torch.no_grad()
def time_interleaved(calls: dict, reps: int, warmup: int, log) -> dict[str, list[float]]:
    for _ in range(warmup):
        for f in calls.values():
            f[1]()
    times = {k: [] for k in calls}
    names = list(calls)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate the start so drift hits all
        for k in order:
            t = time.perf_counter()
            calls[k][1]()
            times[k].append(time.perf_counter() - t)
        log(f"rep {r + 1}/{reps} done")
    return times


# ---- memory (one subprocess per measurement) -------------------------------------------------------

def maxrss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM of /proc/self/status where it exists.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` of a child also counts the parent's resident size at the time
    of the fork (Linux folds the pre-exec peak into it), so a child of a big benchmark process would report
    the parent's peak; VmHWM is the peak of the process's own address space since exec.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def mem_child(system: str, T: int, epochs: int, threads: int, arch: str = "cnn-fmnist") -> None:
    torch.set_num_threads(threads)
    run, model, ann, ann_cl, snn, sj, x = build(epochs, arch=arch)
    key = {"ann": "ANN relu (folded, channels-last)", "ecl": f"eclsnn dual T={T}", "sjs": f"SJ single-step T={T}",
           "sjm": f"SJ multi-step T={T}"}[system]
    calls = make_calls(ann, ann_cl, snn, sj, x, [T])  # closures only: nothing runs until called
    before = maxrss_mib()
    with torch.no_grad():
        calls[key][1]()
    after = maxrss_mib()
    print(json.dumps({"system": key, "peak_rss_mib": after, "setup_rss_mib": before, "growth_mib": after - before,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_memory(steps: list[int], epochs: int, threads: int, have_sj: bool, log, arch: str = "cnn-fmnist") -> list[dict]:
    out = []
    jobs = [("ann", 1)] + [(s, T) for T in steps for s in (("ecl", "sjs", "sjm") if have_sj else ("ecl",))]
    for system, T in jobs:
        cmd = [sys.executable, __file__, "--mem-child", system, str(T), "--epochs", str(epochs), "--threads", str(threads),
               "--arch", arch]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not line:
            out.append({"system": f"{system} T={T}", "error": res.stderr[-500:]})
        else:
            out.append(json.loads(line[-1]))
        log(f"memory: {out[-1]}")
    return out


# ---- training throughput ---------------------------------------------------------------------------

def training_speed(threads: int, steps_per_block: int, blocks: int, log, arch: str = "cnn-fmnist") -> dict:
    from eclsnn.models import create

    data = load_config(_config(arch)).data
    train, idx = load_split(data, "train", 0)
    batches = []
    for xb, yb in eval_loader(train, idx[: 128 * steps_per_block], 128):
        batches.append((xb, yb))
    batches = [(xb.contiguous(memory_format=torch.channels_last), yb) for xb, yb in batches]  # as the trainer on CPU
    models = {}
    for act in ("relu", "clip", "clip (reference path)"):
        torch.manual_seed(0)
        m = create(arch, 10, activation=act.split(" ")[0], levels=4, init_threshold=2.0, in_channels=1).train()
        m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        models[act] = (m, opt)
    loss_fn = nn.CrossEntropyLoss()

    def step(act, xb, yb):
        m, opt = models[act]
        opt.zero_grad(set_to_none=True)
        with (eclsnn.core.backends.cpu.reference_only() if "reference" in act else contextlib.nullcontext()):
            loss_fn(m(xb), yb).backward()
        opt.step()

    for act in models:  # warm-up
        for xb, yb in batches[:3]:
            step(act, xb, yb)
    rates = {a: [] for a in models}
    names = list(models)
    for b in range(blocks):
        for act in (names if b % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            for xb, yb in batches:
                step(act, xb, yb)
            rates[act].append(128 * len(batches) / (time.perf_counter() - t))
        log(f"training block {b + 1}/{blocks}: " + ", ".join(f"{a} {rates[a][-1]:.0f} img/s" for a in names))
    ratios = [r / c for r, c in zip(rates["relu"], rates["clip"])]
    ref_ratios = [r / c for r, c in zip(rates["relu"], rates["clip (reference path)"])]
    return {"batch_size": 128, "steps_per_block": len(batches), "blocks": blocks, "images_per_s": rates,
            "median_images_per_s": {a: statistics.median(v) for a, v in rates.items()},
            "clip_time_over_relu_time_per_block": ratios, "median_clip_over_relu": statistics.median(ratios),
            "median_reference_clip_over_relu": statistics.median(ref_ratios)}


# ---- spike-for-spike check ---------------------------------------------------------------------------

@torch.no_grad()
def spike_for_spike(model: nn.Module, x: torch.Tensor, T: int = 16) -> dict:
    """eclsnn's fast multi-step simulation (C kernels, neuron+pool fusion, sub-batches) vs a plain
    single-step loop on the PyTorch reference path, on the trained network in float64: the readouts at
    every step and every neuron's spike train must be identical."""
    out = {}
    for neuron in ("dual", "if"):
        snn = eclsnn.convert(model.double(), neuron=neuron, v_init=0.5)
        snn.max_rows = max(T, (snn.max_rows or T) // 4)  # several sub-batches even for this small batch
        xd = x.double()
        fast = snn.run(xd, T)  # the default fast path
        spikes_multi, spikes_single = {}, {}
        # run() calls each neuron's multi_step() directly (no forward hooks): the multi-step spikes come
        # from an observer on the network (which also turns the pool fusion off), the single-step ones
        # from wrapping the instances' single_step (what the graph's forward calls).
        snn.add_observer(lambda name, node, inp, o, _store=spikes_multi: _store.setdefault(name, []).append(o.clone()))
        for name, neuron_mod in snn.neurons():
            def wrapped(inp, _orig=neuron_mod.single_step, _store=spikes_single, _name=name):
                o = _orig(inp)
                _store.setdefault(_name, []).append(o.clone())
                return o
            neuron_mod.single_step = wrapped
        snn.max_rows = None
        multi = snn.run(xd, T)
        with eclsnn.core.backends.cpu.reference_only():
            snn.set_step_mode("single")
            single = torch.stack([snn(xd) for _ in range(T)])
            snn.set_step_mode("multi")
        same_spikes = len(spikes_multi) == len(spikes_single) > 0 and all(
            torch.equal(spikes_multi[n][0].reshape(T, *spikes_single[n][0].shape), torch.stack(spikes_single[n]))
            for n in spikes_multi)
        nspikes = sum(int((torch.stack(v).abs() > 0).sum()) for v in spikes_single.values())
        out[neuron] = {"T": T, "batch": x.shape[0], "readout_equal": bool(torch.equal(fast, single) and torch.equal(multi, single)),
                       "all_spike_trains_equal": bool(same_spikes), "nonzero_spike_events": nspikes,
                       "max_abs_readout_diff": float((fast - single).abs().max())}
    model.float()
    return out


# ---- report ----------------------------------------------------------------------------------------------

def summarise(times: dict, calls: dict, steps: list[int], batch: int) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    ann_key = min((k for k in med if k.startswith("ANN ")), key=lambda k: med[k])  # the fastest ANN form
    rows = {}
    for k, (T, _) in calls.items():
        row = {"T": T, "median_s": med[k], "images_per_s": batch / med[k], "times_s": times[k]}
        if T is not None:
            ratios = [t / (T * a) for t, a in zip(times[k], times[ann_key])]
            row["ratio_vs_T_ann"] = statistics.median(ratios)
            row["ratio_per_rep"] = ratios
        rows[k] = row
    fastest_sj = {}
    for T in steps:
        c = {m: rows[f"SJ {m} T={T}"]["median_s"] for m in ("single-step", "multi-step") if f"SJ {m} T={T}" in rows}
        if c:
            best = min(c, key=c.get)
            e = rows[f"eclsnn dual T={T}"]
            fastest_sj[str(T)] = {"mode": best, "eclsnn_speedup": statistics.median(
                [s / t for s, t in zip(rows[f"SJ {best} T={T}"]["times_s"], e["times_s"])])}
    return {"ann_baseline": ann_key, "rows": rows, "fastest_sj": fastest_sj}


def write_md(path: Path, res: dict) -> None:
    m, s = res["meta"], res["simulation"]
    arch = res["meta"].get("arch", "cnn-fmnist")
    L = [f"# Speed on CPU: eclsnn vs SpikingJelly vs the ANN (Fashion-MNIST {arch})\n",
         f"Command: `{m['command']}`" + "".join(f" (parts kept from `{c}`)" for c in m.get("earlier_commands", [])) + "\n",
         f"Same trained network (ThresholdClip L=4, seed 0; SpikingJelly gets the same weights with ReLU), batch "
         f"{m['batch']} of test images, {m['threads']} torch threads for both libraries, {m['warmup']} warm-up "
         f"rounds, {m['reps']} interleaved repetitions (medians). torch {m['torch']}, SpikingJelly {m['spikingjelly']}, "
         f"{m['cpu']}. {m.get('machine_note', '')} Ratios are taken within one repetition (side by side), then "
         "the median over repetitions.\n",
         f"ANN baseline for the ratio: **{s['ann_baseline']}** (the fastest of the four BN-folded ANN forms: the "
         "ThresholdClip network and the same weights with ReLU, each contiguous and channels-last).\n",
         "| system | T | images/s | (SNN time) ÷ (T × ANN time) |", "|---|---|---|---|"]
    for k, r in s["rows"].items():
        ratio = f"{r['ratio_vs_T_ann']:.2f}" if "ratio_vs_T_ann" in r else "–"
        L.append(f"| {k} | {r['T'] or '–'} | {r['images_per_s']:.0f} | {ratio} |")
    L.append("")
    if s["fastest_sj"]:
        L.append("SpikingJelly's fastest mode and eclsnn's speed-up over it (median of per-repetition ratios):\n")
        L.append("| T | SJ fastest mode | eclsnn ÷ SJ-fastest throughput |")
        L.append("|---|---|---|")
        for T, v in s["fastest_sj"].items():
            L.append(f"| {T} | {v['mode']} | {v['eclsnn_speedup']:.2f}× |")
        L.append("")
    variants = {k: r for k, r in s["rows"].items() if "[" in k}
    if variants:
        L.append("## Which trick bought what\n")
        L.append("eclsnn's dual-threshold SNN run in cumulative variants (`eclsnn_variant` in this script), same "
                 "repetitions. 'reference' is the PyTorch reference path: eager neuron loops, whole batch at once, "
                 "first layer computed once (the state before the fused kernels).\n")
        L.append("| T | variant | images/s | (SNN time) ÷ (T × ANN time) | speed-up over the previous row |")
        L.append("|---|---|---|---|---|")
        for T in sorted({r["T"] for r in variants.values()}):
            order = [f"eclsnn dual T={T} [{v}]" for v in ECL_VARIANTS if v != "default"] + [f"eclsnn dual T={T}"]
            prev = None
            for k in order:
                if k not in s["rows"]:
                    continue
                r = s["rows"][k]
                name = k.split("[", 1)[1].rstrip("]") if "[" in k else "default (all tricks)"
                gain = f"{prev / r['median_s']:.2f}×" if prev else "–"
                if "first layer T times" in name:
                    gain = "– (not cumulative)"
                L.append(f"| {T} | {name} | {r['images_per_s']:.0f} | {r['ratio_vs_T_ann']:.2f} | {gain} |")
                if "first layer T times" not in name:
                    prev = r["median_s"]
        L.append("")
    if res.get("rows_sweep"):
        rs = res["rows_sweep"]
        L.append("## Sub-batch size (`SpikingNetwork.max_rows`)\n")
        L.append(f"Median seconds per batch of {m['batch']} for each `max_rows` (rows = steps × samples simulated "
                 f"at once), interleaved; the default is {rs['default']}.\n")
        L.append("| T | " + " | ".join(f"rows={r}" for r in rs["rows"]) + " |")
        L.append("|---|" + "---|" * len(rs["rows"]))
        for T in rs["steps"]:
            L.append(f"| {T} | " + " | ".join(f"{rs['median_s'][f'rows={r} T={T}'] * 1e3:.1f} ms" for r in rs["rows"]) + " |")
        L.append("")
    if res.get("memory"):
        L.append("## Peak memory\n")
        L.append("Peak resident set size (VmHWM of /proc/self/status, the kernel's high-water mark that "
                 "`ru_maxrss` reports, minus what `ru_maxrss` inherits from the parent at fork) of a fresh subprocess per row: it imports torch (and "
                 "SpikingJelly), loads the data and networks, converts, then runs the one measurement once. "
                 "'growth' is the rise of the peak during that one run (the working memory of the simulation); "
                 "'peak' includes the interpreter, libraries and data.\n")
        L.append("| system | peak RSS (MiB) | growth during the run (MiB) |")
        L.append("|---|---|---|")
        for r in res["memory"]:
            if "error" in r:
                L.append(f"| {r['system']} | error | {r['error'][-80:]!r} |")
            else:
                L.append(f"| {r['system']} | {r['peak_rss_mib']:.0f} | {r['growth_mib']:.0f} |")
        L.append("")
    if res.get("training"):
        t = res["training"]
        L.append("## Training throughput: ReLU vs ThresholdClip\n")
        L.append(f"Same model ({arch}), batch {t['batch_size']}, SGD (lr 0.1, momentum 0.9, wd 5e-4), {t['blocks']} "
                 f"interleaved blocks of {t['steps_per_block']} steps each (order alternating), medians.\n")
        L.append("| activation | images/s (median) | per block |")
        L.append("|---|---|---|")
        for a, v in t["images_per_s"].items():
            L.append(f"| {a} | {t['median_images_per_s'][a]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |")
        L.append("")
        L.append(f"ThresholdClip step time ÷ ReLU step time: **{t['median_clip_over_relu']:.3f}** (median over blocks; "
                 f"per block {', '.join(f'{x:.3f}' for x in t['clip_time_over_relu_time_per_block'])}). Target ≤ 1.15. "
                 + (f"On the PyTorch reference path (no fused clip kernel): {t['median_reference_clip_over_relu']:.3f}.\n"
                    if "median_reference_clip_over_relu" in t else "\n"))
        if t.get("epoch_seconds_from_runs"):
            L.append("Per-epoch seconds of the benchmark's own training runs (not interleaved, shared CPU, for reference): "
                     + "; ".join(f"{k}: {', '.join(f'{x:.0f}' for x in v)}" for k, v in t["epoch_seconds_from_runs"].items()) + "\n")
    if res.get("spike_for_spike"):
        L.append("## Spike-for-spike check (float64)\n")
        L.append("eclsnn's fast multi-step `snn.run(x, T)` (C kernels, neuron+pool fusion, sub-batches) vs a plain "
                 "single-step loop on the PyTorch reference path (`snn.set_step_mode('single')`, `snn(x)` T times, "
                 "inside `eclsnn.core.backends.cpu.reference_only()`) on the trained network; every neuron layer's output recorded "
                 "by an observer on the network (multi-step) and by wrapping single_step (single-step).\n")
        L.append("| neuron | T | batch | readout identical | all spike trains identical | non-zero spike events | max |Δreadout| |")
        L.append("|---|---|---|---|---|---|---|")
        for n, r in res["spike_for_spike"].items():
            L.append(f"| {n} | {r['T']} | {r['batch']} | {r['readout_equal']} | {r['all_spike_trains_equal']} | "
                     f"{r['nonzero_spike_events']} | {r['max_abs_readout_diff']:.1e} |")
        L.append("")
    path.write_text("\n".join(L))


def epoch_seconds(run_dir: Path) -> list[float]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(ln)["seconds"] for ln in f.read_text().splitlines() if ln.strip() and "seconds" in ln]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", choices=ARCHS, default="cnn-fmnist",
                    help="the network (resnet20: results in results/speed-resnet20/ unless --out says otherwise)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, nargs="*", default=[1, 8, 16])
    ap.add_argument("--train-steps", type=int, default=20, help="training steps per interleaved block")
    ap.add_argument("--train-blocks", type=int, default=6)
    ap.add_argument("--variants", nargs="*", default=list(ECL_VARIANTS), choices=list(ECL_VARIANTS),
                    help="eclsnn variants timed at --variant-steps to attribute the speed to each trick")
    ap.add_argument("--variant-steps", type=int, nargs="*", default=[2, 8])
    ap.add_argument("--rows", type=int, nargs="*", default=[128, 256, 512, 1024, 2048],
                    help="max_rows values of the sub-batch sweep (empty: no sweep)")
    ap.add_argument("--machine-note", default="", help="a sentence about the machine's load, printed in the report")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sim", "memory", "training", "spikes", "rows"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mem-child", nargs=2, metavar=("SYSTEM", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out is None:
        args.out = RESULTS if args.arch == "cnn-fmnist" else RESULTS / f"speed-{args.arch}"
    if args.mem_child:
        mem_child(args.mem_child[0], int(args.mem_child[1]), args.epochs, args.threads, args.arch)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    run, model, ann, ann_cl, snn, sj, x = build(args.epochs, arch=args.arch)
    try:
        from importlib.metadata import version

        sj_version = version("spikingjelly") if sj is not None else "not installed"
    except Exception:
        sj_version = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except Exception:
        pass
    previous = {}
    if args.skip and (args.out / "speed.json").is_file():  # keep the parts not rerun
        previous = json.loads((args.out / "speed.json").read_text())
    res = {"meta": {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "arch": args.arch,
                    "threads": torch.get_num_threads(),
                    "batch": x.shape[0], "reps": args.reps, "warmup": args.warmup, "torch": torch.__version__,
                    "spikingjelly": sj_version, "cpu": cpu, "run": str(run), "machine_note": args.machine_note,
                    "kernels": {"available": eclsnn.core.backends.cpu.available(), "openmp": eclsnn.core.backends.cpu.openmp()},
                    "max_rows": snn.max_rows}}
    for part in ("simulation", "spike_for_spike", "memory", "training", "rows_sweep"):
        if part in previous:
            res[part] = previous[part]
    if "simulation" in previous:  # the timing settings that the kept simulation table was measured with
        for k in ("reps", "warmup", "threads", "batch"):
            res["meta"][k] = previous["meta"][k]
    if previous:
        res["meta"]["earlier_commands"] = previous["meta"].get("earlier_commands", []) + [previous["meta"]["command"]]
    if "sim" not in args.skip:
        calls = make_calls(ann, ann_cl, snn, sj, x, args.steps, args.variants, args.variant_steps)
        times = time_interleaved(calls, args.reps, args.warmup, log)
        res["simulation"] = summarise(times, calls, args.steps, x.shape[0])
        write_json(args.out / "speed.json", res)
    if "rows" not in args.skip and args.rows:
        res["rows_sweep"] = rows_sweep(snn, x, args.rows, [2, 8, 16], args.reps, log)
        write_json(args.out / "speed.json", res)
    if "spikes" not in args.skip:
        res["spike_for_spike"] = spike_for_spike(model, x[:64], 16)
        log(f"spike-for-spike: {res['spike_for_spike']}")
    if "memory" not in args.skip and args.mem_steps:
        res["memory"] = measure_memory(args.mem_steps, args.epochs, args.threads, sj is not None, log, args.arch)
        write_json(args.out / "speed.json", res)
    if "training" not in args.skip:
        res["training"] = training_speed(args.threads, args.train_steps, args.train_blocks, log, args.arch)
        runs = run.parent
        from common import run_name

        res["training"]["epoch_seconds_from_runs"] = {
            k: epoch_seconds(runs / run_name(a, L, 0, args.epochs)) for k, (a, L) in
            {"relu": ("relu", None), "clip L=4": ("clip", 4)}.items()}
    write_json(args.out / "speed.json", res)
    if "simulation" in res:
        write_md(args.out / "speed.md", res)
        print((args.out / "speed.md").read_text())


if __name__ == "__main__":
    main()
