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
- Energy: ``E_AC = 0.9 pJ`` per SOP, ``E_MAC = 4.6 pJ`` per MAC (45 nm, Horowitz 2014).

Errors and spikes are observed with :func:`eclsnn.simulation.observe_neurons`, an observer registered on
the network's executor (the simulator calls each neuron's ``multi_step`` directly, not through
``__call__``, so ``nn.Module`` forward hooks do not see it); operations by
forward (pre-)hooks on the synaptic and pooling modules. Nothing about the simulation changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from eclsnn.errors import SimulationError
from eclsnn.core.neurons import SpikingNeuron
from eclsnn.core.state import is_stateful
from eclsnn.simulation import SpikingNetwork, check_time_steps, observe_neurons, simulate

__all__ = [
    "E_AC_PJ", "E_MAC_PJ", "ERRORS", "quantized_reference", "layer_errors", "fanout_map", "synapse_kinds",
    "analyze", "format_analysis", "plot_analysis",
]

#: Energy per accumulate (one synaptic operation) and per multiply-accumulate, 45 nm (Horowitz 2014).
E_AC_PJ = 0.9
E_MAC_PJ = 4.6

#: The error terms, in the order in which they add up to ``total = ReLU(Ī) − r``.
ERRORS = ("clipping", "quantization", "unevenness", "total")

# How a synaptic layer's input relates to the spikes (see the module docstring).
SPIKES, POOLED, ANALOG_ONCE, ANALOG = "spikes", "pooled spikes", "analog input (once)", "analog (per step)"

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}


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


def _time_mean(seq: torch.Tensor) -> torch.Tensor:
    """Mean over the first (time) dimension, one in-place add per step (a reduction over dim 0 of a
    channels-last tensor is several times slower)."""
    acc = seq[0].clone()
    for t in range(1, seq.shape[0]):
        acc.add_(seq[t])
    return acc.div_(seq.shape[0])


# ---- synaptic operations ---------------------------------------------------------------------------

def fanout_map(layer: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Exact fan-out of every input element of ``layer`` for one sample of shape ``input_shape``: the
    number of (output, weight) connections the element drives — what one spike there costs in SOPs.

    Linear: ``out_features`` everywhere. Convolution: ``∂ Σ conv(x; W = 1, no bias) / ∂x``, which
    counts for each input element the outputs whose receptive field contains it (so edges under
    padding, stride and dilation gaps, groups and padding modes are all exact). Returns int64.
    """
    if isinstance(layer, nn.Linear):
        return torch.full(tuple(input_shape), layer.out_features, dtype=torch.int64)
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"fanout_map needs a conv or linear layer, got {type(layer).__name__}")
    with torch.enable_grad():
        x = torch.ones((1, *input_shape), dtype=torch.float64, requires_grad=True)
        weight = torch.ones(layer.weight.shape, dtype=torch.float64)
        layer._conv_forward(x, weight, None).sum().backward()
    return x.grad[0].round().to(torch.int64)


def _through_reshapes(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The node whose values ``node`` holds, looking through reshapes that keep every element."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _RESHAPE_MODULES):
            node = node.args[0]
        elif node.op == "call_method" and node.target in _RESHAPE_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
            node = node.args[0]
        else:
            break
    return node


def _is_neuron(node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is a stateful node whose output is a spike train (a neuron layer)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    module = gm.get_submodule(node.target)
    return is_stateful(module) and module.emits_spikes


def synapse_kinds(snn: SpikingNetwork) -> dict[str, dict[str, Any]]:
    """For every synaptic module (conv/linear) of ``snn``, by qualified name: ``kind`` (what feeds it:
    spikes, pooled spikes, the analog input computed once, or other analog values per step) and, for
    pooled spikes, ``pool`` (the pooling module's name). A module called at several places with
    different kinds counts as analog."""
    gm = snn.graph_module
    dynamic: set[fx.Node] = set()  # nodes that change with time (downstream of a neuron)
    kinds: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if _is_neuron(node, gm) or any(n in dynamic for n in node.all_input_nodes):
            dynamic.add(node)
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _SYNAPTIC):
            continue
        src = _through_reshapes(node.args[0], gm)
        info: dict[str, Any]
        if _is_neuron(src, gm):
            info = {"kind": SPIKES}
        elif (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(gm.get_submodule(src.target), _POOLS)
              and _is_neuron(_through_reshapes(src.args[0], gm), gm)):
            info = {"kind": POOLED, "pool": src.target}
        elif isinstance(node.args[0], fx.Node) and node.args[0] in dynamic:
            info = {"kind": ANALOG}
        else:
            info = {"kind": ANALOG_ONCE}
        if node.target in kinds and kinds[node.target] != info:
            info = {"kind": ANALOG}
        kinds[node.target] = info
    return kinds


def _pool_window(pool: nn.Module, spatial: Sequence[int]) -> tuple[int, ...] | None:
    """The window of a pool whose windows tile its input without overlap or padding (each input
    element in at most one window, the remainder at the far edge dropped), else None."""
    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * len(spatial)

    if isinstance(pool, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        out = tuple(s if o is None else o for o, s in zip(tup(pool.output_size), spatial))
        if any(s % o for s, o in zip(spatial, out)):
            return None
        return tuple(s // o for s, o in zip(spatial, out))
    kernel, stride, padding = tup(pool.kernel_size), tup(pool.stride or pool.kernel_size), tup(pool.padding)
    if kernel != stride or any(padding):
        return None
    if pool.ceil_mode and any(s % k for s, k in zip(spatial, kernel)):
        return None
    return kernel


def _folded_fanout(pool: nn.Module, layer: nn.Module, pool_input_shape: Sequence[int]) -> torch.Tensor | None:
    """Fan-out of each pool input element when the pool is folded into ``layer``: every target of its
    window (non-overlapping pools only; None otherwise)."""
    spatial = tuple(pool_input_shape[1:])
    window = _pool_window(pool, spatial)
    if window is None:
        return None
    pooled_shape = pool.forward(torch.zeros((1, *pool_input_shape))).shape[1:]  # .forward: not through our hooks
    if isinstance(layer, nn.Linear):
        return torch.full(tuple(pool_input_shape), layer.out_features, dtype=torch.int64)
    fan = fanout_map(layer, pooled_shape)
    for dim, k in enumerate(window, start=1):
        fan = fan.repeat_interleave(k, dim=dim)
    pad = []
    for dim in reversed(range(1, len(pool_input_shape))):
        pad += [0, pool_input_shape[dim] - fan.shape[dim]]
    return nn.functional.pad(fan, pad)


class _OpCounter:
    """Forward (pre-)hooks on the synaptic and pooling modules that count MACs and SOPs."""

    def __init__(self, snn: SpikingNetwork):
        gm = snn.graph_module
        self.kinds = synapse_kinds(snn)
        self.layers = {name: gm.get_submodule(name) for name in self.kinds}
        self.stats = {name: {"ann_macs": 0, "snn_sops": 0, "snn_macs": 0, "snn_sops_pool_folded": 0, "foldable": True}
                      for name in self.kinds}
        self._fanout: dict[tuple[str, tuple[int, ...]], torch.Tensor | None] = {}
        self._handles: list[Any] = []
        self._pools: dict[str, list[str]] = {}
        for name, info in self.kinds.items():
            if info["kind"] == POOLED:
                self._pools.setdefault(info["pool"], []).append(name)
        self._gm = gm

    def _fan(self, key, make):
        if key not in self._fanout:
            self._fanout[key] = make()
        return self._fanout[key]

    def __enter__(self):
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._after_layer(name)))
            if self.kinds[name]["kind"] == SPIKES:
                self._handles.append(layer.register_forward_pre_hook(self._spikes_in(name)))
        for pool_name, consumers in self._pools.items():
            self._handles.append(self._gm.get_submodule(pool_name).register_forward_pre_hook(self._pooled_in(pool_name, consumers)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _after_layer(self, name):
        layer, kind = self.layers[name], self.kinds[name]["kind"]

        def hook(module, args, out):
            macs_per_row = out[0].numel() * (layer.weight.numel() // layer.weight.shape[0])
            stats = self.stats[name]
            stats["ann_macs"] = macs_per_row  # per image per step (the ANN runs once)
            if kind != SPIKES:
                stats["snn_macs"] += macs_per_row * out.shape[0]  # rows: B (computed once) or T·B
        return hook

    def _spikes_in(self, name):
        layer = self.layers[name]

        def hook(module, args):
            x = args[0]
            fan = self._fan((name, tuple(x.shape[1:])), lambda: fanout_map(layer, x.shape[1:]).to(x.device))
            self.stats[name]["snn_sops"] += _sops(x, fan)
        return hook

    def _pooled_in(self, pool_name, consumers):
        pool = self._gm.get_submodule(pool_name)

        def hook(module, args):
            x = args[0]
            for name in consumers:
                fan = self._fan((f"{pool_name}->{name}", tuple(x.shape[1:])),
                                lambda: _maybe_to(_folded_fanout(pool, self.layers[name], x.shape[1:]), x.device))
                if fan is None:
                    self.stats[name]["foldable"] = False
                else:
                    self.stats[name]["snn_sops_pool_folded"] += _sops(x, fan)
        return hook


def _sops(x: torch.Tensor, fan: torch.Tensor) -> int:
    """``Σ_rows Σ_positions [x ≠ 0] · fan``, exact: events per position are counted over the rows in
    memory order (a contiguous ``[N, P]`` view, also for channels-last input), then weighted."""
    dims = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    xp = x.permute(0, *dims)
    if not xp.is_contiguous():
        xp = xp.contiguous()
    events = xp.reshape(x.shape[0], -1).ne(0).sum(0, dtype=torch.int32)
    weights = fan.permute(*[d - 1 for d in dims]).reshape(-1)
    return int((events.to(torch.int64) * weights).sum())


def _maybe_to(t, device):
    return None if t is None else t.to(device)


# ---- the analysis ---------------------------------------------------------------------------------

@torch.no_grad()
def analyze(
    model: nn.Module | None,
    variants: dict[str, SpikingNetwork],
    loader: Iterable,
    time_steps: int,
    progress: str | None = None,
) -> dict[str, Any]:
    """Run every variant for ``time_steps`` steps on the ``(x, y)`` batches of ``loader`` and measure,
    per layer, the three errors, firing rates and operations (module docstring). ``model`` (the ANN,
    optional) gives the ANN accuracy. Returns a JSON-able dict; operations are per image."""
    T = check_time_steps(time_steps)
    if not variants:
        raise SimulationError("no SNN variants to analyse")
    recorders = {v: {name: _NeuronRecorder(name, neuron) for name, neuron in snn.neurons()} for v, snn in variants.items()}
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
            with observe_neurons(snn, lambda name, x, out, _r=recorders[v]: _r[name](x, out)), counters[v]:
                out = simulate(snn, x, T)
            correct[v] += (out[-1].argmax(-1) == y.to(out.device)).sum().item()
        total += y.shape[0]
    if total == 0:
        raise SimulationError("no samples to analyse")

    results: dict[str, Any] = {
        "num_samples": total, "time_steps": T, "energy_pj": {"E_AC": E_AC_PJ, "E_MAC": E_MAC_PJ},
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
        results["variants"][v] = {
            "settings": dict(snn.settings), "snn_accuracy": correct[v] / total,
            "neurons": neurons, "synapses": synapses, "totals": _totals(neurons, synapses, T),
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


# ---- reporting -----------------------------------------------------------------------------------------

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
