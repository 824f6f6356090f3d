"""The graph side of conversion: trace a model with ``torch.fx`` (each activation its own call site),
check every node against an allow-list of operations whose spiking meaning is known, and normalise
(one activation module per call site, dropout and identity removed, max pooling per policy)."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConversionError

__all__ = ["trace", "check_convertible", "normalise", "clamp_bounds"]

# ---- the allow-list: operations whose spiking meaning is known --------------------------------
# Linear (time-invariant) modules act on each step's input exactly as in the ANN.
_LINEAR_MODULES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Unflatten, nn.ZeroPad2d,
)
_ACTIVATION_MODULES = (nn.ReLU, ThresholdClip, nn.Hardtanh)  # Hardtanh (and ReLU6) with a lower bound of 0 only
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d}
_LINEAR_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, torch.add, torch.sub, operator.neg, torch.neg,
    torch.flatten, torch.reshape, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    operator.getitem, getattr,  # only on shapes: checked below
}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}  # by a constant only
_RELU_METHODS = {"relu", "relu_"}
# clamps: ReLU6, Hardtanh(0, c), clamp(x, 0, c) / clamp(min=0) become one activation module each
_CLAMP_FUNCTIONS = {F.relu6, F.hardtanh, torch.clamp, torch.clip}
_CLAMP_METHODS = {"clamp", "clip", "clamp_", "clip_"}
# activations that have no spiking form here, with the reason given to the user
_NO_SPIKING_FORM = "integrate-and-fire neurons express only ReLU-like activations (ReLU, ReLU6, Hardtanh(0, c), clamp(x, 0, c))"
_UNSUPPORTED_MODULES: dict[type, str] = {
    nn.SiLU: "SiLU is not monotone and not piecewise linear", nn.GELU: "GELU is not monotone and not piecewise linear",
    nn.Hardswish: "Hardswish is not monotone", nn.Mish: "Mish is not monotone",
    nn.Sigmoid: "a sigmoid (gate) is not piecewise linear", nn.Tanh: "tanh is not piecewise linear and takes negative values",
    nn.Softmax: "softmax normalises across units (not elementwise)", nn.LayerNorm: "LayerNorm divides by a statistic of the activations",
    nn.GroupNorm: "GroupNorm divides by a statistic of the activations",
    nn.MultiheadAttention: "attention multiplies activations with each other",
    nn.LeakyReLU: "LeakyReLU passes negative values", nn.PReLU: "PReLU passes negative values", nn.ELU: "ELU passes negative values",
}
_UNSUPPORTED_FUNCTIONS: dict = {
    F.silu: "SiLU is not monotone and not piecewise linear", F.gelu: "GELU is not monotone and not piecewise linear",
    F.hardswish: "Hardswish is not monotone", F.mish: "Mish is not monotone",
    torch.sigmoid: "a sigmoid (gate) is not piecewise linear", F.sigmoid: "a sigmoid (gate) is not piecewise linear",
    torch.tanh: "tanh is not piecewise linear and takes negative values", F.softmax: "softmax normalises across units",
    F.layer_norm: "layer_norm divides by a statistic of the activations", F.leaky_relu: "leaky_relu passes negative values",
    F.scaled_dot_product_attention: "attention multiplies activations with each other",
}


def clamp_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple[object, object] | None:
    """(lower, upper) of a clamping node (ReLU6, Hardtanh, F.relu6, F.hardtanh, clamp/clip as function or
    method; None for a missing bound), or None if ``node`` is not one."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return (mod.min_val, mod.max_val) if isinstance(mod, nn.Hardtanh) else None
    if node.op == "call_function" and node.target in _CLAMP_FUNCTIONS:
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            bound = dict(zip(("input", "min_val", "max_val"), node.args)) | dict(node.kwargs)
            return bound.get("min_val", -1.0), bound.get("max_val", 1.0)
    elif not (node.op == "call_method" and node.target in _CLAMP_METHODS):
        return None
    bound = dict(zip(("input", "min", "max"), node.args)) | dict(node.kwargs)
    return bound.get("min"), bound.get("max")


def _clamp_problem(bounds: tuple[object, object]) -> str | None:
    """Why a clamp with these bounds has no spiking form, or None (lower bound 0, upper bound a positive
    number or none)."""
    low, high = bounds
    if isinstance(low, (fx.Node, torch.Tensor)) or isinstance(high, (fx.Node, torch.Tensor)):
        return "a clamp with tensor bounds (only number bounds become neuron thresholds)"
    if low is None or float(low) != 0.0:
        return (f"a clamp with lower bound {low} (a neuron's output starts at 0: only clamps to [0, c] or [0, inf) "
                "become neurons)")
    if high is not None and not float(high) > 0:
        return f"a clamp with upper bound {high} (must be positive)"
    return None
_LINEAR_METHODS = {"view", "reshape", "flatten", "size", "contiguous", "add", "add_", "dim", "mean", "sum"}


class _Tracer(fx.Tracer):
    """Keeps ``ThresholdClip`` as a leaf and records, for every node, the module it was called in."""

    def __init__(self):
        super().__init__()
        self._scope: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ThresholdClip) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self._scope.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["eclsnn_scope"] = self._scope[-1] if self._scope else ""
        return node


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` (eval mode) with ``ThresholdClip`` kept as a leaf."""
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    root = copy.deepcopy(model).eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises TraceError, TypeError, ... from user code
        raise ConversionError(
            f"could not trace {type(model).__name__} with torch.fx: {exc}. The forward pass must not branch on "
            "tensor values or call untraceable code; move such logic out of forward()."
        ) from None
    return fx.GraphModule(root, graph, class_name=type(model).__name__)


# ---- checking -----------------------------------------------------------------------------------

def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    scope = node.meta.get("eclsnn_scope") or "<top level>"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    kind = "method ." if node.op == "call_method" else "function "
    return f"{node.name} ({kind}{target}) in {scope}"


def _is_shape_value(arg) -> bool:
    """True for nodes that produce shapes/ints rather than activations (``x.size()``, ``x.shape``)."""
    if not isinstance(arg, fx.Node):
        return True
    if arg.op == "call_method" and arg.target in ("size", "dim"):
        return True
    if arg.op == "call_function" and arg.target is getattr and arg.args[1] in ("shape", "ndim"):
        return True
    if arg.op == "call_function" and arg.target is operator.getitem:
        return _is_shape_value(arg.args[0])
    return False


def _reduce_dims_ok(node: fx.Node) -> bool:
    args = node.args[1:] if node.op == "call_method" else node.args[1:]
    dim = node.kwargs.get("dim", args[0] if args else None)
    if dim is None:
        return False
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return all(isinstance(d, int) and d != 0 for d in dims)


def _check_node(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Return why ``node`` is not convertible, or None."""
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "get_attr":
        return None  # constants (buffers) combine linearly; their users are checked
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Hardtanh):
            return _clamp_problem((mod.min_val, mod.max_val))
        for kind, why in _UNSUPPORTED_MODULES.items():
            if isinstance(mod, kind):
                return f"{why}; {_NO_SPIKING_FORM}"
        if isinstance(mod, _LINEAR_MODULES + _ACTIVATION_MODULES + _IDENTITY_MODULES):
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and not mod.track_running_stats:
                return "BatchNorm without running statistics (its eval output depends on the batch)"
            return None
        if isinstance(mod, _MAXPOOL_MODULES):
            return None  # each pool is decided by the max-pool policy (eclsnn.conversion.maxpool)
        return "module type without a known spiking meaning"
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FUNCTIONS or t in _DROPOUT_FUNCTIONS:
            return None
        if t in _CLAMP_FUNCTIONS:
            return _clamp_problem(clamp_bounds(node, gm))
        if t in _UNSUPPORTED_FUNCTIONS:
            return f"{_UNSUPPORTED_FUNCTIONS[t]}; {_NO_SPIKING_FORM}"
        if t in _MAXPOOL_FUNCTIONS:
            return None  # decided by the max-pool policy (eclsnn.conversion.maxpool)
        if t is getattr:
            return None if node.args[1] in ("shape", "ndim") else "attribute access on an activation"
        if t is operator.getitem:
            return None if _is_shape_value(node.args[0]) else "indexing an activation"
        if t is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return None if dim != 0 else "concatenation along the batch dimension"
        if t in _SCALE_FUNCTIONS:
            tensors = [a for a in node.args if isinstance(a, fx.Node) and not _is_shape_value(a)]
            if len(tensors) > 1 or (t in (operator.truediv, torch.div) and not _is_shape_value(node.args[1])):
                return "product of two activations (not linear in the spikes)"
            return None
        if t in (torch.mean, torch.sum):
            return None if _reduce_dims_ok(node) else "reduction over the batch dimension or all dimensions"
        if t in _LINEAR_FUNCTIONS:
            return None
        return "function without a known spiking meaning"
    if node.op == "call_method":
        if node.target in _RELU_METHODS:
            return None
        if node.target in _CLAMP_METHODS:
            return _clamp_problem(clamp_bounds(node, gm))
        if node.target in ("sigmoid", "tanh", "softmax"):
            return f"{node.target} has no spiking form; {_NO_SPIKING_FORM}"
        if node.target in ("mean", "sum"):
            return None if _reduce_dims_ok(node) else "reduction over the batch dimension or all dimensions"
        if node.target in _LINEAR_METHODS:
            return None
        return "tensor method without a known spiking meaning"
    return f"unexpected graph node kind {node.op!r}"


def check_convertible(gm: fx.GraphModule) -> None:
    """Raise :class:`ConversionError` naming every node outside the allow-list (max pools are allowed
    here; :mod:`eclsnn.conversion.maxpool` decides each one)."""
    problems = []
    for node in gm.graph.nodes:
        why = _check_node(node, gm)
        if why:
            problems.append(f"  - {_describe(node, gm)}: {why}")
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if outputs and not isinstance(outputs[0].args[0], fx.Node):
        problems.append("  - output: the network must return a single tensor (the readout)")
    if problems:
        advice = []
        advice.append("replace other operations by convertible ones (conv, linear, BatchNorm, ReLU/ThresholdClip, "
                      "ReLU6 and clamps to [0, c], average and max pooling, addition, concatenation, flatten/view, dropout)")
        raise ConversionError(
            "cannot convert this network to a spiking network; unsupported operations:\n"
            + "\n".join(problems) + "\nWhat to do: " + "; ".join(advice) + "."
        )


# ---- normalisation --------------------------------------------------------------------------------

def unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def replace_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def avgpool_like(pool_args: dict, dims: int) -> nn.Module:
    """The average pooling with the window of a max pool (``pool_args`` as
    :func:`eclsnn.conversion.maxpool.pool_arguments`)."""
    cls = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
    if pool_args.get("dilation", 1) not in (1, (1,), (1, 1)):
        raise ConversionError("max pooling with dilation cannot be replaced by average pooling")
    return cls(pool_args["kernel_size"], pool_args.get("stride") or pool_args["kernel_size"],
               pool_args.get("padding", 0), ceil_mode=pool_args.get("ceil_mode", False), count_include_pad=False)


def normalise(gm: fx.GraphModule) -> fx.GraphModule:
    """Give each activation call site its own module, drop dropout/identity (max pools are left to
    :mod:`eclsnn.conversion.maxpool`).

    After this pass every activation is a ``call_module`` of ``nn.ReLU``, ``nn.Hardtanh`` with lower bound 0
    (ReLU6 and clamps to [0, c]) or ``ThresholdClip`` used at exactly one node, so each becomes one neuron
    layer with its own state and threshold.
    """
    seen_targets: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS or (
            node.op == "call_method" and node.target in _RELU_METHODS
        ):
            replace_with_module(gm, node, nn.ReLU(), unique_name(gm, node.name))
        elif (node.op == "call_function" and node.target in _CLAMP_FUNCTIONS) or (
                node.op == "call_method" and node.target in _CLAMP_METHODS):
            low, high = clamp_bounds(node, gm)
            act = nn.ReLU() if high is None else nn.Hardtanh(0.0, float(high))
            replace_with_module(gm, node, act, unique_name(gm, node.name))
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            _bypass(gm, node)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _IDENTITY_MODULES):
                _bypass(gm, node)
            elif isinstance(mod, _ACTIVATION_MODULES):
                if node.target in seen_targets:  # shared activation module (e.g. torchvision's self.relu)
                    name = unique_name(gm, node.target.replace(".", "_"))
                    replace_with_module(gm, node, copy.deepcopy(mod), name)
                seen_targets.add(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
