"""Export to and import from NIR, the Neuromorphic Intermediate Representation (Pedersen et al.,
Nature Communications 2024; the ``nir`` package), keeping the dynamics of eclsnn's neurons.

NIR's own ``IF`` node resets to a value, starts from an unstated potential and fires on ``v > θ``;
eclsnn's neurons reset by subtraction, start from ``v_init·θ`` and fire on ``m ≥ θ``. So the default
form (``neurons="exact"``) writes each neuron layer as a composition of NIR primitives that is exact
for the IF neuron (``docs/NIR.md`` derives it):

- ``<layer>.v``     ``I`` (r = 1): the shifted membrane ``u = v − v_init·θ``, starting from 0;
- ``<layer>.fire``  ``Threshold`` at ``θ·(1 − v_init)``, lowered by one float32 step so that NIR's
  strict ``u > thr`` is eclsnn's ``u ≥ θ·(1 − v_init)`` for every float32 ``u``;
- ``<layer>.reset`` ``Scale(−θ)`` fed back into ``<layer>.v``: a spike at step t removes θ from
  the membrane seen at step t+1 — subtractive reset;
- ``<layer>``       ``Scale(θ)``: the layer's output ``θ·s``.

What NIR has no primitive for — the dual-threshold neuron's negative spikes and its count gate — is
kept in the node metadata (key ``"eclsnn"``), announced by a :class:`NIRExportWarning`, and read back
by :func:`from_nir`; a reader that ignores the metadata runs those layers as IF neurons.
``neurons="if"`` writes NIR ``IF`` nodes instead (what other frameworks read), with θ folded into the
weights that consume the spikes; there subtractive reset, ``v_init`` and the tie rule are metadata only.

``nir`` is imported lazily: ``pip install "eclsnn[nir]"``.
"""

from __future__ import annotations

import json
import operator
import os
import re
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
from eclsnn.core.neurons import DualThresholdIFNeuron, IFNeuron, SpikingNeuron
from eclsnn.simulation.network import SpikingNetwork

__all__ = ["to_nir", "from_nir", "write_nir", "read_nir", "NIRExportWarning", "NEURON_FORMS", "FORMAT"]

FORMAT = {"name": "eclsnn-nir", "version": 1}
NEURON_FORMS = ("exact", "if")
META = "eclsnn"  # key of eclsnn's record in NIR node and graph metadata
_INSTALL = 'NIR support needs the nir package: pip install "eclsnn[nir]"'


class NIRExportWarning(UserWarning):
    """Part of the network's dynamics is stored only in NIR node metadata (see ``docs/NIR.md``)."""


def _nir():
    try:
        import nir
    except ImportError:
        raise ConversionError(_INSTALL) from None
    return nir


def _f32(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _below(c: np.ndarray) -> np.ndarray:
    """The largest float32 below ``c``: for float32 ``u``, ``u > _below(c)`` exactly when ``u ≥ c``."""
    return np.nextafter(c.astype(np.float32), np.float32(-np.inf)).astype(np.float32)


def _above(c: np.ndarray) -> np.ndarray:
    return np.nextafter(c.astype(np.float32), np.float32(np.inf)).astype(np.float32)


# ==== export ======================================================================================

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


def _pair(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))


class _Exporter:
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


# ==== import ======================================================================================

class NIRScale(nn.Module):
    """Elementwise product with a fixed array (NIR ``Scale``); the array has the shape of one sample."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _meta(node) -> dict[str, Any]:
    record = getattr(node, "metadata", None) or {}
    record = record.get(META, {}) if isinstance(record, dict) else {}
    return record if isinstance(record, dict) else {}


def _py(v):
    if isinstance(v, bytes):
        return v.decode("utf8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _identifier(name: str) -> str:
    """A module path: word characters in each dot-separated part (digits allowed, as in nn.Sequential)."""
    return ".".join(re.sub(r"\W", "_", p) or "_" for p in str(name).split("."))


def _per_channel(full: np.ndarray, what: str) -> np.ndarray:
    """``[C]`` from an array over one sample ``[C, ...]`` that is constant within each channel."""
    full = np.asarray(full, dtype=np.float32)
    if full.ndim == 0:
        return full.reshape(1)
    c = full.reshape(full.shape[0], -1)
    if not (c == c[:, :1]).all():
        raise ConversionError(f"NIR import: {what} varies within a channel; eclsnn's neurons have one θ per channel")
    return c[:, 0].copy()


def _theta_tensor(theta: np.ndarray, record: dict[str, Any]) -> torch.Tensor:
    """θ as eclsnn holds it: one number for a layer-wise θ, ``[C]`` for a per-channel one (the metadata
    says which; without it, per-channel only where the channels differ)."""
    uniform = bool((theta == theta[0]).all())
    per_channel = record.get("per_channel")
    if (per_channel is None and uniform) or (per_channel is not None and not int(per_channel)):
        if not uniform:
            raise ConversionError("NIR import: the metadata says one θ per layer but the graph has one per channel")
        return torch.tensor(float(theta[0]))
    return torch.from_numpy(theta)


@dataclass
class _Neuron:
    name: str  # the NIR node whose output is the layer's output
    inputs: list[str]
    module: nn.Module
    internal: tuple[str, ...]
    qualname: str
    post_scale: np.ndarray | None = None  # "if" form: outputs spikes, so divide θ·s by θ again


class _Importer:
    def __init__(self, graph):
        self.nir = _nir()
        self.graph = graph
        self.nodes = dict(graph.nodes)
        self.edges = [(str(a), str(b)) for a, b in graph.edges]
        self.preds: dict[str, list[str]] = {n: [] for n in self.nodes}
        self.succs: dict[str, list[str]] = {n: [] for n in self.nodes}
        for a, b in self.edges:
            if a not in self.nodes or b not in self.nodes:
                raise ConversionError(f"NIR import: edge ({a}, {b}) names a node that is not in the graph")
            self.preds[b].append(a)
            self.succs[a].append(b)

    def error(self, name, why) -> ConversionError:
        return ConversionError(f"NIR import: node {name!r} ({type(self.nodes[name]).__name__}): {why}")

    # -- neurons ----------------------------------------------------------------------------------
    def composed_neuron(self, v: str) -> _Neuron:
        nir = self.nir
        node_v = self.nodes[v]
        fires = self.succs[v]
        if len(fires) != 1 or not isinstance(self.nodes[fires[0]], nir.Threshold):
            raise self.error(v, "an integrator must feed exactly one Threshold (eclsnn reads I + Threshold + Scale(-θ) "
                                "feedback + Scale(θ) as an IF neuron)")
        fire = fires[0]
        resets = [s for s in self.succs[fire] if isinstance(self.nodes[s], nir.Scale) and self.succs[s] == [v]]
        outs = [s for s in self.succs[fire] if s not in resets]
        if len(resets) != 1:
            raise self.error(fire, "no Scale(-θ) feedback from the threshold to its integrator: that is no "
                                   "subtractive reset, and eclsnn's neurons reset by subtraction")
        if len(outs) != 1 or not isinstance(self.nodes[outs[0]], nir.Scale):
            raise self.error(fire, "the spikes must feed one Scale(θ) (the layer's output θ·s) besides the reset")
        reset, out = resets[0], outs[0]
        theta_full = np.asarray(self.nodes[out].scale, dtype=np.float32)
        if not np.array_equal(np.asarray(self.nodes[reset].scale, dtype=np.float32), -theta_full):
            raise self.error(reset, "the reset subtracts something other than the output scale θ")
        if not np.all(np.asarray(node_v.r) == 1):
            raise self.error(v, "integrators with r != 1 are not eclsnn neurons (one step adds the input once)")
        theta = _per_channel(theta_full, f"θ of {out!r}")
        thr = np.asarray(self.nodes[fire].threshold, dtype=np.float32)
        record = {k: _py(x) for k, x in _meta(node_v).items()}
        if "v_init" in record:
            v_init = float(record["v_init"])
            expected = _below((theta_full.astype(np.float64) * (1.0 - v_init)).astype(np.float32))
            if not np.array_equal(np.broadcast_to(thr, theta_full.shape), expected):
                raise self.error(fire, f"the threshold does not match the metadata's v_init = {v_init}: the file was "
                                       "edited or written by another tool; remove the metadata to read the graph as it is")
        else:
            # NIR's strict u > thr is u >= above(thr) in float32; the membrane starts at θ − above(thr).
            ratio = 1.0 - _above(np.broadcast_to(thr, theta_full.shape)).astype(np.float64) / theta_full.astype(np.float64)
            if not np.allclose(ratio, ratio.flat[0], rtol=0, atol=1e-6):
                raise self.error(fire, "the threshold is not one fraction of θ; eclsnn's v_init is one number per layer")
            v_init = float(ratio.flat[0])
        module = self.make_neuron(record, _theta_tensor(theta, record), v_init, v)
        inputs = [p for p in self.preds[v] if p != reset]
        return _Neuron(out, inputs, module, (v, fire, reset), str(record.get("module") or out))

    def if_neuron(self, name: str) -> _Neuron:
        node_ = self.nodes[name]
        record = {k: _py(x) for k, x in _meta(node_).items()}
        if record.get("reset") != "subtract" or "v_init" not in record:
            raise self.error(name, "NIR's IF resets to v_reset, and eclsnn's neurons reset by subtraction; only IF nodes "
                                   "that eclsnn wrote (with their metadata) can be read faithfully")
        if not np.all(np.asarray(node_.r) == 1):
            raise self.error(name, "r != 1 (one step adds the input once in eclsnn)")
        theta = _per_channel(np.asarray(node_.v_threshold, dtype=np.float32), f"v_threshold of {name!r}")
        module = self.make_neuron(record, _theta_tensor(theta, record), float(record["v_init"]), name)
        shape = np.asarray(node_.v_threshold).shape
        inv = np.broadcast_to((1.0 / theta).reshape(-1, *([1] * (len(shape) - 1))), shape).astype(np.float32)
        return _Neuron(name, list(self.preds[name]), module, (), str(record.get("module") or name), inv)

    def make_neuron(self, record, theta, v_init: float, name: str) -> nn.Module:
        kind = record.get("neuron", "if")
        if kind == "dual":
            return DualThresholdIFNeuron(theta, v_init=v_init, theta_neg=float(record.get("theta_neg", 0.0)))
        if kind != "if":
            raise self.error(name, f"unknown eclsnn neuron kind {kind!r} in the metadata")
        return IFNeuron(theta, v_init=v_init)

    # -- other nodes ------------------------------------------------------------------------------
    def module_for(self, name: str) -> nn.Module:
        nir = self.nir
        node_ = self.nodes[name]
        record = {k: _py(x) for k, x in _meta(node_).items()}
        t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))  # noqa: E731
        if isinstance(node_, (nir.Affine, nir.Linear)):
            w = np.asarray(node_.weight)
            if w.ndim != 2:
                raise self.error(name, "batched weights are not supported")
            bias = isinstance(node_, nir.Affine) and node_.bias is not None
            mod = nn.Linear(w.shape[1], w.shape[0], bias=bias)
            mod.weight.data = t(w)
            if bias:
                mod.bias.data = t(node_.bias)
            return mod
        if isinstance(node_, (nir.Conv1d, nir.Conv2d)):
            w = np.asarray(node_.weight)
            dims = w.ndim - 2
            padding = node_.padding if isinstance(node_.padding, str) else _pair(np.asarray(node_.padding).reshape(-1).tolist(), dims)
            cls = nn.Conv2d if dims == 2 else nn.Conv1d
            mod = cls(w.shape[1] * int(node_.groups), w.shape[0], tuple(w.shape[2:]),
                      stride=_pair(np.asarray(node_.stride).reshape(-1).tolist(), dims), padding=padding,
                      dilation=_pair(np.asarray(node_.dilation).reshape(-1).tolist(), dims), groups=int(node_.groups), bias=True)
            mod.weight.data = t(w)
            mod.bias.data = t(node_.bias if node_.bias is not None else np.zeros(w.shape[0]))
            return mod
        if isinstance(node_, nir.AvgPool2d):
            kernel = _pair(np.asarray(node_.kernel_size).reshape(-1).tolist())
            stride = _pair(np.asarray(node_.stride).reshape(-1).tolist())
            padding = _pair(np.asarray(node_.padding).reshape(-1).tolist())
            if "output_size" in record and stride == kernel and not any(padding):
                # eclsnn wrote an adaptive pool here: the same window, restored for identical float sums
                return nn.AdaptiveAvgPool2d(tuple(int(s) for s in np.asarray(record["output_size"]).reshape(-1)))
            return nn.AvgPool2d(kernel, stride, padding)
        if isinstance(node_, nir.Flatten):
            start = int(node_.start_dim)
            end = int(node_.end_dim)
            return nn.Flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
        if isinstance(node_, nir.Scale):
            return NIRScale(t(node_.scale))
        if isinstance(node_, (nir.I, nir.Threshold)):
            raise self.error(name, "an integrator or threshold outside the I + Threshold + Scale(-θ) + Scale(θ) pattern "
                                   "of an IF neuron")
        if isinstance(node_, nir.NIRGraph):
            raise self.error(name, "nested graphs are not supported")
        raise self.error(name, "no eclsnn equivalent (eclsnn reads conv, Affine/Linear, AvgPool2d, Flatten, Scale and "
                               "IF neurons with subtractive reset)")

    # -- assembling ----------------------------------------------------------------------------------
    def run(self) -> SpikingNetwork:
        nir = self.nir
        neurons: dict[str, _Neuron] = {}
        internal: set[str] = set()
        for name, node_ in self.nodes.items():
            if isinstance(node_, nir.I):
                n = self.composed_neuron(name)
            elif isinstance(node_, nir.IF):
                n = self.if_neuron(name)
            else:
                continue
            neurons[n.name] = n
            internal.update(n.internal)
        inputs = [n for n, x in self.nodes.items() if isinstance(x, nir.Input)]
        outputs = [n for n, x in self.nodes.items() if isinstance(x, nir.Output)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConversionError(f"NIR import: eclsnn needs one Input and one Output node, got {len(inputs)} and {len(outputs)}")
        units = [n for n in self.nodes if n not in internal]
        preds = {n: (neurons[n].inputs if n in neurons else self.preds[n]) for n in units}
        order = self._topological(units, preds)

        graph = fx.Graph()
        root: dict[str, Any] = {}
        env: dict[str, fx.Node] = {}
        used: set[str] = set()

        def clash(q: str) -> bool:
            return q in used or any(u.startswith(q + ".") or q.startswith(u + ".") for u in used)

        def qual(base: str) -> str:
            """A module path for the node: its original one where eclsnn wrote it, else a flat name."""
            q = _identifier(base)
            if clash(q):
                flat, k = q.replace(".", "_"), 1
                q = flat
                while clash(q):
                    q, k = f"{flat}_{k}", k + 1
            used.add(q)
            return q

        result = None

        for name in order:
            node_ = self.nodes[name]
            if isinstance(node_, nir.Input):
                env[name] = graph.placeholder("x")
                continue
            args = [env[p] for p in preds[name]]
            if not args:
                raise self.error(name, "has no input")
            x = args[0]
            for other in args[1:]:  # NIR sums the inputs of a node: a residual addition
                x = graph.call_function(operator.add, (x, other))
            if isinstance(node_, nir.Output):
                result = x
                continue
            if name in neurons:
                n = neurons[name]
                q = qual(n.qualname)
                root[q] = n.module
                x = graph.call_module(q, (x,))
                if n.post_scale is not None:
                    q2 = qual(f"{n.qualname}_spikes".replace(".", "_"))
                    root[q2] = NIRScale(torch.from_numpy(n.post_scale))
                    x = graph.call_module(q2, (x,))
                env[name] = x
                continue
            record = _meta(node_)
            q = qual(str(_py(record["module"])) if record.get("module") is not None else name.replace(".", "_"))
            root[q] = self.module_for(name)
            env[name] = graph.call_module(q, (x,))
        if not neurons:
            raise ConversionError("NIR import: the graph has no spiking neuron layer")
        graph.output(result)
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name="NIRNetwork")
        settings = self._settings(neurons)
        return SpikingNetwork(gm.eval(), settings)

    def _topological(self, units: list[str], preds: dict[str, list[str]]) -> list[str]:
        remaining = {n: len(preds[n]) for n in units}
        users: dict[str, list[str]] = {n: [] for n in units}
        for n in units:
            for p in preds[n]:
                if p not in users:
                    raise self.error(p, "is part of a neuron but also feeds another layer")
                users[p].append(n)
        ready = [n for n in units if remaining[n] == 0]
        order = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for u in users[n]:
                remaining[u] -= 1
                if remaining[u] == 0:
                    ready.append(u)
        if len(order) != len(units):
            stuck = sorted(n for n in units if n not in order)
            raise ConversionError(f"NIR import: the graph has a recurrent edge that is not a neuron's reset (around "
                                  f"{', '.join(stuck[:4])}); eclsnn runs feed-forward networks of IF neurons")
        return order

    def _settings(self, neurons: dict[str, _Neuron]) -> dict[str, Any]:
        record = {k: _py(x) for k, x in _meta(self.graph).items()}
        settings: dict[str, Any] = {}
        if "settings" in record:
            try:
                settings = dict(json.loads(str(record["settings"])))
            except (ValueError, TypeError):
                settings = {}
        if not settings:
            mods = [n.module for n in neurons.values()]
            settings = {"neuron": "dual" if any(isinstance(m, DualThresholdIFNeuron) for m in mods) else "if",
                        "v_init": mods[0].v_init}
        settings["source"] = "nir"
        return settings


def from_nir(graph) -> SpikingNetwork:
    """A spiking network from a NIR graph (or the path of a ``.nir`` file), runnable by
    :func:`eclsnn.simulate`.

    Reads eclsnn's own graphs of either form — with the metadata, the dual-threshold neuron and exact
    ``v_init`` come back — and, without metadata, IF neurons written as
    ``I`` → ``Threshold`` → ``Scale(−θ)`` (fed back to the ``I``) → ``Scale(θ)``, with conv, Affine/Linear,
    AvgPool2d, Flatten, Scale and residual sums (several edges into one node) around them.
    Anything else raises :class:`~eclsnn.ConversionError` naming the node.
    """
    nir = _nir()
    if isinstance(graph, (str, os.PathLike)):
        return read_nir(graph)
    if not isinstance(graph, nir.NIRGraph):
        raise ConversionError(f"expected a nir.NIRGraph or the path of a .nir file, got {type(graph).__name__}")
    return _Importer(graph).run()


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


def read_nir(path: str | os.PathLike) -> SpikingNetwork:
    """``nir.read`` and :func:`from_nir`."""
    nir = _nir()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"NIR file {path} not found")
    try:
        graph = nir.read(path)
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError on foreign files
        raise ConversionError(f"{path} is not a readable NIR file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return from_nir(graph)
