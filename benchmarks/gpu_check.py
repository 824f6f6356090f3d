"""A GPU check in one command (≤ 3 minutes), for a bare machine with its own torch and no network:

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--steps 50] [--batch 256] [--out FILE.json]
    PYTHONPATH=src python3 benchmarks/gpu_check.py --tiny          # the CPU mode the test suite runs

1. Training throughput: ResNet-18 (ThresholdClip, L = 4, CIFAR stem) on synthetic CIFAR-shaped data made on
   the device, SGD, AMP (bf16 where supported, else fp16 with loss scaling) and channels-last; a fixed
   number of timed steps after warm-up → images/s.
2. Conversion and simulation at T = 1..8 on the device: images/s of the SNN.
3. Correctness: the spike counts of every neuron layer on the device (TF32 off) against a float64 CPU
   run of the same SNN on a sub-batch; each mismatch is reported with its distance to the threshold (the
   smallest |m_t − θ|/θ of that neuron over the steps in the float64 run), so rounding at a threshold is
   told apart from a bug.
4. SpikingJelly's simulation throughput on the same network and device, if it imports (carry its wheel).

Prints a JSON summary (and writes it with --out). Everything is synthetic: no data set, no download.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import eclsnn  # noqa: E402
from eclsnn.models import create  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_dtype(device: torch.device):
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_throughput(model, device, batch: int, steps: int, warmup: int) -> dict:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * steps / seconds, "steps": steps, "batch": batch, "seconds": seconds,
            "amp": str(dtype) if dtype else "off", "final_loss": float(loss)}


def _record(snn):
    """Observer: per neuron layer, its input currents and outputs (stacked over sub-batches)."""
    seen: dict[str, list] = {}

    def observer(name, node, x_seq, out):
        if isinstance(node, eclsnn.SpikingNeuron):
            seen.setdefault(name, []).append((x_seq.detach().cpu().double(), out.detach().cpu().double()))

    return seen, snn.add_observer(observer)


def _distance_to_threshold(neuron, currents: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """min_t |m_t − θ|/θ (and for the dual neuron also |m_t − θ_neg·θ|/θ) of every neuron, replaying the
    float64 run's dynamics from its observed currents and spikes: m_t = v + I_t, v ← m_t − s_t·θ."""
    theta = neuron.theta_like(currents[0])  # float64, shaped to broadcast against one step
    v = torch.zeros_like(currents[0]) + neuron.v_init * theta
    best = torch.full_like(currents[0], float("inf"))
    neg = getattr(neuron, "theta_neg", None)
    for t in range(currents.shape[0]):
        m = v + currents[t]
        d = (m - theta).abs()
        if neg is not None:
            d = torch.minimum(d, (m - neg * theta).abs())
        best = torch.minimum(best, d / theta)
        v = m - outputs[t]
    return best


def spike_check(snn, x: torch.Tensor, T: int) -> dict:
    """Spike counts of every layer on the device (TF32 off) against a float64 CPU run."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        dev_seen, h = _record(snn)
        eclsnn.simulate(snn, x, T)
        h.remove()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    ref = copy.deepcopy(snn).to("cpu", torch.float64)
    ref_seen, h = _record(ref)
    eclsnn.simulate(ref, x.cpu().double(), T, backend="reference")
    h.remove()
    neurons = dict(ref.neurons())
    layers, first = [], None
    for name, parts in ref_seen.items():
        cur = torch.cat([c for c, _ in parts], 1)
        out_ref = torch.cat([o for _, o in parts], 1)
        out_dev = torch.cat([o for _, o in dev_seen[name]], 1)
        # a neuron mismatches when its spike train differs at any step: equal counts at other times already
        # change the next layer's currents by more than rounding, so comparing counts alone would name a
        # later layer, far from its thresholds, as the first
        bad = (torch.sign(out_ref) != torch.sign(out_dev)).any(0)
        count_bad = torch.sign(out_ref).sum(0) != torch.sign(out_dev).sum(0)
        entry = {"layer": name, "neurons": int(bad.numel()), "mismatches": int(bad.sum()),
                 "count_mismatches": int(count_bad.sum())}
        if bad.any():
            dist = _distance_to_threshold(neurons[name], cur, out_ref)[bad]
            entry.update(max_distance_to_threshold=float(dist.max()), median_distance_to_threshold=float(dist.median()))
            if first is None:
                first = name
        layers.append(entry)
    return {"time_steps": T, "samples": int(x.shape[0]), "first_layer_with_mismatch": first, "layers": layers,
            "note": "a mismatch in one layer changes the input of the next; the first layer's distances say whether "
                    "it is rounding at the threshold (distance ~1e-6) or a real difference"}


def simulate_throughput(snn, x: torch.Tensor, device, reps: int) -> dict:
    out = {}
    for T in (1, 2, 4, 8):
        eclsnn.simulate(snn, x, T)
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            eclsnn.simulate(snn, x, T)
        _sync(device)
        out[str(T)] = x.shape[0] * reps / (time.perf_counter() - start)
    return out


def spikingjelly_throughput(model, x: torch.Tensor, device, reps: int) -> dict | None:
    try:
        from spikingjelly.activation_based import ann2snn, functional
    except Exception as exc:  # not carried along, or a dependency is missing
        return {"skipped": f"spikingjelly does not import ({type(exc).__name__})"}
    relu = create("resnet18", num_classes=10, activation="relu").to(device).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu()), batch_size=x.shape[0])
    sj = ann2snn.Converter(ann2snn.RateCodingRecipe(dataloader=loader, mode="99.9%"), device=str(device)).convert(relu)
    out = {}
    with torch.no_grad():
        for T in (1, 2, 4, 8):
            functional.reset_net(sj)
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                functional.reset_net(sj)
                for _ in range(T):
                    sj(x)
            _sync(device)
            out[str(T)] = x.shape[0] * reps / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long CPU run (what the test suite checks)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--check-samples", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.tiny:
        a.steps, a.batch, a.check_samples, device = 2, 4, 2, torch.device(a.device or "cpu")
    else:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    started = time.perf_counter()
    report: dict = {"command": "PYTHONPATH=src python3 benchmarks/gpu_check.py" + (" --tiny" if a.tiny else ""),
                    "torch": torch.__version__, "eclsnn": eclsnn.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    model = create("resnet18", num_classes=10).to(device).to(memory_format=torch.channels_last)
    report["train"] = train_throughput(model, device, a.batch, a.steps, warmup=1 if a.tiny else 5)
    model.eval()
    snn = eclsnn.convert(model)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(a.batch, 3, 32, 32, device=device, generator=g)
    reps = 1 if a.tiny else 3
    report["simulate_images_per_s"] = simulate_throughput(snn, x, device, reps)
    report["spike_check"] = spike_check(snn, x[:a.check_samples], 8)
    report["spikingjelly_images_per_s"] = None if a.tiny else spikingjelly_throughput(model, x, device, reps)
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
