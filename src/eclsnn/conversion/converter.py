"""The converter: ANN (``torch.fx`` graph) → spiking network.

Kept apart from the algorithm (which neuron, which threshold), in the way of SpikingJelly's newer
``ann2snn``: trace → check every node against an allow-list → normalise (one activation module per
call site, dropout and identity removed, max pooling per policy) → fold BatchNorm → thresholds →
swap activations for neurons. The input model is never modified.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.conversion.calibration import ActivationStatistics
from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConversionError
from eclsnn.core.functional import LAMBDA_MIN
from eclsnn.core.neurons import DualThresholdIFNeuron, IFNeuron
from eclsnn.simulation.network import SpikingNetwork
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["convert", "prepare", "trace", "fold_batchnorm", "NEURONS"]

NEURONS = {"dual": DualThresholdIFNeuron, "if": IFNeuron}
MAXPOOL_POLICIES = ("error", "avg")

# ---- the allow-list: operations whose spiking meaning is known --------------------------------
# Linear (time-invariant) modules act on each step's input exactly as in the ANN.
_LINEAR_MODULES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Unflatten, nn.ZeroPad2d,
)
_ACTIVATION_MODULES = (nn.ReLU, ThresholdClip)
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


def _check_node(node: fx.Node, gm: fx.GraphModule, maxpool: str) -> str | None:
    """Return why ``node`` is not convertible, or None."""
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "get_attr":
        return None  # constants (buffers) combine linearly; their users are checked
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _LINEAR_MODULES + _ACTIVATION_MODULES + _IDENTITY_MODULES):
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and not mod.track_running_stats:
                return "BatchNorm without running statistics (its eval output depends on the batch)"
            return None
        if isinstance(mod, _MAXPOOL_MODULES):
            return None if maxpool == "avg" else "max pooling has no exact spiking form"
        return "module type without a known spiking meaning"
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FUNCTIONS or t in _DROPOUT_FUNCTIONS:
            return None
        if t in _MAXPOOL_FUNCTIONS:
            return None if maxpool == "avg" else "max pooling has no exact spiking form"
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
        if node.target in ("mean", "sum"):
            return None if _reduce_dims_ok(node) else "reduction over the batch dimension or all dimensions"
        if node.target in _LINEAR_METHODS:
            return None
        return "tensor method without a known spiking meaning"
    return f"unexpected graph node kind {node.op!r}"


def check_convertible(gm: fx.GraphModule, maxpool: str = "error") -> None:
    """Raise :class:`ConversionError` naming every node outside the allow-list."""
    problems = []
    for node in gm.graph.nodes:
        why = _check_node(node, gm, maxpool)
        if why:
            problems.append(f"  - {_describe(node, gm)}: {why}")
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if outputs and not isinstance(outputs[0].args[0], fx.Node):
        problems.append("  - output: the network must return a single tensor (the readout)")
    if problems:
        advice = []
        if any("max pooling" in p for p in problems):
            advice.append("for max pooling pass maxpool='avg' (replaces it by average pooling; retrain or fine-tune for "
                          "best accuracy) or build the model with average pooling")
        advice.append("replace other operations by convertible ones (conv, linear, BatchNorm, ReLU/ThresholdClip, "
                      "average pooling, addition, concatenation, flatten/view, dropout)")
        raise ConversionError(
            "cannot convert this network to a spiking network; unsupported operations:\n"
            + "\n".join(problems) + "\nWhat to do: " + "; ".join(advice) + "."
        )


# ---- normalisation --------------------------------------------------------------------------------

def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _replace_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _avgpool_like(pool_args: dict, dims: int) -> nn.Module:
    cls = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
    if pool_args.get("dilation", 1) not in (1, (1,), (1, 1)):
        raise ConversionError("max pooling with dilation cannot be replaced by average pooling")
    return cls(pool_args["kernel_size"], pool_args.get("stride") or pool_args["kernel_size"],
               pool_args.get("padding", 0), ceil_mode=pool_args.get("ceil_mode", False), count_include_pad=False)


def normalise(gm: fx.GraphModule, maxpool: str = "error") -> fx.GraphModule:
    """Give each activation call site its own module, drop dropout/identity, apply the max-pool policy.

    After this pass every activation is a ``call_module`` of ``nn.ReLU`` or ``ThresholdClip`` used at
    exactly one node, so each becomes one neuron layer with its own state and threshold.
    """
    seen_targets: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS or (
            node.op == "call_method" and node.target in _RELU_METHODS
        ):
            _replace_with_module(gm, node, nn.ReLU(), _unique_name(gm, node.name))
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            _bypass(gm, node)
        elif node.op == "call_function" and node.target in _MAXPOOL_FUNCTIONS and maxpool == "avg":
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
            pool_args = dict(zip(names, node.args[1:]), **node.kwargs)
            dims = 1 if node.target is F.max_pool1d else 2
            _replace_with_module(gm, node, _avgpool_like(pool_args, dims), _unique_name(gm, node.name))
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _IDENTITY_MODULES):
                _bypass(gm, node)
            elif isinstance(mod, _MAXPOOL_MODULES) and maxpool == "avg":
                pool_args = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                                 dilation=mod.dilation, ceil_mode=mod.ceil_mode)
                avg = _avgpool_like(pool_args, 1 if isinstance(mod, nn.MaxPool1d) else 2)
                gm.add_submodule(node.target, avg)
            elif isinstance(mod, _ACTIVATION_MODULES):
                if node.target in seen_targets:  # shared activation module (e.g. torchvision's self.relu)
                    name = _unique_name(gm, node.target.replace(".", "_"))
                    _replace_with_module(gm, node, copy.deepcopy(mod), name)
                seen_targets.add(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


# ---- BatchNorm folding -----------------------------------------------------------------------------

def _fold_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a copy of ``layer`` (conv or linear) with ``bn`` (eval mode, running stats) folded in:
    ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with ``σ = sqrt(var + eps)``."""
    out_features = layer.weight.shape[0]
    if bn.num_features != out_features:
        raise ConversionError(f"BatchNorm with {bn.num_features} features follows a layer with {out_features} outputs")
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(scale)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        scale = gamma * scale
        w = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        b = (b - bn.running_mean.double()) * scale + beta
        folded.weight = nn.Parameter(w.to(layer.weight.dtype))
        folded.bias = nn.Parameter(b.to(layer.weight.dtype))
    return folded


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold each BatchNorm into the conv/linear directly before it, in place on ``gm``.

    Only when that layer's output has no other user and the layer module is called at one place only
    (otherwise folding would change the other use). A BatchNorm left over stays as a per-step affine
    layer (eval mode: running statistics).
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) or len(prev.users) != 1 or calls[prev.target] != 1:
            continue
        bn = gm.get_submodule(node.target)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        gm.add_submodule(prev.target, _fold_into(layer, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# ---- conversion -------------------------------------------------------------------------------------

def _activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _ACTIVATION_MODULES)]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConversionError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _positive_threshold(theta: torch.Tensor) -> torch.Tensor:
    # A layer that never fired on the calibration data gets the smallest threshold: it then passes at
    # most LAMBDA_MIN per step, as close to its ANN output 0 as a spiking layer can be.
    return theta.float().clamp(min=LAMBDA_MIN)


def convert(
    model: nn.Module,
    neuron: str = "dual",
    v_init: float = 0.5,
    theta_neg: float = 0.0,
    maxpool: str = "error",
    calibration=None,
    threshold_rule: str = "max",
    percentile: float = 99.9,
    threshold_granularity: str = "layer",
    step_mode: str = "multi",
    thresholds: dict[str, torch.Tensor] | None = None,
) -> SpikingNetwork:
    """Convert a trained ANN into a spiking network of integrate-and-fire neurons.

    Args:
        model: the trained ANN; not modified. Activations are ``ThresholdClip`` (θ = λ) or ReLU
            (module, ``F.relu``, ``torch.relu``, ``.relu()``; θ from ``calibration``).
        neuron: ``"dual"`` (dual-threshold, signed spikes) or ``"if"``.
        v_init: initial membrane potential in units of θ (0.5 = θ/2, the paper's choice).
        theta_neg: negative threshold of the dual-threshold neuron, in units of θ.
        maxpool: ``"error"`` (default) or ``"avg"`` (replace max pooling by average pooling).
        calibration: input data for ReLU thresholds: a tensor ``[N, ...]`` or an iterable of batches.
        threshold_rule: ``"max"`` or ``"percentile"`` of the ReLU outputs on the calibration data.
        percentile: the percentile for ``threshold_rule="percentile"``.
        threshold_granularity: ``"layer"`` (one θ per ReLU layer) or ``"channel"``.
        step_mode: initial step mode of the returned network's neurons.
        thresholds: θ of ReLU layers given directly, by the neuron's qualified name (as in
            ``SpikingNetwork.thresholds()`` of an earlier conversion); used instead of calibration,
            so a data-calibrated SNN can be rebuilt exactly without the data.

    Returns:
        a :class:`~eclsnn.SpikingNetwork`; run it with :func:`eclsnn.simulate`.
    """
    _check_choice("neuron", neuron, NEURONS)
    _check_choice("maxpool", maxpool, MAXPOOL_POLICIES)
    _check_choice("threshold_rule", threshold_rule, ("max", "percentile"))
    _check_choice("threshold_granularity", threshold_granularity, ("layer", "channel"))
    _check_choice("step_mode", step_mode, ("multi", "single"))
    for name, value in (("v_init", v_init), ("theta_neg", theta_neg)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConversionError(f"{name} must be a finite number (in units of theta), got {value!r}")
    if theta_neg >= 1:
        raise ConversionError(f"theta_neg must be below 1 (the positive threshold, in units of theta), got {theta_neg}")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConversionError(f"parameter {name!r} contains NaN or infinite values; the model cannot be converted")

    gm = trace(model)
    check_convertible(gm, maxpool)
    normalise(gm, maxpool)
    fold_batchnorm(gm)

    acts = _activation_nodes(gm)
    if not acts:
        raise ConversionError("the network has no activation (ReLU or ThresholdClip) to turn into spiking neurons")
    relus = {n.target: gm.get_submodule(n.target) for n in acts if isinstance(gm.get_submodule(n.target), nn.ReLU)}
    thetas: dict[str, torch.Tensor] = {}
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(relus))
        missing = sorted(set(relus) - set(thresholds))
        if unknown or missing:
            raise ConversionError(f"thresholds do not match the network's ReLU layers (unknown: {unknown}, missing: {missing})")
        thetas.update({k: torch.as_tensor(v) for k, v in thresholds.items()})
    elif relus:
        if calibration is None:
            raise ConversionError(
                f"{len(relus)} ReLU activation(s) ({', '.join(list(relus)[:4])}{', ...' if len(relus) > 4 else ''}) need "
                "thresholds: pass calibration=<a batch or loader of training inputs> (thresholds from the "
                f"{threshold_rule} of the activations), or train with eclsnn.ThresholdClip (eclsnn.prepare)."
            )
        device = next((p.device for p in gm.parameters()), None)
        stats = ActivationStatistics(relus, threshold_rule, percentile, threshold_granularity)
        thetas.update(stats.run(gm, calibration, device))
    for node in acts:
        mod = gm.get_submodule(node.target)
        theta = mod.threshold if isinstance(mod, ThresholdClip) else thetas[node.target]
        if not torch.isfinite(theta).all():
            raise ConversionError(f"threshold of {node.target} is not finite ({theta}); check the model and calibration data")
        theta = _positive_threshold(theta)
        cls = NEURONS[neuron]
        kwargs = {"theta_neg": theta_neg} if neuron == "dual" else {}
        gm.add_submodule(node.target, cls(theta.detach().cpu(), v_init=v_init, step_mode=step_mode, **kwargs).to(theta.device))
    gm.recompile()
    settings = dict(neuron=neuron, v_init=v_init, theta_neg=theta_neg, maxpool=maxpool, threshold_rule=threshold_rule,
                    percentile=percentile, threshold_granularity=threshold_granularity)
    return SpikingNetwork(gm, settings)


def prepare(
    model: nn.Module,
    levels: int | None = 4,
    calibration=None,
    percentile: float = 99.9,
    per_channel: bool = False,
    init_threshold: float = DEFAULT_INIT_THRESHOLD,
) -> fx.GraphModule:
    """A copy of a ReLU network with each ReLU replaced by a :class:`ThresholdClip` — the way to
    fine-tune a pretrained network instead of training from scratch.

    λ starts at the ``percentile`` of each ReLU's output on ``calibration`` data (a tensor or an
    iterable of batches), or at ``init_threshold`` without data. ReLU modules keep their qualified
    names, so a model from :func:`eclsnn.models.create` with ``activation="relu"`` prepares into one
    whose ``state_dict`` loads strictly into the same model built with ``activation="clip"``.
    The returned module is in training mode if ``model`` was.
    """
    gm = trace(model)
    normalise(gm, maxpool="error")
    relus = {n.target: gm.get_submodule(n.target) for n in _activation_nodes(gm) if isinstance(gm.get_submodule(n.target), nn.ReLU)}
    if not relus:
        raise ConversionError("prepare() found no ReLU to replace (module nn.ReLU, F.relu, torch.relu or .relu())")
    init: dict[str, torch.Tensor] = {}
    device = next((p.device for p in gm.parameters()), None)
    if calibration is not None:
        init = ActivationStatistics(relus, "percentile", percentile, "channel" if per_channel else "layer").run(gm, calibration, device)
    for name in relus:
        clip = ThresholdClip(levels=levels, init_threshold=init_threshold, per_channel=per_channel,
                             num_channels=init[name].numel() if per_channel and name in init else None)
        if name in init:
            with torch.no_grad():
                clip.threshold_raw.copy_(_positive_threshold(init[name]).reshape(clip.threshold_raw.shape))
        gm.add_submodule(name, clip.to(device) if device is not None else clip)
    gm.recompile()
    return gm.train(model.training)

