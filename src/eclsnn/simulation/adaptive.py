"""Adaptive-latency inference: stop simulating a sample once its prediction is settled.

After each step t the mean readout so far is compared between its two largest entries; a sample whose
margin exceeds a bound stops there, and finished samples leave the batch (their rows are dropped from
the input and from every neuron's state), so easy inputs cost fewer steps in wall-clock time, not only
in counted steps. The bound is calibrated on held-out data (the validation split) to the smallest value
whose accuracy loss against the fixed-T run stays within a target (the idea of SEENN, NeurIPS 2023, and
Dynamic Confidence, ICCV 2023, for converted SNNs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from eclsnn.errors import SimulationError
from eclsnn.simulation.network import SpikingNetwork, check_time_steps
from eclsnn.simulation.run import check_input, check_network

__all__ = ["simulate_adaptive", "evaluate_adaptive", "calibrate_margin", "AdaptiveResult", "DEFAULT_BLOCK"]


#: steps simulated per block by :func:`simulate_adaptive` (chosen by ``benchmarks/adaptive_latency.py``)
DEFAULT_BLOCK = 4


@torch.no_grad()
def simulate_adaptive(snn: SpikingNetwork, x: torch.Tensor, max_steps: int, margin: float,
                      block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each sample until the margin between its two largest mean logits exceeds ``margin`` (or
    ``max_steps``). Returns ``(mean logits at the stopping step [B, classes], steps used [B])``.

    The steps are simulated in blocks of ``block`` on the fast multi-step path, the neuron state carried
    from block to block (``SpikingNetwork.run(..., carry_state=True)``); after each block the samples
    that stopped in it — at the first step whose margin exceeds the bound, exactly as a step-by-step
    loop would stop them — leave the batch, input and neuron state alike. A sample that stops inside a
    block has computed the rest of that block in vain: ``block=1`` wastes nothing but runs the network
    once per step; larger blocks run faster per step.

    ``margin=inf`` is the fixed-T simulation (every sample runs ``max_steps`` steps).
    """
    snn = check_network(snn)
    T = check_time_steps(max_steps)
    k = check_time_steps(block)
    x = check_input(x)
    if not margin >= 0:
        raise SimulationError(f"margin must be a non-negative number, got {margin!r}")
    param = next(snn.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    if snn.max_rows and x.shape[0] * k > snn.max_rows:
        # sub-batches of max_rows rows, as the fixed-T run: each runs all its blocks before the next
        chunk = max(1, snn.max_rows // k)
        parts = [simulate_adaptive(snn, part, T, margin, k) for part in x.split(chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    mode = snn.step_mode
    if mode != "multi":
        snn.set_step_mode("multi")
    snn.reset()
    try:
        B = x.shape[0]
        active = torch.arange(B, device=x.device)
        total = None
        final = None
        steps = torch.full((B,), T, dtype=torch.long, device=x.device)
        t = 0
        while t < T:
            n = min(k, T - t)
            out = snn.run(x, n, carry_state=True)  # [n, b, classes]
            cum = out.cumsum(0) if total is None else out.cumsum(0).add_(total)
            mean = cum / torch.arange(t + 1, t + n + 1, device=cum.device, dtype=cum.dtype).view(n, *([1] * (cum.dim() - 1)))
            if final is None:
                final = torch.empty((B, *out.shape[2:]), dtype=out.dtype, device=out.device)
            top2 = mean.topk(2, dim=-1).values
            stop = (top2[..., 0] - top2[..., 1]) > margin  # [n, b]
            if t + n == T:
                stop[-1] = True
            done = stop.any(0)
            first = stop.float().argmax(0)  # the first step of the block that stops each sample
            idx = done.nonzero().squeeze(1)
            final[active[idx]] = mean[first[idx], idx]
            steps[active[idx]] = t + 1 + first[idx]
            t += n
            keep = ~done
            if not keep.any():
                break
            if done.any():
                active, x = active[keep], x[keep]
                snn.keep_rows(keep)
                cum = cum[:, keep]
            total = cum[-1]
        return final, steps
    finally:
        snn.reset()
        if mode in ("multi", "single") and mode != snn.step_mode:
            snn.set_step_mode(mode)


@dataclass
class AdaptiveResult:
    accuracy: float
    mean_steps: float
    steps_histogram: dict[int, int]
    seconds: float
    margin: float
    max_steps: int
    num_samples: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "mean_steps": self.mean_steps, "steps_histogram": self.steps_histogram,
                "seconds": self.seconds, "margin": self.margin, "max_steps": self.max_steps, "num_samples": self.num_samples,
                **self.extra}


def evaluate_adaptive(snn: SpikingNetwork, loader: Iterable, max_steps: int, margin: float,
                      block: int = DEFAULT_BLOCK) -> AdaptiveResult:
    """Accuracy, steps used (mean and histogram) and wall-clock time of adaptive inference."""
    correct = total = 0
    hist = torch.zeros(check_time_steps(max_steps) + 1, dtype=torch.long)
    start = time.perf_counter()
    for x, y in loader:
        logits, steps = simulate_adaptive(snn, x, max_steps, margin, block)
        correct += (logits.argmax(-1) == y.to(logits.device)).sum().item()
        hist += torch.bincount(steps.cpu(), minlength=len(hist))
        total += y.shape[0]
    if total == 0:
        raise SimulationError("the loader yielded no samples; nothing to evaluate")
    seconds = time.perf_counter() - start
    mean_steps = float((hist * torch.arange(len(hist))).sum()) / total
    return AdaptiveResult(correct / total, mean_steps, {t: int(c) for t, c in enumerate(hist.tolist()) if c},
                          seconds, float(margin), int(max_steps), total)


@torch.no_grad()
def calibrate_margin(snn: SpikingNetwork, loader: Iterable, max_steps: int, max_accuracy_loss: float = 0.005,
                     candidates: Iterable[float] | None = None) -> tuple[float, list[dict]]:
    """The smallest margin whose accuracy on ``loader`` (held-out data: the validation split) is at most
    ``max_accuracy_loss`` below the fixed-T accuracy. Returns ``(margin, table of every candidate)``.

    All candidates are scored from one fixed-T run per batch: a sample stops at the first step whose
    margin exceeds the candidate, exactly as :func:`simulate_adaptive` would stop it.
    """
    T = check_time_steps(max_steps)
    means, labels = [], []
    for x, y in loader:
        out = snn.run(check_input(x).to(next(snn.parameters()).dtype), T)
        means.append(out.cumsum(0) / torch.arange(1, T + 1, dtype=out.dtype).view(T, 1, 1))
        labels.append(y)
    if not means:
        raise SimulationError("no calibration samples")
    mean = torch.cat(means, 1)  # [T, N, classes]
    y = torch.cat(labels).to(mean.device)
    top2 = mean.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]  # [T, N]
    correct = mean.argmax(-1) == y  # [T, N]
    fixed_acc = correct[-1].float().mean().item()
    if candidates is None:
        qs = torch.linspace(0.0, 1.0, 41, dtype=margins.dtype)
        candidates = sorted(set(torch.quantile(margins[:-1].flatten().float(), qs.float()).tolist()))
    table = []
    for m in sorted(float(c) for c in candidates):
        stop = margins > m
        stop[-1] = True
        first = stop.float().argmax(0)  # first step that stops
        acc = correct.gather(0, first.view(1, -1)).float().mean().item()
        table.append({"margin": m, "accuracy": acc, "mean_steps": (first + 1).float().mean().item()})
    ok = [row for row in table if row["accuracy"] >= fixed_acc - max_accuracy_loss]
    best = min(ok, key=lambda r: r["mean_steps"]) if ok else {"margin": float("inf")}
    return best["margin"], [{"fixed_accuracy": fixed_acc}, *table]

