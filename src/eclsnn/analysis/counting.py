"""Operation counts of a spiking network (docs/METHOD.md, "Energy convention"; the details are in
:mod:`eclsnn.analysis.decomposition`): what feeds each synaptic layer (spikes, pooled spikes, analog
values), exact fan-outs, and the synaptic operations and MACs counted by hooks during a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from eclsnn.core.state import is_stateful
from eclsnn.simulation import SpikingNetwork

__all__ = ["E_AC_PJ", "E_MAC_PJ", "SPIKES", "POOLED", "ANALOG_ONCE", "ANALOG", "fanout_map", "synapse_kinds"]

#: Energy per accumulate (one synaptic operation) and per multiply-accumulate, 45 nm (Horowitz 2014).
E_AC_PJ = 0.9
E_MAC_PJ = 4.6
#: energy of one comparison of the spiking max pool (a 32-bit integer add, 45 nm; Horowitz 2014)
E_CMP_PJ = 0.1

SPIKES, POOLED, ANALOG_ONCE, ANALOG = "spikes", "pooled spikes", "analog input (once)", "analog (per step)"

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}


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

    def reduce(self, reduce) -> None:
        """Add up the operation counts over processes (``reduce(tensor, op)``); per-image ANN MACs are the
        same everywhere (max), a layer is foldable if it is on every process (min)."""
        for st in self.stats.values():
            st["snn_sops"], st["snn_macs"], st["snn_sops_pool_folded"] = (int(v) for v in reduce(
                torch.tensor([st["snn_sops"], st["snn_macs"], st["snn_sops_pool_folded"]], dtype=torch.int64)))
            st["ann_macs"] = int(reduce(torch.tensor([st["ann_macs"]], dtype=torch.int64), "max")[0])
            st["foldable"] = bool(reduce(torch.tensor([int(st["foldable"])], dtype=torch.int64), "min")[0])

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
