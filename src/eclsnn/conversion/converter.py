"""The converter: ANN (``torch.fx`` graph) → spiking network (the graph steps are in :mod:`eclsnn.conversion.graph`).

Kept apart from the algorithm (which neuron, which threshold), in the way of SpikingJelly's newer
``ann2snn``: trace → check every node against an allow-list → normalise (one activation module per
call site, dropout and identity removed, max pooling per policy) → fold BatchNorm → thresholds →
swap activations for neurons. The input model is never modified.
"""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.conversion.calibration import ActivationStatistics
from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConversionError
from eclsnn.core.functional import LAMBDA_MIN
from eclsnn.core.neurons import BurstNeuron, DualThresholdIFNeuron, IFNeuron
from eclsnn.simulation.network import SpikingNetwork
from eclsnn._util import DEFAULT_INIT_THRESHOLD
from eclsnn.conversion.graph import _ACTIVATION_MODULES, _attribute, check_convertible, normalise, replace_with_module, trace, unique_name
from eclsnn.conversion.maxpool import (
    MAXPOOL_POLICIES, PREPARE_MAXPOOL_POLICIES, apply_swaps, input_theta, plan_convert, plan_prepare, pool_arguments,
)
from eclsnn.core.pooling import SpikingMaxPool

__all__ = ["convert", "prepare", "trace", "fold_batchnorm", "NEURONS", "MAXPOOL_POLICIES", "PREPARE_MAXPOOL_POLICIES"]

NEURONS = {"dual": DualThresholdIFNeuron, "if": IFNeuron, "burst": BurstNeuron}

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


def _batchnorm_of(node: fx.Node, gm: fx.GraphModule):
    """The BatchNorm that ``node`` applies: a module, or for an eval-mode ``F.batch_norm`` call on the
    model's own tensors (as timm's BatchNormAct2d makes) a stand-in with the same fields; else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return mod if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) else None
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    b = dict(zip(names, node.args)) | dict(node.kwargs)
    tensors = {k: b.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
    if b.get("training", False) is not False or tensors["running_mean"] is None or tensors["running_var"] is None:
        return None
    if any(v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr") for v in tensors.values()):
        return None
    fields = {k: _attribute(gm, v.target) if v is not None else None for k, v in tensors.items()}
    return SimpleNamespace(**fields, eps=b.get("eps", 1e-5), num_features=fields["running_mean"].numel(),
                           track_running_stats=True)


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
        bn = _batchnorm_of(node, gm)
        if bn is None:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) or len(prev.users) != 1 or calls[prev.target] != 1:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        gm.add_submodule(prev.target, _fold_into(layer, bn))
        node.replace_all_uses_with(prev)
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        for attr in inputs:  # a functional batch_norm's statistics and affine parameters, now unused
            if attr.op == "get_attr" and not attr.users:
                gm.graph.erase_node(attr)
                owner, _, name = attr.target.rpartition(".")
                delattr(gm.get_submodule(owner), name)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# ---- conversion -------------------------------------------------------------------------------------

def _data_thresholded(mod: nn.Module) -> bool:
    """ReLU and clamps to [0, c]: activations whose θ comes from calibration data (a clamp's θ is at most c)."""
    return isinstance(mod, (nn.ReLU, nn.Hardtanh))


def _upper_bound(mod: nn.Module) -> float | None:
    return float(mod.max_val) if isinstance(mod, nn.Hardtanh) else None


def _check_values(model: nn.Module) -> None:
    """Refuse parameters and floating-point buffers with NaN or infinite values, and BatchNorm layers with a
    negative running variance: each would turn into wrong spikes without an error."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConversionError(f"parameter {name!r} contains NaN or infinite values; the model cannot be converted")
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise ConversionError(f"buffer {name!r} is not finite (NaN or infinite values); the model cannot be converted "
                                  "(for BatchNorm statistics: recompute them on training data)")
    for name, mod in model.named_modules():
        var = getattr(mod, "running_var", None) if isinstance(mod, nn.modules.batchnorm._BatchNorm) else None
        if var is not None and (var < 0).any():
            raise ConversionError(f"buffer '{name}.running_var' holds a negative variance ({float(var.min()):.4g}); "
                                  "the model cannot be converted (recompute the BatchNorm statistics on training data)")


def _warn_approximate(pools) -> None:
    approx = [d for d in pools if d.mode in ("avg", "swap") and not d.exact]
    if approx:
        names = ", ".join(f"{d.name} ({d.mode})" for d in approx)
        warnings.warn(f"max pooling converted approximately: {names}; {approx[0].why}. The SNN will not match the ANN "
                      "exactly there (docs/METHOD.md, 'Max pooling', gives the measured cost; fine-tune after 'avg').",
                      stacklevel=3)


def _spiking_pool(gm: fx.GraphModule, node: fx.Node, step_mode: str) -> None:
    """Replace the max pool ``node`` (its input now a neuron layer) by a spiking max pool of its spike counts."""
    args = pool_arguments(node, gm)
    pool = SpikingMaxPool(input_theta(node, gm).detach().cpu(), args["kernel_size"], args["stride"], args["padding"],
                          args["ceil_mode"], args["dims"], step_mode=step_mode)
    if node.op == "call_module":
        gm.add_submodule(node.target, pool)
    else:
        replace_with_module(gm, node, pool, unique_name(gm, node.name))


def _trace(model: nn.Module, example_input, calibration) -> fx.GraphModule:
    """Trace ``model``; where plain tracing fails and no ``example_input`` is given, trace again with the
    first calibration batch as the example (only from a tensor or a list of batches, never consuming an
    iterator that calibration will read)."""
    if example_input is not None:
        return trace(model, example_input)
    try:
        return trace(model)
    except ConversionError:
        first = calibration if torch.is_tensor(calibration) else (
            calibration[0] if isinstance(calibration, (list, tuple)) and calibration else None)
        if first is None:
            raise
        return trace(model, first)


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
    example_input: torch.Tensor | None = None,
) -> SpikingNetwork:
    """Convert a trained ANN into a spiking network of integrate-and-fire neurons.

    Args:
        model: the trained ANN; not modified. Activations are ``ThresholdClip`` (θ = λ) or ReLU
            (module, ``F.relu``, ``torch.relu``, ``.relu()``; θ from ``calibration``) or a clamp to [0, c]
            (ReLU6, Hardtanh(0, c), ``F.relu6``, ``F.hardtanh``, ``torch.clamp(x, 0, c)``, ``.clamp(min=0)``;
            θ from ``calibration``, at most c). Other activations (SiLU, GELU, sigmoid gates, LayerNorm,
            attention, ...) are refused with a ConversionError naming each node and why.
        neuron: ``"dual"`` (dual-threshold, signed spikes), ``"if"``, or ``"burst"`` (dual-threshold with
            graded spikes: several in one step, at most one per elapsed step in all; docs/METHOD.md,
            "Burst neuron"; ``theta_neg`` does not apply).
        v_init: initial membrane potential in units of θ (0.5 = θ/2, the paper's choice).
        theta_neg: negative threshold of the dual-threshold neuron, in units of θ.
        maxpool: what to do with max pooling (docs/METHOD.md, "Max pooling"): ``"error"`` (default) converts
            the pools that are exact in the SNN (their input is static, possibly after moving them in front
            of the activation before them) and refuses the others; ``"auto"``: those, else the spiking max
            pool; ``"swap"``: move each pool in front of its activation (biased on time-varying input);
            ``"cummax"``: the spiking max pool on spike counts; ``"avg"``: average pooling (warns; fine-tune
            after it). The returned network's ``settings["maxpool_modes"]`` names the mode of each pool.
        calibration: input data for ReLU thresholds: a tensor ``[N, ...]`` or an iterable of batches.
        threshold_rule: ``"max"`` or ``"percentile"`` of the ReLU outputs on the calibration data.
        percentile: the percentile for ``threshold_rule="percentile"``.
        threshold_granularity: ``"layer"`` (one θ per ReLU layer) or ``"channel"``.
        step_mode: initial step mode of the returned network's neurons.
        thresholds: θ of ReLU layers given directly, by the neuron's qualified name (as in
            ``SpikingNetwork.thresholds()`` of an earlier conversion); used instead of calibration,
            so a data-calibrated SNN can be rebuilt exactly without the data.
        example_input: a batch of inputs for tracing a model whose ``forward()`` branches on tensor shapes
            (docs/MODELS.md, "Tracing"); without it a calibration tensor (or list of batches) serves.

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
    _check_values(model)

    gm = _trace(model, example_input, calibration)
    check_convertible(gm)
    normalise(gm)
    fold_batchnorm(gm)
    pools = plan_convert(gm, maxpool)

    acts = _activation_nodes(gm)
    if not acts:
        raise ConversionError("the network has no activation (ReLU or ThresholdClip) to turn into spiking neurons")
    relus = {n.target: gm.get_submodule(n.target) for n in acts if _data_thresholded(gm.get_submodule(n.target))}
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
        thetas.update(stats.run(gm, calibration, device))  # before any swap: each ReLU's own outputs
    _warn_approximate(pools)
    apply_swaps(gm, pools)
    for node in acts:
        mod = gm.get_submodule(node.target)
        theta = mod.threshold if isinstance(mod, ThresholdClip) else thetas[node.target]
        if _upper_bound(mod) is not None:  # a clamp to [0, c]: the neuron may not pass more than c per step
            theta = torch.as_tensor(theta).clamp(max=_upper_bound(mod))
        if not torch.isfinite(theta).all():
            raise ConversionError(f"threshold of {node.target} is not finite ({theta}); check the model and calibration data")
        theta = _positive_threshold(theta)
        cls = NEURONS[neuron]
        kwargs = {"theta_neg": theta_neg} if neuron == "dual" else {}
        gm.add_submodule(node.target, cls(theta.detach().cpu(), v_init=v_init, step_mode=step_mode, **kwargs).to(theta.device))
    for d in pools:
        if d.mode == "cummax":
            _spiking_pool(gm, d.node, step_mode)
    gm.graph.lint()
    gm.recompile()
    settings = dict(neuron=neuron, v_init=v_init, theta_neg=theta_neg, maxpool=maxpool, threshold_rule=threshold_rule,
                    percentile=percentile, threshold_granularity=threshold_granularity)
    if pools:  # the mode of each max pool (the conversion report names them)
        settings["maxpool_modes"] = {d.name: d.mode for d in pools}
    return SpikingNetwork(gm, settings)


def prepare(
    model: nn.Module,
    levels: int | None = 4,
    calibration=None,
    percentile: float = 99.9,
    per_channel: bool = False,
    init_threshold: float = DEFAULT_INIT_THRESHOLD,
    maxpool: str = "swap",
    example_input: torch.Tensor | None = None,
) -> fx.GraphModule:
    """A copy of a ReLU network with each ReLU replaced by a :class:`ThresholdClip` — the way to
    fine-tune a pretrained network instead of training from scratch. Clamps to [0, c] (ReLU6,
    Hardtanh(0, c), ``F.relu6``, ``torch.clamp(x, 0, c)``) are replaced too, with λ at most c.

    λ starts at the ``percentile`` of each ReLU's output on ``calibration`` data (a tensor or an
    iterable of batches), or at ``init_threshold`` without data (for a clamp: at most c). ReLU modules keep their qualified
    names, so a model from :func:`eclsnn.models.create` with ``activation="relu"`` prepares into one
    whose ``state_dict`` loads strictly into the same model built with ``activation="clip"``.
    The returned module is in training mode if ``model`` was.

    ``maxpool``: ``"swap"`` (default) moves each max pool that directly follows an activation (its only
    user) in front of it — exact in the ANN (max∘h = h∘max for monotone h; λ is calibrated before the
    swap), and exact in the converted SNN where the pool's input is then static (the usual stem conv →
    BN → ReLU → max pool); the other pools stay. ``"keep"`` leaves every pool; ``"avg"`` replaces them by
    average pooling (as QCFS does; the fine-tuning absorbs the change); ``"error"`` refuses max pooling.

    ``example_input``: as for :func:`convert` (a batch for tracing shape-dependent Python in ``forward()``).
    """
    _check_choice("maxpool", maxpool, PREPARE_MAXPOOL_POLICIES)
    gm = _trace(model, example_input, calibration)
    normalise(gm)
    pools = plan_prepare(gm, maxpool)
    relus = {n.target: gm.get_submodule(n.target) for n in _activation_nodes(gm) if _data_thresholded(gm.get_submodule(n.target))}
    if not relus:
        raise ConversionError("prepare() found no ReLU to replace (module nn.ReLU, F.relu, torch.relu or .relu(); "
                              "ReLU6, Hardtanh(0, c) and clamp(x, 0, c) too)")
    init: dict[str, torch.Tensor] = {}
    device = next((p.device for p in gm.parameters()), None)
    if calibration is not None:
        init = ActivationStatistics(relus, "percentile", percentile, "channel" if per_channel else "layer").run(gm, calibration, device)
    for name, mod in relus.items():
        cap = _upper_bound(mod)
        start = init_threshold if cap is None else min(init_threshold, cap)
        clip = ThresholdClip(levels=levels, init_threshold=start, per_channel=per_channel,
                             num_channels=init[name].numel() if per_channel and name in init else None)
        if name in init:
            lam = init[name] if cap is None else init[name].clamp(max=cap)
            with torch.no_grad():
                clip.threshold_raw.copy_(_positive_threshold(lam).reshape(clip.threshold_raw.shape))
        gm.add_submodule(name, clip.to(device) if device is not None else clip)
    apply_swaps(gm, pools)  # after calibration: λ comes from each ReLU's own outputs
    gm.recompile()
    return gm.train(model.training)

