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
    nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.Upsample,
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
    F.interpolate, operator.getitem, getattr,  # getitem and getattr only on shapes: checked below
}
# arithmetic and comparisons on shapes (x.size(1) // 2, x.ndim == 4), and the assertions that use them
_SHAPE_FUNCTIONS = {operator.floordiv, operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                    operator.ge, operator.and_, operator.or_, operator.not_, max, min}
# a permutation or a split of the non-batch dimensions moves activations without changing them (ShuffleNet's
# channel shuffle); the dimensions are checked below
_MOVE_FUNCTIONS = {torch.transpose: "transpose", torch.permute: "permute", torch.chunk: "chunk", torch.split: "split"}
_MOVE_METHODS = {"transpose", "permute", "chunk", "split"}
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
    nn.Hardsigmoid: "a hard sigmoid (gate) is 1/2 at 0 (a neuron's output starts at 0)",
    nn.Sigmoid: "a sigmoid (gate) is not piecewise linear", nn.Tanh: "tanh is not piecewise linear and takes negative values",
    nn.Softmax: "softmax normalises across units (not elementwise)", nn.LayerNorm: "LayerNorm divides by a statistic of the activations",
    nn.GroupNorm: "GroupNorm divides by a statistic of the activations",
    nn.MultiheadAttention: "attention multiplies activations with each other",
    nn.LeakyReLU: "LeakyReLU passes negative values", nn.PReLU: "PReLU passes negative values", nn.ELU: "ELU passes negative values",
}
_UNSUPPORTED_FUNCTIONS: dict = {
    F.silu: "SiLU is not monotone and not piecewise linear", F.gelu: "GELU is not monotone and not piecewise linear",
    F.hardswish: "Hardswish is not monotone", F.mish: "Mish is not monotone",
    F.hardsigmoid: "a hard sigmoid (gate) is 1/2 at 0 (a neuron's output starts at 0)",
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


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict:
    """The arguments of ``node`` by name (``names`` in the order of the signature, the tensor first: a
    method's ``self`` is its first argument too)."""
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _move_problem(node: fx.Node, what: str) -> str | None:
    """Why a transpose/permute/chunk/split ``node`` is not a move of non-batch dimensions, or None."""
    if what == "transpose":
        b = _bound(node, ("input", "dim0", "dim1"))
        dims = (b.get("dim0"), b.get("dim1"))
    elif what == "permute":
        rest = node.args[1:]
        dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
        dims = tuple(node.kwargs.get("dims", dims))
        return None if dims and dims[0] == 0 and all(isinstance(d, int) for d in dims) else \
            "a permutation that moves the batch dimension"
    else:
        b = _bound(node, ("input", "chunks" if what == "chunk" else "split_size_or_sections", "dim"))
        dims = (b.get("dim", 0),)
    if all(isinstance(d, int) and d != 0 for d in dims):
        return None
    return f"{what} involving the batch dimension"


def _batch_norm_problem(node: fx.Node) -> str | None:
    b = _bound(node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"))
    if b.get("training", False) is not False or not isinstance(b.get("running_mean"), fx.Node):
        return "batch_norm in training mode or without running statistics (its output depends on the batch)"
    return None


class _Tracer(fx.Tracer):
    """Keeps ``ThresholdClip`` as a leaf and records, for every node, the module it was called in.

    With ``example`` (a batch of inputs) it also computes every node's value on that batch as it records
    the node, so Python in ``forward()`` that branches on *shapes* (``if x.shape[-1] < 7:``, ``for s in
    x.shape``) takes the branch the example takes. A branch on tensor *values* is still refused: the
    spiking network could not follow it.
    """

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        self._scope: list[str] = []
        self._norms: list[tuple[type, object] | None] = []  # per scope: (BatchNorm class, momentum) or None
        self._example = example
        self._values: dict[fx.Node, object] = {}
        self._evaluating = False  # while True, modules run as they are (fx's patched calls step aside)
        self.failed_in: str | None = None  # the innermost module whose forward() could not be traced

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ThresholdClip) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        self._scope.append(self.path_of_module(m))
        self._norms.append(_batchnorm_kind(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._scope[-1]
            raise
        finally:
            self._scope.pop()
            self._norms.pop()

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["eclsnn_scope"] = self._scope[-1] if self._scope else ""
        if self._norms and self._norms[-1] is not None:  # inside a BatchNorm subclass's own forward()
            node.meta["eclsnn_batchnorm"] = self._norms[-1]
        if self._example is not None:
            self._values[node] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node):
        """``node``'s value on the example batch (its inputs were evaluated when they were recorded)."""
        if node.op == "placeholder":
            return self._example if not self._values else None  # the first input is the example
        if node.op == "output":
            return None
        load = lambda n: self._values.get(n)  # noqa: E731
        args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
        self._evaluating = True
        try:
            return self._run(node, args, kwargs)
        finally:
            self._evaluating = False

    def _run(self, node: fx.Node, args, kwargs):
        with torch.no_grad():
            if node.op == "get_attr":
                obj = self.root
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)

    def _concrete(self, proxy: fx.Proxy, what: str):
        node = proxy.node
        if self._example is None:
            raise fx.proxy.TraceError(f"symbolically traced variables cannot be used as inputs to {what}")
        if not _depends_on_shapes_only(node):
            raise fx.proxy.TraceError(f"{what} on tensor values ({_node_text(node)}): the spiking network cannot follow "
                                      "a branch on activations")
        return self._values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._concrete(obj, "control flow"))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self._concrete(obj, "iteration")))])


def _batchnorm_kind(m: nn.Module) -> tuple[type, object] | None:
    """(torch BatchNorm class, momentum) for a BatchNorm1d/2d subclass with a forward of its own (timm's
    BatchNormAct2d calls F.batch_norm, then its activation), else None."""
    for cls in (nn.BatchNorm2d, nn.BatchNorm1d):
        if isinstance(m, cls) and type(m).forward is not cls.forward:
            return cls, m.momentum
    return None


def _node_text(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"{node.name} = {target}(...)"


def _reads_shape(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape`` or ``x.ndim``: a node that reads a tensor's shape."""
    return ((node.op == "call_method" and node.target in ("size", "dim"))
            or (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")))


def _depends_on_shapes_only(node) -> bool:
    """Whether ``node``'s value is computed from shapes (``x.shape``, ``x.size()``, ``x.dim()``) and constants
    only, never from tensor values."""
    if not isinstance(node, fx.Node):
        return True
    if _reads_shape(node):
        return True
    if node.op in ("placeholder", "get_attr", "call_module"):
        return False
    return all(_depends_on_shapes_only(n) for n in node.all_input_nodes)


def _example_batch(example_input):
    """A tensor from ``example_input``: a tensor, or an ``(x, y)`` pair; None if none is given."""
    if example_input is None:
        return None
    x = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    if not torch.is_tensor(x):
        raise ConversionError(f"example_input must be a tensor (a batch of inputs) or an (x, y) pair, got {type(x).__name__}")
    return x


def trace(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` (eval mode) with ``ThresholdClip`` kept as a leaf.

    ``example_input`` (a batch of inputs) lets the trace resolve Python that branches on shapes (e.g. timm's
    VGG classifier block pools only inputs smaller than its kernel): each such branch takes the way the
    example takes, so convert and simulate inputs of the example's size. Branches on tensor values are refused.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    root = copy.deepcopy(model).eval()
    example = _example_batch(example_input)
    if example is not None:  # only the shapes matter: two samples are as good as a batch
        device = next((p.device for p in root.parameters()), example.device)
        example = example[:2].to(device)
    tracer = _Tracer(example)
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises TraceError, TypeError, ... from user code
        where = tracer.failed_in or ""
        module = f" in submodule {where!r} ({type(root.get_submodule(where)).__name__})" if where else ""
        advice = ("the forward pass must not branch on tensor values or call untraceable code: move such logic out "
                  "of forward() or replace that submodule" if example is not None else
                  "if the forward pass branches on tensor shapes, pass example_input=<a batch of inputs> (convert and "
                  "prepare take it, and use a calibration tensor for it); otherwise move logic that branches on tensor "
                  "values or calls untraceable code out of forward()")
        raise ConversionError(
            f"could not trace {type(model).__name__} with torch.fx{module}: {exc}. What to do: {advice} "
            "(docs/MODELS.md, 'Tracing')."
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
    if _reads_shape(arg):
        return True
    if arg.op == "call_function" and arg.target is operator.getitem:
        return _is_shape_value(arg.args[0])
    if arg.op == "call_function" and arg.target in _SHAPE_FUNCTIONS | {operator.add, operator.sub, operator.mul}:
        return all(_is_shape_value(a) for a in arg.all_input_nodes)
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
            src = node.args[0]
            if _is_shape_value(src) or (_is_move(src, ("chunk", "split")) and isinstance(node.args[1], int)):
                return None  # a shape, or one part of a chunk/split
            return None if _selects_features(node.args[1]) else "indexing an activation along the batch dimension"
        if t is torch._assert or (t in _SHAPE_FUNCTIONS and all(_is_shape_value(a) for a in node.all_input_nodes)):
            return None  # a check or arithmetic on shapes (removed or evaluated as it is)
        if t is F.batch_norm:
            return _batch_norm_problem(node)
        if t in _MOVE_FUNCTIONS:
            return _move_problem(node, _MOVE_FUNCTIONS[t])
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
        if node.target in _MOVE_METHODS:
            return _move_problem(node, node.target)
        return "tensor method without a known spiking meaning"
    return f"unexpected graph node kind {node.op!r}"


def _selects_features(index) -> bool:
    """Whether ``x[index]`` keeps every sample and selects features by constant slices (``x[:, :64]``, as
    DPN's dual paths do): a selection, linear in the spikes."""
    parts = index if isinstance(index, tuple) else (index,)
    if not parts or parts[0] != slice(None):
        return False
    return all(p is Ellipsis or (isinstance(p, slice) and all(v is None or isinstance(v, int)
               for v in (p.start, p.stop, p.step))) or (isinstance(p, int) and not isinstance(p, bool)) for p in parts[1:])


def _is_move(node, kinds: tuple[str, ...]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in _MOVE_FUNCTIONS:
        return _MOVE_FUNCTIONS[node.target] in kinds
    return node.op == "call_method" and node.target in kinds


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
        elif node.op == "call_function" and node.target is F.batch_norm and "eclsnn_batchnorm" in node.meta:
            _batchnorm_module(gm, node)
        elif node.op == "call_function" and node.target is torch._assert:
            gm.graph.erase_node(node)  # a check on shapes, true for the traced model
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _IDENTITY_MODULES):
                _bypass(gm, node)
            elif isinstance(mod, _ACTIVATION_MODULES):
                if node.target in seen_targets:  # shared activation module (e.g. torchvision's self.relu)
                    name = unique_name(gm, node.target.replace(".", "_"))
                    replace_with_module(gm, node, copy.deepcopy(mod), name)
                seen_targets.add(node.target)
    _erase_unused_shape_nodes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _batchnorm_module(gm: fx.GraphModule, node: fx.Node) -> None:
    """Turn the ``F.batch_norm`` call of a BatchNorm subclass's forward (timm's BatchNormAct2d) into a torch
    BatchNorm module that holds the same tensors, named ``OWNER.bn``: it follows train/eval mode like any
    BatchNorm (the traced call has eval mode baked in) and folds like one. Left as it is unless its statistics
    and affine parameters are the model's own tensors."""
    cls, momentum = node.meta["eclsnn_batchnorm"]
    b = _bound(node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"))
    attrs = {k: b.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
    if b.get("training", False) is not False or attrs["running_mean"] is None or attrs["running_var"] is None or any(
            a is not None and not (isinstance(a, fx.Node) and a.op == "get_attr") for a in attrs.values()):
        return
    owner = attrs["running_mean"].target.rpartition(".")[0]
    values = {k: _attribute(gm, a.target) if a is not None else None for k, a in attrs.items()}
    bn = cls(values["running_mean"].numel(), eps=b.get("eps", 1e-5), momentum=momentum,
             affine=values["weight"] is not None)
    for k, v in values.items():
        if v is not None:
            setattr(bn, k, v)
    tracked = getattr(gm.get_submodule(owner) if owner else gm, "num_batches_tracked", None)
    if torch.is_tensor(tracked):
        bn.num_batches_tracked = tracked
    name = unique_name(gm, f"{owner}.bn" if owner else "bn")
    gm.add_submodule(name, bn.eval())  # traced in eval mode (prepare then sets the model's mode)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (b["input"],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for a in attrs.values():
        if a is not None and not a.users:
            gm.graph.erase_node(a)
            parent, _, attr = a.target.rpartition(".")
            module = gm.get_submodule(parent) if parent else gm
            if hasattr(module, attr):
                delattr(module, attr)
    tracked_owner = gm.get_submodule(owner) if owner else gm
    if owner and "num_batches_tracked" in tracked_owner._buffers:
        del tracked_owner._buffers["num_batches_tracked"]


def _attribute(gm: fx.GraphModule, target: str):
    parent, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(parent) if parent else gm, name)


def _erase_unused_shape_nodes(gm: fx.GraphModule) -> None:
    """Drop shape computations that nothing uses any more (those of the removed assertions)."""
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and node.op in ("call_function", "call_method") and _is_shape_value(node):
            gm.graph.erase_node(node)
