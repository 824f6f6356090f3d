"""Import a NIR graph as a SpikingNetwork (docs/NIR.md; the format is described in :mod:`eclsnn.io.nir`)."""

from __future__ import annotations

import functools
import json
import keyword
import math
import operator
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from eclsnn.errors import ConversionError, ThresholdWarning
from eclsnn.core.functional import LAMBDA_MIN
from eclsnn.core.neurons import DualThresholdIFNeuron, IFNeuron
from eclsnn.simulation.network import SpikingNetwork
from eclsnn.io._nir_common import META, _above, _below, _nir, _pair
from eclsnn.limits import load_limit_hint, max_load_bytes

_MAX_STATE = 2.0**24  # |v_init|, |theta_neg| in units of θ: beyond, float32 cannot subtract one θ exactly

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
    """A module path: word characters in each dot-separated part (digits allowed, as in nn.Sequential),
    none of them a Python keyword or an attribute of the module that holds it (``forward``, ``training``,
    ``graph``, ...): those get a trailing ``_``, since a metadata record may name anything."""
    return ".".join(_safe_part(p) for p in str(name).split("."))


def _safe_part(part: str) -> str:
    part = re.sub(r"\W", "_", part) or "_"
    if part.isdigit():
        return part
    if part.startswith("__"):  # Python's own names
        part = "n" + part
    while keyword.iskeyword(part) or part in _reserved_names():
        part += "_"
    return part


@functools.lru_cache(maxsize=1)
def _reserved_names() -> frozenset[str]:
    """Attribute names of an fx.GraphModule (and so of every nn.Module inside one)."""
    return frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph())))


def _per_channel(full: np.ndarray, what: str) -> np.ndarray:
    """``[C]`` from an array over one sample ``[C, ...]`` that is constant within each channel."""
    full = np.asarray(full, dtype=np.float32)
    if full.ndim == 0:
        return full.reshape(1)
    c = full.reshape(full.shape[0], -1)
    if not (c == c[:, :1]).all():
        raise ConversionError(f"NIR import: {what} varies within a channel; eclsnn's neurons have one θ per channel")
    return c[:, 0].copy()


@dataclass
class _Neuron:
    name: str  # the NIR node whose output is the layer's output
    inputs: list[str]
    module: nn.Module
    internal: tuple[str, ...]
    qualname: str
    post_scale: np.ndarray | None = None  # "if" form: outputs spikes, so divide θ·s by θ again


class _Importer:
    """Rebuilds a SpikingNetwork from a NIR graph: checks the graph, orders its nodes, recognises
    eclsnn's neuron pattern (membrane, threshold, reset feedback) and rebuilds modules and an fx graph.

    Why one class of ~250 lines: the steps share the graph's node table, the edges and the modules made
    so far, and each step refuses what it cannot map with the node's name in the message; a class keeps
    that state in one place while the walk is read top to bottom."""

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
            v_init = self.number(record, "v_init", v)
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
        module = self.make_neuron(record, self.theta_tensor(theta, record, v), v_init, v)
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
        module = self.make_neuron(record, self.theta_tensor(theta, record, name), self.number(record, "v_init", name), name)
        shape = np.asarray(node_.v_threshold).shape
        inv = np.broadcast_to((1.0 / theta).reshape(-1, *([1] * (len(shape) - 1))), shape).astype(np.float32)
        return _Neuron(name, list(self.preds[name]), module, (), str(record.get("module") or name), inv)

    def number(self, record: dict[str, Any], key: str, name: str, default: float | None = None) -> float:
        """A number of the metadata: finite, and within ±2^24 (beyond, float32 can no longer subtract one θ
        from a membrane of that many θ exactly, so the neuron's reset would be lost)."""
        value = record.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"the metadata's {key} = {value!r} is not a number")
        return self.bounded(float(value), key, name)

    def bounded(self, value: float, what: str, name: str) -> float:
        if not math.isfinite(value) or abs(value) > _MAX_STATE:
            raise self.error(name, f"{what} = {value} is not a finite number within ±2^24 (in units of θ)")
        return value

    def make_neuron(self, record, theta, v_init: float, name: str) -> nn.Module:
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            raise self.error(name, f"θ = {theta.flatten()[:4].tolist()}: thresholds must be finite and positive")
        if (theta <= torch.tensor(LAMBDA_MIN, dtype=theta.dtype)).any():
            warnings.warn(f"NIR import: neuron layer {name!r} has θ at the floor {LAMBDA_MIN} (it never fired on its "
                          "calibration data, or its λ collapsed in training); it passes almost nothing",
                          ThresholdWarning, stacklevel=2)
        v_init = self.bounded(v_init, "v_init", name)
        kind = record.get("neuron", "if")
        if kind == "dual":
            theta_neg = self.number(record, "theta_neg", name, 0.0)
            if not theta_neg < 1.0:
                raise self.error(name, f"theta_neg = {theta_neg} must be below 1 (the positive threshold, in units of θ)")
            return DualThresholdIFNeuron(theta, v_init=v_init, theta_neg=theta_neg)
        if kind != "if":
            raise self.error(name, f"unknown eclsnn neuron kind {kind!r} in the metadata")
        return IFNeuron(theta, v_init=v_init)

    def theta_tensor(self, theta: np.ndarray, record: dict[str, Any], name: str) -> torch.Tensor:
        """θ as eclsnn holds it: one number for a layer-wise θ, ``[C]`` for a per-channel one (the metadata
        says which; without it, per-channel only where the channels differ)."""
        uniform = bool((theta == theta[0]).all())
        per_channel = record.get("per_channel")
        if per_channel is not None and per_channel not in (0, 1):  # (False and True are 0 and 1)
            raise self.error(name, f"the metadata's per_channel = {per_channel!r} is not 0 or 1")
        if (per_channel is None and uniform) or (per_channel is not None and not per_channel):
            if not uniform:
                raise self.error(name, "the metadata says one θ per layer but the graph has one per channel")
            return torch.tensor(float(theta[0]))
        return torch.from_numpy(theta)

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
            except (ValueError, TypeError, RecursionError):
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
    declared = _declared_bytes(graph)
    if declared > max_load_bytes():
        raise ConversionError(f"NIR import: the graph's arrays take {declared} bytes as float32, {load_limit_hint(declared)}")
    try:
        snn = _Importer(graph).run()
    except ConversionError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, RecursionError,
            ZeroDivisionError, OverflowError, SyntaxError) as exc:
        # A graph can hold anything; what the checks above did not foresee is still the file's fault.
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConversionError(f"NIR import: the graph cannot be read as an eclsnn network ({type(exc).__name__}: "
                              f"{first[:200]})") from None
    return _check_imported(snn)


def _declared_bytes(graph) -> int:
    """The bytes the graph's arrays (node fields and metadata, nested graphs included) take as float32 (at
    least), counted from their shapes before anything is copied (a broadcast view declares its full size)."""
    total, stack, seen = 0, [graph], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            total += int(obj.size) * max(4, obj.dtype.itemsize)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, f, None) for f in obj.__dataclass_fields__)
    return total


def _declared_file_bytes(path: Path) -> int:
    """The bytes the datasets of a NIR (HDF5) file declare, read from their shapes without reading them.

    Strings and other variable-length data (the graph's edges, node types, metadata) are stored as one
    descriptor per element, whose first 4 bytes are its length; libhdf5 allocates that length before it
    reads the data. Their data lives in the file, so a length beyond the file's size is refused here, read
    from the descriptors themselves (for the contiguous layout h5py writes; others are left to libhdf5)."""
    import h5py

    total, file_size = 0, path.stat().st_size

    with h5py.File(path, "r") as f, open(path, "rb") as raw:
        address_size = f.id.get_create_plist().get_sizes()[0]

        def visit(name, obj):
            nonlocal total
            if not isinstance(obj, h5py.Dataset):
                return
            total += int(obj.size or 0) * max(4, obj.dtype.itemsize)
            base = h5py.check_vlen_dtype(obj.dtype)
            offset = obj.id.get_offset() if base is not None else None
            if offset is None or not obj.size:
                return
            step = 4 + address_size + 4  # length, global heap address, index in the heap
            raw.seek(offset)
            descriptors = raw.read(step * obj.size)
            for at in range(0, len(descriptors) - 3, step):
                length = int.from_bytes(descriptors[at:at + 4], "little") * max(1, np.dtype(base).itemsize)
                if length > file_size:
                    raise ValueError(f"{name} declares a string or sequence of {length} bytes in a file of "
                                     f"{file_size} bytes")
                total += length

        f.visititems(visit)
    return total


def _check_imported(snn: SpikingNetwork) -> SpikingNetwork:
    """Refuse an imported network with non-finite weights, biases or buffers, or a neuron whose v_init is
    not finite (a file may hold anything; a NaN would only show as wrong spikes)."""
    for name, t in [*snn.named_parameters(), *snn.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConversionError(f"the NIR graph's {name.removeprefix('graph_module.')!r} holds NaN or infinite values; "
                                  "the network cannot be imported")
    for name, neuron in snn.neurons():
        if not math.isfinite(neuron.v_init):
            raise ConversionError(f"the NIR graph's neuron layer {name!r} has v_init = {neuron.v_init}; it must be finite")
    return snn



def read_nir(path: str | os.PathLike) -> SpikingNetwork:
    """``nir.read`` and :func:`from_nir`."""
    nir = _nir()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"NIR file {path} not found")
    try:
        declared = _declared_file_bytes(path)
        if declared <= max_load_bytes():
            graph = nir.read(path)
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError on foreign files
        raise ConversionError(f"{path} is not a readable NIR file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if declared > max_load_bytes():
        raise ConversionError(f"NIR file {path} declares {declared} bytes of arrays, {load_limit_hint(declared)}")
    return from_nir(graph)
