"""Parameter export of a converted SNN for hardware: the layer graph plus, per layer, the folded
weights and biases and, per neuron layer, θ, v_init and θ_neg. Two containers with one content:

- ``.npz`` (numpy): arrays under ``"<layer>.weight"``, ``"<layer>.bias"``, ``"<layer>.theta"``, and the
  graph as JSON text under ``"graph"``;
- ``.json``: the same graph with the arrays inline as nested lists.

The format is specified in ``docs/EXPORT.md``. Nothing here is pickled: ``np.load(path)`` works with
the default ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from eclsnn.errors import ConversionError
from eclsnn.core.neurons import BurstNeuron, DualThresholdIFNeuron, IFNeuron
from eclsnn.core.pooling import SpikingMaxPool
from eclsnn.simulation.network import SpikingNetwork

__all__ = ["FORMAT", "describe", "export_npz", "export_json"]

FORMAT = {"name": "eclsnn-snn-params", "version": 1}

_FUNCTION_NAMES = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "scale", operator.truediv: "scale", torch.mul: "scale", torch.div: "scale",
    torch.flatten: "flatten", torch.cat: "concat", torch.reshape: "reshape",
}


def _module_entry(mod: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(attributes, arrays) of one layer."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        attrs = {"op": f"conv{mod.weight.dim() - 2}d", "in_channels": mod.in_channels, "out_channels": mod.out_channels,
                 "kernel_size": list(mod.kernel_size), "stride": list(mod.stride), "padding": list(mod.padding)
                 if not isinstance(mod.padding, str) else mod.padding, "dilation": list(mod.dilation), "groups": mod.groups}
        arrays = {"weight": mod.weight}
        if mod.bias is not None:
            arrays["bias"] = mod.bias
        return attrs, arrays
    if isinstance(mod, nn.Linear):
        arrays = {"weight": mod.weight, **({"bias": mod.bias} if mod.bias is not None else {})}
        return {"op": "linear", "in_features": mod.in_features, "out_features": mod.out_features}, arrays
    if isinstance(mod, BurstNeuron):
        raise ConversionError("export does not describe burst neurons (graded spikes) yet: the numpy re-run and the "
                              "formats know one spike a step; convert with neuron='dual' to export")
    if isinstance(mod, (IFNeuron, DualThresholdIFNeuron)):
        attrs = {"op": "neuron", "neuron": "dual" if isinstance(mod, DualThresholdIFNeuron) else "if",
                 "reset": "subtract", "v_init": mod.v_init, "per_channel": mod.theta.dim() == 1}
        if isinstance(mod, DualThresholdIFNeuron):
            attrs["theta_neg"] = mod.theta_neg
        return attrs, {"theta": mod.theta}
    if isinstance(mod, SpikingMaxPool):
        return {"op": "spiking_maxpool", "dims": mod.dims, "kernel_size": list(mod.kernel_size), "stride": list(mod.stride),
                "padding": list(mod.padding), "ceil_mode": mod.ceil_mode, "per_channel": mod.theta.dim() == 1}, {"theta": mod.theta}
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
        if _aslist(mod.dilation) not in (1, [1], [1, 1]) or mod.return_indices:
            raise ConversionError(f"export does not describe max pooling with dilation or indices ({mod})")
        return {"op": "maxpool", "dims": 1 if isinstance(mod, nn.MaxPool1d) else 2, "kernel_size": _aslist(mod.kernel_size),
                "stride": _aslist(mod.stride), "padding": _aslist(mod.padding), "ceil_mode": mod.ceil_mode}, {}
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
        return {"op": "avgpool", "kernel_size": _aslist(mod.kernel_size), "stride": _aslist(mod.stride),
                "padding": _aslist(mod.padding), "ceil_mode": mod.ceil_mode, "count_include_pad": mod.count_include_pad}, {}
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return {"op": "adaptive_avgpool", "output_size": _aslist(mod.output_size)}, {}
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = (mod.weight if mod.weight is not None else 1.0) / torch.sqrt(mod.running_var + mod.eps)
        shift = (mod.bias if mod.bias is not None else 0.0) - mod.running_mean * scale
        return {"op": "affine", "note": "unfolded BatchNorm: y = scale * x + shift per channel"}, {"scale": scale, "shift": shift}
    if isinstance(mod, nn.Flatten):
        return {"op": "flatten", "start_dim": mod.start_dim, "end_dim": mod.end_dim}, {}
    raise ConversionError(f"export does not know how to describe {type(mod).__name__}")


def _aslist(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def describe(snn: SpikingNetwork) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The layer graph (JSON-able) and the arrays (float32 numpy) of a converted SNN."""
    if not isinstance(snn, SpikingNetwork):
        raise ConversionError(f"expected a SpikingNetwork (from eclsnn.convert), got {type(snn).__name__}")
    gm = snn.graph_module
    layers: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    names: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        inputs = [names[n] for n in node.all_input_nodes if n in names]
        if node.op == "placeholder":
            entry = {"op": "input"}
        elif node.op == "output":
            entry = {"op": "output"}
        elif node.op == "call_module":
            entry, tensors = _module_entry(gm.get_submodule(node.target))
            for key, t in tensors.items():
                arrays[f"{node.target}.{key}"] = t.detach().cpu().float().contiguous().numpy()
            entry["arrays"] = sorted(f"{node.target}.{k}" for k in tensors)
        elif node.op == "call_function":
            op = _FUNCTION_NAMES.get(node.target, getattr(node.target, "__name__", str(node.target)))
            entry = {"op": op, "args": [a if not isinstance(a, fx.Node) else {"ref": names.get(a, a.name)} for a in node.args]}
        elif node.op == "call_method":
            entry = {"op": str(node.target), "args": [a if not isinstance(a, fx.Node) else {"ref": names.get(a, a.name)} for a in node.args]}
        else:
            entry = {"op": node.op}
        name = node.target if node.op == "call_module" else node.name
        names[node] = name
        layers.append({"name": name, **entry, "inputs": inputs})
    graph = {"format": FORMAT, "settings": snn.settings, "input": "direct (analog) current every step",
             "readout": "the output node's value averaged over steps", "layers": layers}
    return json.loads(json.dumps(graph, default=_json_default)), arrays


def _json_default(obj):
    if isinstance(obj, (torch.Size, tuple)):
        return list(obj)
    if torch.is_tensor(obj):
        return obj.tolist()
    return str(obj)


def export_npz(snn: SpikingNetwork, path: str | os.PathLike) -> Path:
    graph, arrays = describe(snn)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, graph=np.array(json.dumps(graph)), **arrays)
    os.replace(tmp, path)
    return path


def export_json(snn: SpikingNetwork, path: str | os.PathLike) -> Path:
    graph, arrays = describe(snn)
    graph["arrays"] = {k: {"shape": list(v.shape), "data": v.tolist()} for k, v in arrays.items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(graph))
    os.replace(tmp, path)
    return path
