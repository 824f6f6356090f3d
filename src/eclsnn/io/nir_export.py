"""Export a converted SNN to NIR (docs/NIR.md; the format is described in :mod:`eclsnn.io.nir`)."""

from __future__ import annotations

import json
import operator
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.errors import ConversionError
from eclsnn.core.neurons import BurstNeuron, DualThresholdIFNeuron, IFNeuron, SpikingNeuron
from eclsnn.core.pooling import SpikingMaxPool
from eclsnn.simulation.network import SpikingNetwork
from eclsnn.io._nir_common import FORMAT, META, NEURON_FORMS, NIRExportWarning, _below, _f32, _nir, _pair

@dataclass
class _Value:
    """What an fx node's tensor is in the NIR graph: the sum of the outputs of ``sources`` (names,
    repeats allowed), times ``factor`` per channel if that scale has not been applied yet (only in
    the ``"if"`` form, where a neuron's θ waits to be folded into the next weights)."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]  # one sample, no batch dimension
    factor: np.ndarray | None = None  # [shape[0]]


class _Shapes(fx.Interpreter):
    """One forward pass for the shapes, with the neurons as identities (no state is touched)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), SpikingNeuron):
            result = self.env[n.args[0]]
        else:
            result = super().run_node(n)
        if torch.is_tensor(result):
            self.shapes[n] = tuple(result.shape)
        return result


class _Exporter:
    """Walks the network's graph once and emits NIR nodes and edges, one method per kind of fx node
    (synapse, pooling, flatten, addition, neuron, readout).

    Why one class of ~350 lines: every method reads and extends the same state — the NIR nodes and
    edges built so far, each fx value's pending sum of sources and per-channel factor (:class:`_Value`),
    the recorded shapes, the names of layers whose dynamics live only in metadata — and the methods call
    one another as the graph is walked. Split into functions, that state would travel through every
    signature; split into classes, the reader would chase one walk through several files."""

    def __init__(self, snn: SpikingNetwork, sample: torch.Tensor, form: str):
        self.nir = _nir()
        self.snn, self.form = snn, form
        self.gm = snn.graph_module
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.env: dict[fx.Node, _Value | None] = {}
        self.metadata_only: list[str] = []  # layers whose dynamics are partly only in metadata
        interp = _Shapes(self.gm)
        try:
            with torch.no_grad():
                interp.run(sample)
        except RuntimeError as exc:
            raise ConversionError(f"NIR export: the network cannot run on sample_input of shape {tuple(sample.shape)}: "
                                  f"{str(exc).splitlines()[0]}; pass a batch of the network's input") from None
        self.shapes = {n: s[1:] for n, s in interp.shapes.items()}

    # -- graph building -------------------------------------------------------------------------
    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self.nodes:
            name, k = f"{base}_{k}", k + 1
        return name

    def add(self, base: str, node, value: _Value | None) -> str:
        name = self._name(base)
        self.nodes[name] = node
        for src in self.connect(value) if value is not None else ():
            self.edges.append((src, name))
        return name

    def connect(self, value: _Value) -> list[str]:
        """Distinct source names whose sum is ``value`` (a pending factor and repeated sources become
        Scale nodes, since NIR sums a node's inputs and allows no duplicate edge)."""
        if value.factor is not None:
            value = self.materialise(value)
        out = []
        for src, k in Counter(value.sources).items():
            if k > 1:
                src = self.add(f"{src}.x{k}", self.nir.Scale(np.full(value.shape, k, np.float32)), _Value((src,), value.shape))
            out.append(src)
        return out

    def materialise(self, value: _Value) -> _Value:
        scale = np.broadcast_to(value.factor.reshape(-1, *([1] * (len(value.shape) - 1))), value.shape)
        base = value.sources[0] if len(set(value.sources)) == 1 else "sum"
        name = self.add(f"{base}.theta", self.nir.Scale(_f32(scale)), _Value(value.sources, value.shape))
        return _Value((name,), value.shape)

    def value(self, arg) -> _Value:
        if not isinstance(arg, fx.Node) or self.env.get(arg) is None:
            raise ConversionError(f"NIR export: {arg} is not a tensor of the network")
        return self.env[arg]

    # -- the walk ---------------------------------------------------------------------------------
    def run(self):
        nir = self.nir
        for node in self.gm.graph.nodes:
            try:
                self.env[node] = self.visit(node)
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - an unexpected layout of an allowed op
                raise ConversionError(f"NIR export: cannot express node {node.name} ({node.op} {node.target}): {exc}") from None
        settings = json.dumps(self.snn.settings, default=str)
        meta = {META: {"format": FORMAT["name"], "version": FORMAT["version"], "neurons": self.form, "settings": settings,
                       "time_step": "one step per NIR time unit (I and IF with r = 1)",
                       "input": "the same analog input at every step (direct input)",
                       "readout": "the Output node's value; the prediction after t steps is its mean over steps 1..t"}}
        try:
            graph = nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=meta)
        except (ValueError, AssertionError, NotImplementedError) as exc:
            raise ConversionError(f"NIR export: the graph failed NIR's type check: {exc}") from None
        return graph

    def visit(self, node: fx.Node) -> _Value | None:
        nir = self.nir
        if node.op == "placeholder":
            shape = self.shapes[node]
            return _Value((self.add("input", nir.Input(input_type=np.array(shape)), None),), shape)
        if node.op == "output":
            value = self.value(node.args[0])
            self.add("output", nir.Output(output_type=np.array(value.shape)), value)
            return None
        if node.op == "get_attr":
            raise ConversionError(f"NIR export: node {node.name} reads a constant tensor ({node.target}); NIR has no constant input")
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op in ("call_function", "call_method"):
            return self.visit_function(node)
        raise ConversionError(f"NIR export: unexpected graph node {node.name} ({node.op})")

    # -- modules ----------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, mod: nn.Module) -> _Value:
        nir = self.nir
        name = node.target
        out_shape = self.shapes[node]
        x = self.value(node.args[0])
        meta = {META: {"module": name, "torch": type(mod).__name__}}
        if isinstance(mod, (IFNeuron, DualThresholdIFNeuron)):
            return self.neuron(name, mod, x)
        if isinstance(mod, nn.Linear):
            w = _f32(mod.weight)
            w, x = self.fold(w, x, lambda w, f: w * f[None, :])
            b = _f32(mod.bias) if mod.bias is not None else np.zeros(w.shape[0], np.float32)
            return _Value((self.add(name, nir.Affine(weight=w, bias=b, metadata=meta), x),), out_shape)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            dims = mod.weight.dim() - 2
            if mod.padding_mode != "zeros":
                raise ConversionError(f"NIR export: {name} pads with {mod.padding_mode!r}; NIR convolutions pad with zeros")
            padding = self._padding(name, mod, dims)
            w = _f32(mod.weight)
            w, x = self.fold(w, x, lambda w, f: w * self._conv_factor(f, mod)[(slice(None), slice(None)) + (None,) * dims])
            b = _f32(mod.bias) if mod.bias is not None else np.zeros(w.shape[0], np.float32)
            if dims == 2:
                if w.shape[2] != w.shape[3]:
                    raise ConversionError(f"NIR export: {name} has a {w.shape[2]}x{w.shape[3]} kernel; NIR 1.0's Conv2d "
                                          "shape inference supports square kernels only")
                node_ = nir.Conv2d(input_shape=tuple(x.shape[1:]) if mod.groups == 1 else None, weight=w,
                                   stride=_pair(mod.stride), padding=padding, dilation=_pair(mod.dilation),
                                   groups=mod.groups, bias=b, metadata=meta)
            else:
                node_ = nir.Conv1d(input_shape=int(x.shape[1]) if mod.groups == 1 else None, weight=w,
                                   stride=int(mod.stride[0]), padding=padding[0], dilation=int(mod.dilation[0]),
                                   groups=mod.groups, bias=b, metadata=meta)
            return _Value((self.add(name, node_, x),), out_shape)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.affine_per_channel(name, mod, x, out_shape, meta)
        if isinstance(mod, nn.AvgPool2d):
            if mod.divisor_override is not None:
                raise ConversionError(f"NIR export: {name} has a divisor_override; NIR's AvgPool2d divides by the window size")
            return self.avgpool(name, x, out_shape, _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                                _pair(mod.padding), mod.ceil_mode, mod.count_include_pad, meta)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return self.adaptive_avgpool(name, x, out_shape, meta)
        if isinstance(mod, nn.Flatten):
            return self.flatten(name, x, out_shape, mod.start_dim, mod.end_dim, meta)
        raise ConversionError(f"NIR export: layer {name} ({type(mod).__name__}) has no NIR equivalent in eclsnn's exporter")

    def _padding(self, name, mod, dims):
        if isinstance(mod.padding, str):
            if mod.padding == "valid":
                return (0,) * dims
            total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
            if any(t % 2 for t in total):
                raise ConversionError(f"NIR export: {name} uses asymmetric 'same' padding, which NIR cannot express")
            return tuple(t // 2 for t in total)
        return _pair(mod.padding, dims)

    @staticmethod
    def _conv_factor(f: np.ndarray, mod) -> np.ndarray:
        """Per-(out, in-group) factor of a pending per-input-channel scale for a grouped conv."""
        out_c, in_per_group = mod.weight.shape[:2]
        group = np.arange(out_c) // (out_c // mod.groups)
        idx = group[:, None] * in_per_group + np.arange(in_per_group)[None, :]
        return f[idx]

    def fold(self, w, x: _Value, apply):
        """Fold a pending θ (``"if"`` form) into the weights that consume it."""
        if x.factor is None:
            return w, x
        return _f32(apply(w, x.factor.astype(np.float32))), _Value(x.sources, x.shape)

    def affine_per_channel(self, name, mod, x: _Value, out_shape, meta) -> _Value:
        """An unfolded BatchNorm ``scale·x + shift`` per channel, as a 1×1 convolution (maps) or an Affine
        (features) with a diagonal weight — the same function; the off-diagonal zeros add exact zeros."""
        nir = self.nir
        gamma = mod.weight.detach().double() if mod.weight is not None else torch.ones_like(mod.running_var.double())
        beta = mod.bias.detach().double() if mod.bias is not None else torch.zeros_like(gamma)
        scale = gamma / torch.sqrt(mod.running_var.double() + mod.eps)
        shift = _f32(beta - mod.running_mean.double() * scale)
        diag, x = self.fold(np.diag(_f32(scale)), x, lambda w, f: w * f[None, :])
        meta[META]["note"] = "unfolded BatchNorm: scale*x + shift per channel, as a diagonal weight"
        if len(x.shape) == 1:
            node_ = nir.Affine(weight=diag, bias=shift, metadata=meta)
        elif len(x.shape) == 2:
            node_ = nir.Conv1d(input_shape=int(x.shape[1]), weight=diag[:, :, None], stride=1, padding=0, dilation=1,
                               groups=1, bias=shift, metadata=meta)
        else:
            node_ = nir.Conv2d(input_shape=tuple(x.shape[1:]), weight=diag[:, :, None, None], stride=(1, 1), padding=(0, 0),
                               dilation=(1, 1), groups=1, bias=shift, metadata=meta)
        return _Value((self.add(name, node_, x),), out_shape)

    def avgpool(self, name, x: _Value, out_shape, kernel, stride, padding, ceil_mode, count_include_pad, meta) -> _Value:
        nir = self.nir
        if len(x.shape) != 3:
            raise ConversionError(f"NIR export: {name} pools a {len(x.shape) - 1}-d map; NIR has 2-d average pooling only")
        if any(padding) and not count_include_pad:
            raise ConversionError(f"NIR export: {name} pools with padding but without counting it (count_include_pad=False); "
                                  "NIR's AvgPool2d does not say how it treats padding")
        floor_shape = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[1:], padding, kernel, stride)]
        if list(out_shape[1:]) != floor_shape:
            raise ConversionError(f"NIR export: {name} uses ceil_mode, which NIR's AvgPool2d cannot express")
        node_ = nir.AvgPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding), metadata=meta)
        return _Value((self.add(name, node_, _Value(x.sources, x.shape)),), out_shape, x.factor)

    def adaptive_avgpool(self, name, x: _Value, out_shape, meta) -> _Value:
        """One fixed window when the input size is a multiple of the output size (else no NIR form)."""
        if len(x.shape) != 3:
            raise ConversionError(f"NIR export: {name} pools a {len(x.shape) - 1}-d map; NIR has 2-d average pooling only")
        size_in, size_out = x.shape[1:], out_shape[1:]
        if any(i % o for i, o in zip(size_in, size_out)):
            raise ConversionError(f"NIR export: {name} pools {tuple(size_in)} to {tuple(size_out)}, which is not one fixed "
                                  "window; NIR's AvgPool2d needs the input size to be a multiple of the output size")
        kernel = tuple(i // o for i, o in zip(size_in, size_out))
        meta[META]["output_size"] = np.array(size_out)
        return self.avgpool(name, x, out_shape, kernel, kernel, (0, 0), False, True, meta)

    def flatten(self, name, x: _Value, out_shape, start_dim: int, end_dim: int, meta) -> _Value:
        nir = self.nir
        ndim = len(x.shape) + 1
        start, end = start_dim % ndim, end_dim % ndim
        if start == 0:
            raise ConversionError(f"NIR export: {name} flattens the batch dimension")
        # NIR's dimensions are those of one sample (its type inference reads them so): batch dim 1 -> 0.
        nir_end = -1 if end == ndim - 1 else end - 1
        node_ = nir.Flatten(input_type={"input": np.array(x.shape)}, start_dim=start - 1, end_dim=nir_end, metadata=meta)
        factor = x.factor
        if factor is not None and start == 1:
            factor = np.repeat(factor, int(np.prod(x.shape[1:end])))
        return _Value((self.add(name, node_, _Value(x.sources, x.shape)),), out_shape, factor)

    # -- neurons ----------------------------------------------------------------------------------
    def neuron(self, name: str, mod: SpikingNeuron, x: _Value) -> _Value:
        shape = x.shape
        theta_c = _f32(mod.theta).reshape(-1)
        theta = np.broadcast_to(theta_c.reshape(-1, *([1] * (len(shape) - 1))), shape).astype(np.float32)
        dual = isinstance(mod, DualThresholdIFNeuron)
        record = {"module": name, "neuron": "dual" if dual else "if", "reset": "subtract", "v_init": float(mod.v_init),
                  "spike_condition": "v >= theta", "per_channel": int(mod.theta.dim() == 1), "theta": theta_c}
        if dual:
            record.update(theta_neg=float(mod.theta_neg), negative_spikes="s = -1 if v < theta_neg*theta and the net spike "
                          "count so far is positive; the reset then adds theta", count_gate="net spike count c(t) = sum of s")
        if self.form == "exact":
            return self.neuron_exact(name, x, theta, record, dual)
        return self.neuron_if(name, x, theta, theta_c, record, dual)

    def neuron_exact(self, name, x: _Value, theta, record, dual) -> _Value:
        nir = self.nir
        shape = x.shape
        record["nir_form"] = ("I + Threshold + Scale(-theta) feedback + Scale(theta): exact for the positive spikes, "
                              "the subtractive reset and v_init; " + ("the negative spikes and the count gate are in this "
                              "metadata only" if dual else "the whole neuron is exact"))
        if dual:
            record["only_in_metadata"] = "negative spikes, count gate"
            self.metadata_only.append(name)
        c = (theta.astype(np.float64) * (1.0 - record["v_init"])).astype(np.float32)
        v = self.add(f"{name}.v", nir.I(r=np.ones(shape, np.float32), metadata={META: {**record, "role": "membrane"}}), x)
        fire = self.add(f"{name}.fire", nir.Threshold(threshold=_below(c), metadata={META: {"role": "fire", "module": name,
                        "threshold": "theta*(1 - v_init), lowered by one float32 step: v > thr is v >= theta*(1 - v_init)"}}),
                        _Value((v,), shape))
        reset = self.add(f"{name}.reset", nir.Scale(scale=-theta, metadata={META: {"role": "reset", "module": name}}),
                         _Value((fire,), shape))
        self.edges.append((reset, v))  # the feedback edge: lands in the next step
        out = self.add(name, nir.Scale(scale=theta.copy(), metadata={META: {"role": "output", "module": name}}), _Value((fire,), shape))
        return _Value((out,), shape)

    def neuron_if(self, name, x: _Value, theta, theta_c, record, dual) -> _Value:
        nir = self.nir
        shape = x.shape
        record["nir_form"] = "NIR IF with theta folded into the weights that consume its spikes"
        record["only_in_metadata"] = "subtractive reset, v_init, spike on v >= theta" + (", negative spikes, count gate" if dual else "")
        self.metadata_only.append(name)
        node_ = nir.IF(r=np.ones(shape, np.float32), v_threshold=theta, v_reset=np.zeros(shape, np.float32),
                       metadata={META: {**record, "role": "neuron"}})
        out = self.add(name, node_, x)
        return _Value((out,), shape, np.broadcast_to(theta_c, (shape[0],)).astype(np.float32).copy())

    # -- functions and methods --------------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> _Value | None:
        t = node.target
        tensors = [a for a in node.all_input_nodes if self.env.get(a) is not None]
        if not tensors or t in ("size", "dim", getattr, operator.getitem):
            return None  # x.size(), x.shape, x.shape[0], ...: shapes, not tensors of the network
        out_shape = self.shapes.get(node)
        name = node.name
        if t in (operator.add, operator.iadd, torch.add, "add", "add_"):
            others = [a for a in node.args if not isinstance(a, fx.Node)]
            if any(o != 0 for o in others) or node.kwargs.get("alpha", 1) != 1:
                raise ConversionError(f"NIR export: {name} adds a constant or scales a summand; NIR has no constant input")
            return self.merge(name, [self.value(a) for a in tensors], out_shape)
        if t in (operator.sub, torch.sub):
            a, b = (self.value(a) for a in node.args[:2])
            return self.merge(name, [a, self.scaled(b, -1.0, f"{name}.neg")], out_shape)
        if t in (operator.neg, torch.neg):
            return self.scaled(self.value(node.args[0]), -1.0, name)
        if t in (operator.mul, operator.imul, torch.mul, operator.truediv, torch.div):
            a, b = node.args[:2]
            x, c = (a, b) if isinstance(a, fx.Node) else (b, a)
            if isinstance(c, fx.Node):
                raise ConversionError(f"NIR export: {name} multiplies two tensors")
            c = float(c)
            return self.scaled(self.value(x), 1.0 / c if t in (operator.truediv, torch.div) else c, name)
        if t in (torch.flatten, "flatten"):
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self.flatten(name, self.value(node.args[0]), out_shape, start, end, {META: {"torch": "flatten"}})
        if t in ("view", "reshape", torch.reshape):
            x = self.value(node.args[0])
            if tuple(out_shape) == x.shape:
                return x
            if len(out_shape) == 1 and out_shape[0] == int(np.prod(x.shape)):
                return self.flatten(name, x, out_shape, 1, -1, {META: {"torch": str(t)}})
            raise ConversionError(f"NIR export: {name} reshapes {x.shape} to {tuple(out_shape)}; NIR can only flatten")
        if t == "contiguous":
            return self.value(node.args[0])
        if t in (F.avg_pool2d,):
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            kw = dict(zip(names, node.args[1:]), **node.kwargs)
            if kw.get("divisor_override") is not None:
                raise ConversionError(f"NIR export: {name} has a divisor_override")
            kernel = _pair(kw["kernel_size"])
            return self.avgpool(name, self.value(node.args[0]), out_shape, kernel, _pair(kw.get("stride") or kernel),
                                _pair(kw.get("padding", 0)), kw.get("ceil_mode", False), kw.get("count_include_pad", True),
                                {META: {"torch": "avg_pool2d"}})
        if t in (F.adaptive_avg_pool2d,):
            return self.adaptive_avgpool(name, self.value(node.args[0]), out_shape, {META: {"torch": "adaptive_avg_pool2d"}})
        if t in (torch.mean, "mean"):
            x = self.value(node.args[0])
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = {d % (len(x.shape) + 1) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))} if dim is not None else set()
            if len(x.shape) == 3 and dims == {2, 3}:
                pooled = self.avgpool(name, x, (x.shape[0], 1, 1), tuple(x.shape[1:]), tuple(x.shape[1:]), (0, 0), False, True,
                                      {META: {"torch": "mean over the spatial dimensions"}})
                if tuple(out_shape) == (x.shape[0], 1, 1):
                    return pooled
                return self.flatten(f"{name}.flatten", pooled, out_shape, 1, -1, {META: {"torch": "mean (drops dims)"}})
            raise ConversionError(f"NIR export: {name} averages over dims {sorted(dims)}; NIR can average 2-d windows only")
        if t is torch.cat:
            raise ConversionError(f"NIR export: {name} concatenates tensors; NIR has no concatenation node")
        label = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        raise ConversionError(f"NIR export: node {name} ({label}) has no NIR equivalent in eclsnn's exporter")

    def merge(self, name: str, values: list[_Value], out_shape) -> _Value:
        """A residual addition: NIR sums the inputs of a node, so the sum is the union of the sources."""
        if any(v.shape != tuple(out_shape) for v in values):
            raise ConversionError(f"NIR export: {name} adds tensors of shapes {[v.shape for v in values]} by broadcasting; "
                                  "NIR sums inputs of one shape")
        factors = [v.factor for v in values]
        if all(f is None for f in factors) or (all(f is not None for f in factors)
                                                and all(np.array_equal(factors[0], f) for f in factors)):
            return _Value(tuple(s for v in values for s in v.sources), tuple(out_shape), factors[0])
        values = [self.materialise(v) if v.factor is not None else v for v in values]
        return _Value(tuple(s for v in values for s in v.sources), tuple(out_shape))

    def scaled(self, x: _Value, c: float, name: str) -> _Value:
        if x.factor is not None:
            return _Value(x.sources, x.shape, (x.factor * np.float32(c)).astype(np.float32))
        node_ = self.nir.Scale(scale=np.full(x.shape, c, np.float32), metadata={META: {"torch": "scale by a constant"}})
        return _Value((self.add(name, node_, x),), x.shape)


def _refuse_max_pools(snn: SpikingNetwork) -> None:
    """NIR has no max-pool node and no graded spikes: a network with either cannot be written without
    changing its meaning."""
    gm = snn.graph_module
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BurstNeuron):
            raise ConversionError(f"NIR export: {node.target} is a burst neuron (graded spikes, several a step); NIR's "
                                  "neurons fire one spike a step, so the graph cannot be written without changing its "
                                  "meaning. Convert with neuron='dual' to export")
        is_pool = (node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                           (nn.MaxPool1d, nn.MaxPool2d, SpikingMaxPool))) or (
            node.op == "call_function" and node.target in (F.max_pool1d, F.max_pool2d))
        if is_pool:
            raise ConversionError(f"NIR export: {node.name} is a max pool; NIR has no max-pool node, so the graph cannot "
                                  "be written without changing its meaning. Export with --format npz or json "
                                  "(docs/EXPORT.md), or convert a network without max pooling (maxpool='avg' and "
                                  "fine-tuning)")


def to_nir(snn: SpikingNetwork, sample_input: torch.Tensor, neurons: str = "exact"):
    """The converted network as a ``nir.NIRGraph``.

    Args:
        snn: a :class:`~eclsnn.SpikingNetwork` (from :func:`eclsnn.convert`).
        sample_input: one input batch ``[B, ...]`` (one step of direct input); only its shape is used.
        neurons: ``"exact"`` (default): each neuron layer as ``I`` + ``Threshold`` + ``Scale`` nodes with a
            feedback edge — exact for IF neurons (subtractive reset, ``v_init``, ``≥``); the dual neuron's
            negative spikes and count gate are in metadata only. ``"if"``: NIR ``IF`` nodes (what other
            frameworks import) with θ folded into the consuming weights; reset, ``v_init`` and the tie
            rule are in metadata only.

    Everything that lives only in metadata is listed in one :class:`NIRExportWarning`.
    Raises :class:`~eclsnn.ConversionError` naming a layer NIR cannot express, or if ``nir`` is missing.
    """
    if not isinstance(snn, SpikingNetwork):
        raise ConversionError(f"expected a SpikingNetwork (from eclsnn.convert), got {type(snn).__name__}")
    if neurons not in NEURON_FORMS:
        raise ConversionError(f"neurons must be one of {NEURON_FORMS}, got {neurons!r}")
    if not torch.is_tensor(sample_input) or not sample_input.is_floating_point() or sample_input.dim() < 2:
        raise ConversionError("sample_input must be a floating-point batch [B, ...] of the network's input")
    _refuse_max_pools(snn)
    param = next(snn.graph_module.parameters(), None)
    sample = sample_input[:1].to(device=param.device if param is not None else "cpu",
                                 dtype=param.dtype if param is not None else torch.float32)
    exporter = _Exporter(snn, sample, neurons)
    graph = exporter.run()
    if exporter.metadata_only:
        what = ("the dual-threshold neuron's negative spikes and count gate" if neurons == "exact" else
                "subtractive reset, the initial potential v_init*theta and the tie rule (fire on v >= theta)"
                + (" and the dual-threshold neuron's negative spikes and count gate"
                   if any(isinstance(m, DualThresholdIFNeuron) for _, m in snn.neurons()) else ""))
        layers = ", ".join(exporter.metadata_only[:4]) + (", ..." if len(exporter.metadata_only) > 4 else "")
        warnings.warn(
            f"NIR has no field for {what}: for {len(exporter.metadata_only)} neuron layer(s) ({layers}) they are stored only "
            f"in node metadata ['{META}'], which eclsnn.from_nir reads and other NIR readers ignore (docs/NIR.md)",
            NIRExportWarning, stacklevel=2)
    return graph



def write_nir(snn: SpikingNetwork, path: str | os.PathLike, sample_input: torch.Tensor, neurons: str = "exact") -> Path:
    """:func:`to_nir` and ``nir.write`` to ``path`` (written to a temporary file, then renamed)."""
    nir = _nir()
    graph = to_nir(snn, sample_input, neurons)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {path}: {exc}") from None
    return path

