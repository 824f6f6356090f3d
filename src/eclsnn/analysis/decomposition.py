"""Per-layer analysis of a converted network on real data: the three conversion errors, firing rates,
synaptic operations and an energy estimate (``eclsnn analyze``).

**Errors, each layer against its own input** (docs/METHOD.md, "The three conversion errors"). For a neuron
layer with threshold θ, initial potential ``v_init``·θ and T steps, let ``I(t)`` be the current its
neurons receive in the SNN — whatever the earlier spiking layers delivered — and ``Ī = mean_t I(t)``,
``r = mean_t out(t)`` its rate output (in the units of the activation, ``θ·spikes/T``). Then

- clipping error       ``e_c = ReLU(Ī) − clamp(Ī, 0, θ)``                          (what the clip cuts)
- quantization error   ``e_q = clamp(Ī, 0, θ) − h_T(Ī)``, with
  ``h_T(Ī) = θ · clamp(floor(Ī·T/θ + v_init), 0, T) / T`` (the threshold clip with L = T levels and
  ψ = v_init: exactly what an IF neuron outputs for the *constant* input Ī)
- unevenness error     ``e_u = h_T(Ī) − r``                (what the order of the inputs in time costs)

so that ``e_c + e_q + e_u = ReLU(Ī) − r`` (reported as ``total``). Because every layer is measured
against its own mean input, errors made upstream are not charged to it. The dual-threshold neuron is
compared with the same ``h_T``: its net count equals ``T·h_T/θ`` whenever each step's input lies in
[−θ, θ] (θ_neg = 0, v_init = 1/2), so its unevenness error measures what it fails to undo. Each
error is averaged over every neuron of the layer and every image, as a mean absolute value and a
signed mean, in the activation's units and in units of θ.

**Firing rates**: positive and negative spikes separately, per neuron per step.

**Operations** (docs/METHOD.md, "Energy convention"), per image:

- A synaptic layer (conv or linear) *fed by spikes* — a neuron's output reaches it through reshapes
  only — costs one accumulate (SOP) per spike in (negative spikes too) per target it reaches:
  ``Σ_spikes fan-out(position)``. The fan-out is exact per input position (padding edges, stride,
  dilation, groups): the gradient of ``Σ conv(x; W = 1)`` with respect to x counts, for every input
  element, the outputs whose receptive field holds it (:func:`fanout_map`).
- A layer fed by *average-pooled* spikes (non-binary values) costs its dense MACs at every step. As
  an alternative the pool can be folded into that layer (for non-overlapping pools: a spike then
  reaches every target of its pooling window); those SOPs are reported beside
  (``snn_sops_pool_folded``), and an energy total with them.
- The layers before the first neuron see the same analog input at every step; the simulator computes
  them once, so their MACs are counted once. Other non-binary inputs (a sum of spike maps, an
  unfolded BatchNorm) cost dense MACs per step.
- ANN MACs: per synaptic layer ``output elements × (fan-in of one output)``; pooling, BatchNorm,
  additions and bias terms are counted neither for the ANN nor for the SNN.
- Neuron updates: one per neuron per step (reported, not included in the energy).
- Energy: ``E_AC = 0.9 pJ`` per SOP, ``E_MAC = 4.6 pJ`` per MAC (45 nm, Horowitz 2014); a spiking max pool
  (``maxpool="cummax"``) adds ``E_CMP = 0.1 pJ`` per comparison, (window − 1) per output element per step.

Errors and spikes are observed by an observer (:meth:`eclsnn.simulation.SpikingNetwork.add_observer`) registered on
the network's executor (the simulator calls each neuron's ``multi_step`` directly, not through
``__call__``, so ``nn.Module`` forward hooks do not see it); operations by
forward (pre-)hooks on the synaptic and pooling modules. Nothing about the simulation changes.
"""

from __future__ import annotations

from collections.abc import Iterable
import math
from typing import Any

import torch
from torch import nn

from eclsnn.errors import SimulationError
from eclsnn.core.clip import channel_view
from eclsnn.core.neurons import SpikingNeuron
from eclsnn.core.pooling import SpikingMaxPool
from eclsnn.simulation import SpikingNetwork, check_time_steps, simulate
from eclsnn.analysis.counting import E_AC_PJ, E_CMP_PJ, E_MAC_PJ, POOLED, _OpCounter

__all__ = ["ERRORS", "quantized_reference", "layer_errors", "analyze"]

#: Energy per accumulate (one synaptic operation) and per multiply-accumulate, 45 nm (Horowitz 2014).
#: The error terms, in the order in which they add up to ``total = ReLU(Ī) − r``.
ERRORS = ("clipping", "quantization", "unevenness", "total")

# How a synaptic layer's input relates to the spikes (see the module docstring).

# ---- the three errors ----------------------------------------------------------------------------------

def quantized_reference(i_mean: torch.Tensor, theta: torch.Tensor | float, time_steps: int, v_init: float) -> torch.Tensor:
    """``h_T(Ī) = θ · clamp(floor(Ī·T/θ + v_init), 0, T) / T``: the output of an IF neuron that starts at
    ``v_init·θ`` and receives the constant input Ī for T steps (docs/METHOD.md, "IF neuron"; L = T, ψ = v_init)."""
    T = check_time_steps(time_steps)
    return theta * torch.floor(i_mean * T / theta + v_init).clamp(0, T) / T


def layer_errors(
    i_mean: torch.Tensor, rate: torch.Tensor, theta: torch.Tensor | float, time_steps: int, v_init: float
) -> dict[str, torch.Tensor]:
    """The elementwise errors of one layer (module docstring): clipping, quantization, unevenness and
    their sum ``total = ReLU(Ī) − r``. ``i_mean`` is the mean input current, ``rate`` the mean output
    (``θ·spikes/T``), ``theta`` broadcasts against both."""
    relu = i_mean.clamp(min=0)
    clipped = torch.minimum(relu, torch.as_tensor(theta, dtype=i_mean.dtype, device=i_mean.device))
    h = quantized_reference(i_mean, theta, time_steps, v_init)
    return {"clipping": relu - clipped, "quantization": clipped - h, "unevenness": h - rate, "total": relu - rate}


class _NeuronRecorder:
    """Accumulates the errors and spike counts of one neuron layer: float32 sums per batch, added up
    across batches in float64."""

    def __init__(self, name: str, neuron: SpikingNeuron):
        self.name, self.neuron = name, neuron
        self.sums: dict[str, float] = {}
        self.elements = 0  # neurons × images
        self.positive = self.negative = 0
        self.time_steps = 0
        self.neurons_per_sample = 0

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value.item()

    @torch.no_grad()
    def __call__(self, x_seq: torch.Tensor, out: torch.Tensor) -> None:
        T = x_seq.shape[0]
        self.time_steps = T
        self.neurons_per_sample = x_seq[0, 0].numel()
        theta = self.neuron.theta_like(x_seq[0])
        i_mean = x_seq[0] if x_seq.stride(0) == 0 else _time_mean(x_seq)  # stride 0: the constant first-layer current
        rate = _time_mean(out)
        scalar_theta = theta.numel() == 1
        for key, e in layer_errors(i_mean, rate, theta, T, self.neuron.v_init).items():
            # float32 tensors, cascade-summed per batch, accumulated in float64 across batches
            self._add(f"{key}.abs", e.abs().sum())
            self._add(f"{key}.signed", e.sum())
            if not scalar_theta:  # (scalar θ: divided once in result())
                e_theta = e / theta
                self._add(f"{key}.abs_theta", e_theta.abs().sum())
                self._add(f"{key}.signed_theta", e_theta.sum())
        self._add("relu_input", i_mean.clamp(min=0).sum())
        self._add("rate_output", rate.sum())
        self._add("clipped_fraction", torch.count_nonzero(i_mean > theta))
        self.elements += i_mean.numel()
        self.positive += int(torch.count_nonzero(out > 0))
        self.negative += int(torch.count_nonzero(out < 0))
        return i_mean

    def reduce(self, reduce) -> None:
        """Add up this layer's sums and counts over processes (``reduce(tensor, op)``)."""
        keys = sorted(self.sums)
        if keys:
            sums = reduce(torch.tensor([self.sums[k] for k in keys], dtype=torch.float64))
            self.sums = dict(zip(keys, sums.tolist()))
        self.elements, self.positive, self.negative = (int(v) for v in reduce(
            torch.tensor([self.elements, self.positive, self.negative], dtype=torch.int64)))
        self.time_steps, self.neurons_per_sample = (int(v) for v in reduce(
            torch.tensor([self.time_steps, self.neurons_per_sample], dtype=torch.int64), "max"))

    def result(self) -> dict[str, Any]:
        n = max(self.elements, 1)
        if self.neuron.theta.numel() == 1:
            theta_value = self.neuron.theta.item()
            for key in ERRORS:
                self.sums[f"{key}.abs_theta"] = self.sums[f"{key}.abs"] / theta_value
                self.sums[f"{key}.signed_theta"] = self.sums[f"{key}.signed"] / theta_value
        steps = max(self.elements * self.time_steps, 1)
        theta = self.neuron.theta
        errors = {
            key: {
                "mean_abs": self.sums[f"{key}.abs"] / n, "mean": self.sums[f"{key}.signed"] / n,
                "mean_abs_theta": self.sums[f"{key}.abs_theta"] / n, "mean_theta": self.sums[f"{key}.signed_theta"] / n,
            }
            for key in ERRORS
        }
        return {
            "name": self.name,
            "theta": theta.item() if theta.dim() == 0 else theta.tolist(),
            "neurons_per_sample": self.neurons_per_sample,
            "errors": errors,
            "mean_relu_input": self.sums["relu_input"] / n,
            "mean_rate_output": self.sums["rate_output"] / n,
            "clipped_fraction": self.sums["clipped_fraction"] / n,
            "firing_rate": {"positive": self.positive / steps, "negative": self.negative / steps},
        }


class _PoolRecorder:
    """Accumulates the error of one spiking max pool (``maxpool="cummax"``). Against its own input it is
    exact by construction (``r_out = maxpool(r_in)``, checked as ``self``); against the ANN it is not:
    ``bias = r_out − maxpool(clamp(Ī, 0, θ))``, with Ī the mean current of the neuron layer that feeds it,
    is what the maximum of noisy spike counts adds over the maximum of the clipped activations the
    ANN pools (its input layer's own errors included, passed through the max). Negative outputs are the
    retractions (−θ) that follow a dual-threshold input's early spikes."""

    def __init__(self, name: str, pool, source: str | None):
        self.name, self.pool, self.source = name, pool, source
        self.sums = {"self": 0.0, "bias.abs": 0.0, "bias.signed": 0.0}
        self.elements = self.positive = self.negative = 0
        self.time_steps = 0
        self.outputs_per_sample = 0

    @torch.no_grad()
    def __call__(self, x_seq: torch.Tensor, out: torch.Tensor, source_mean: torch.Tensor | None) -> None:
        T = x_seq.shape[0]
        self.time_steps = T
        self.outputs_per_sample = out[0, 0].numel()
        r_out = _time_mean(out)
        self.sums["self"] = max(self.sums["self"], float((r_out - self.pool._pool_float(_time_mean(x_seq))).abs().max()))
        if source_mean is not None:
            theta = channel_view(self.pool.theta.to(x_seq.dtype), x_seq.dim() - 1)
            bias = r_out - self.pool._pool_float(torch.minimum(source_mean.clamp(min=0), theta.expand_as(source_mean)))
            self.sums["bias.abs"] += float((bias / theta).abs().sum())
            self.sums["bias.signed"] += float((bias / theta).sum())
        self.elements += r_out.numel()
        self.positive += int(torch.count_nonzero(out > 0))
        self.negative += int(torch.count_nonzero(out < 0))

    def reduce(self, reduce) -> None:
        sums = reduce(torch.tensor([self.sums["bias.abs"], self.sums["bias.signed"]], dtype=torch.float64))
        self.sums["bias.abs"], self.sums["bias.signed"] = sums.tolist()
        self.sums["self"] = float(reduce(torch.tensor([self.sums["self"]], dtype=torch.float64), "max")[0])
        self.elements, self.positive, self.negative = (int(v) for v in reduce(
            torch.tensor([self.elements, self.positive, self.negative], dtype=torch.int64)))
        self.time_steps, self.outputs_per_sample = (int(v) for v in reduce(
            torch.tensor([self.time_steps, self.outputs_per_sample], dtype=torch.int64), "max"))

    def result(self) -> dict[str, Any]:
        n = max(self.elements, 1)
        steps = max(self.elements * self.time_steps, 1)
        has_bias = self.source is not None
        return {
            "name": self.name, "source": self.source, "outputs_per_sample": self.outputs_per_sample,
            "self_error_max": self.sums["self"],
            "bias": {"mean_abs_theta": self.sums["bias.abs"] / n if has_bias else None,
                     "mean_theta": self.sums["bias.signed"] / n if has_bias else None},
            "firing_rate": {"positive": self.positive / steps, "negative": self.negative / steps},
            # comparisons per image: each output element compares its window at every step
            "comparisons": self.outputs_per_sample * (math.prod(self.pool.kernel_size) - 1) * self.time_steps,
        }


def _time_mean(seq: torch.Tensor) -> torch.Tensor:
    """Mean over the first (time) dimension, one in-place add per step (a reduction over dim 0 of a
    channels-last tensor is several times slower)."""
    acc = seq[0].clone()
    for t in range(1, seq.shape[0]):
        acc.add_(seq[t])
    return acc.div_(seq.shape[0])


# ---- the analysis ---------------------------------------------------------------------------------

def _pool_recorders(snn: SpikingNetwork) -> dict[str, _PoolRecorder]:
    gm = snn.graph_module
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), SpikingMaxPool):
            src = node.args[0]
            single = src.op == "call_module" and isinstance(gm.get_submodule(src.target), SpikingNeuron)
            out[node.target] = _PoolRecorder(node.target, gm.get_submodule(node.target), src.target if single else None)
    return out


class _Observer:
    """The executor observer of one variant: neuron layers go to their recorders; spiking max pools to
    theirs, with the mean current of the neuron layer that feeds them (kept for this sub-batch only)."""

    def __init__(self, neurons: dict[str, _NeuronRecorder], pools: dict[str, _PoolRecorder]):
        self.neurons, self.pools = neurons, pools
        self.sources = {p.source for p in pools.values() if p.source}
        self.means: dict[str, torch.Tensor] = {}

    def __call__(self, name, node, x_seq, out) -> None:
        if name in self.neurons:
            mean = self.neurons[name](x_seq, out)
            if name in self.sources:
                self.means[name] = mean
        elif name in self.pools:
            pool = self.pools[name]
            pool(x_seq, out, self.means.pop(pool.source, None) if pool.source else None)

@torch.no_grad()
def analyze(
    model: nn.Module | None,
    variants: dict[str, SpikingNetwork],
    loader: Iterable,
    time_steps: int,
    progress: str | None = None,
    reduce=None,
) -> dict[str, Any]:
    """Run every variant for ``time_steps`` steps on the ``(x, y)`` batches of ``loader`` and measure,
    per layer, the three errors, firing rates and operations (module docstring). ``model`` (the ANN,
    optional) gives the ANN accuracy. ``reduce(tensor, op="sum")`` combines counts and sums over
    processes when each saw a shard of the data (None: one process). Returns a JSON-able dict;
    operations are per image."""
    T = check_time_steps(time_steps)
    if not variants:
        raise SimulationError("no SNN variants to analyse")
    recorders = {v: {name: _NeuronRecorder(name, neuron) for name, neuron in snn.neurons()} for v, snn in variants.items()}
    pools = {v: _pool_recorders(snn) for v, snn in variants.items()}
    counters = {v: _OpCounter(snn) for v, snn in variants.items()}
    correct = {v: 0 for v in variants}
    correct_ann = total = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=progress, leave=False)
    for x, y in batches:
        if model is not None:
            correct_ann += (model(x).argmax(-1) == y).sum().item()
        for v, snn in variants.items():
            handle = snn.add_observer(_Observer(recorders[v], pools[v]))
            try:
                with counters[v]:
                    out = simulate(snn, x, T)
            finally:
                handle.remove()
            correct[v] += (out[-1].argmax(-1) == y.to(out.device)).sum().item()
        total += y.shape[0]
    if reduce is not None:
        correct_ann, total = (int(v) for v in reduce(torch.tensor([correct_ann, total], dtype=torch.int64)))
        for v in variants:
            correct[v] = int(reduce(torch.tensor([correct[v]], dtype=torch.int64))[0])
            for r in (*recorders[v].values(), *pools[v].values()):
                r.reduce(reduce)
            counters[v].reduce(reduce)
    if total == 0:
        raise SimulationError("no samples to analyse")

    results: dict[str, Any] = {
        "num_samples": total, "time_steps": T, "energy_pj": {"E_AC": E_AC_PJ, "E_MAC": E_MAC_PJ, "E_CMP": E_CMP_PJ},
        "ann_accuracy": correct_ann / total if model is not None else None, "variants": {},
    }
    for v, snn in variants.items():
        neurons = [r.result() for r in recorders[v].values()]
        synapses = []
        for name, st in counters[v].stats.items():
            kind = counters[v].kinds[name]["kind"]
            folded = st["snn_sops_pool_folded"] / total if kind == POOLED and st["foldable"] else None
            synapses.append({
                "name": name, "input": kind, "ann_macs": st["ann_macs"], "snn_sops": st["snn_sops"] / total,
                "snn_macs": st["snn_macs"] / total, "snn_sops_pool_folded": folded,
            })
        pooled = [r.result() for r in pools[v].values()]
        totals = _totals(neurons, synapses, T)
        if pooled:  # the spiking max pools' comparisons are part of the SNN's energy
            cmp = sum(p["comparisons"] for p in pooled)
            totals["pool_comparisons"] = cmp
            for key in ("snn_energy_uj", "snn_energy_uj_pool_folded"):
                if key in totals:
                    totals[key] += E_CMP_PJ * cmp * 1e-6
            e_ann = totals["ann_energy_uj"]
            totals["energy_ratio_snn_ann"] = totals["snn_energy_uj"] / e_ann if e_ann else None
            if "snn_energy_uj_pool_folded" in totals:
                totals["energy_ratio_snn_ann_pool_folded"] = totals["snn_energy_uj_pool_folded"] / e_ann if e_ann else None
        results["variants"][v] = {
            "settings": dict(snn.settings), "snn_accuracy": correct[v] / total,
            "neurons": neurons, "synapses": synapses, "pools": pooled, "totals": totals,
        }
    return results


def _totals(neurons: list[dict], synapses: list[dict], T: int) -> dict[str, Any]:
    ann_macs = sum(s["ann_macs"] for s in synapses)
    sops = sum(s["snn_sops"] for s in synapses)
    macs = sum(s["snn_macs"] for s in synapses)
    updates = sum(n["neurons_per_sample"] for n in neurons)
    e_ann = E_MAC_PJ * ann_macs
    e_snn = E_AC_PJ * sops + E_MAC_PJ * macs
    pooled = [s for s in synapses if s["input"] == POOLED]
    totals = {
        "ann_macs": ann_macs, "snn_sops": sops, "snn_macs": macs,
        "neuron_updates_per_step": updates, "neuron_updates": updates * T,
        "ann_energy_uj": e_ann * 1e-6, "snn_energy_uj": e_snn * 1e-6, "energy_ratio_snn_ann": e_snn / e_ann if e_ann else None,
    }
    if pooled and all(s["snn_sops_pool_folded"] is not None for s in pooled):
        sops_f = sops + sum(s["snn_sops_pool_folded"] for s in pooled)
        macs_f = macs - sum(s["snn_macs"] for s in pooled)
        e_f = E_AC_PJ * sops_f + E_MAC_PJ * macs_f
        totals.update(snn_sops_pool_folded=sops_f, snn_macs_pool_folded=macs_f, snn_energy_uj_pool_folded=e_f * 1e-6,
                      energy_ratio_snn_ann_pool_folded=e_f / e_ann if e_ann else None)
    return totals
