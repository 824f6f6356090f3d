"""Max pooling in conversion (docs/METHOD.md, "Max pooling"): which pools can be handled how, and the
graph rewrites that do it.

A max pool is handled in one of these ways (the *mode* of that pool, named in the conversion report):

- ``static``: its input depends only on the input image (the simulator's static prefix, computed once):
  the pool stays a max pool and is exact.
- ``swap``: it directly follows a monotone non-decreasing activation (ReLU, ReLU6/Hardtanh(0, c),
  ThresholdClip) that has no other user, and is moved in front of it: max∘h = h∘max. Exact in the ANN;
  exact in the SNN when the pool's new input is static, otherwise the neuron receives the per-step
  maximum of its currents (biased upward).
- ``cummax``: a :class:`~eclsnn.core.pooling.SpikingMaxPool` on the spike counts of a neuron layer (or a
  channel concatenation of neuron layers); a pool whose only user is such an activation is first moved
  behind it (the reverse swap, exact in the ANN).
- ``avg``: replaced by average pooling (an approximation that fine-tuning can absorb).

Policies (the ``maxpool`` argument): ``"error"`` (convert's default: exact modes only, anything else
refused), ``"swap"``, ``"cummax"``, ``"auto"`` (exact swap where possible, else cummax), ``"avg"``;
``prepare`` takes ``"swap"`` (its default: swap where exact in the ANN, keep the other pools), ``"keep"``,
``"avg"`` and ``"error"``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.conversion.graph import avgpool_like, replace_with_module, unique_name
from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConversionError

__all__ = ["MAXPOOL_POLICIES", "PREPARE_MAXPOOL_POLICIES", "PoolDecision", "maxpool_nodes", "pool_arguments",
           "plan_convert", "plan_prepare", "apply_swaps", "static_nodes", "MAXPOOL_COST"]

#: what ``convert`` does with max pooling
MAXPOOL_POLICIES = ("error", "swap", "cummax", "auto", "avg")
#: what ``prepare`` does with max pooling
PREPARE_MAXPOOL_POLICIES = ("swap", "keep", "avg", "error")

#: the measured cost of each mode, quoted by the error message (docs/METHOD.md, "Max pooling", has the
#: numbers and the command that printed them)
MAXPOOL_COST = ("see docs/METHOD.md, 'Max pooling', for the measured accuracy of each mode. "
                "'auto': exact swaps where the pool's input is static, else the spiking max pool (cummax; exact on the "
                "SNN's own spike counts, biased upward against the ANN); 'swap': neurons get the per-step maximum of their "
                "currents (biased upward on time-varying input); 'cummax': the spiking max pool everywhere; 'avg': average "
                "pooling (fine-tune after it)")

_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d)
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2}
_MONOTONE = (nn.ReLU, nn.Hardtanh, ThresholdClip)  # after normalise every activation is one of these


@dataclass
class PoolDecision:
    """How one max pool is handled: ``mode`` one of static/swap/cummax/avg/error, with ``exact`` saying
    whether the SNN reproduces the ANN's pool, and ``why`` for a refusal or an approximation."""

    node: fx.Node
    mode: str
    exact: bool
    why: str = ""
    reverse: bool = False  # cummax after moving the activation that follows the pool in front of it

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name


def is_maxpool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def maxpool_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_maxpool(n, gm)]


def pool_arguments(node: fx.Node, gm: fx.GraphModule) -> dict:
    """kernel_size, stride, padding, dilation, ceil_mode, return_indices and dims of a max pool node."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                    ceil_mode=m.ceil_mode, return_indices=m.return_indices, dims=1 if isinstance(m, nn.MaxPool1d) else 2)
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    return dict(kernel_size=bound["kernel_size"], stride=bound.get("stride") or bound["kernel_size"],
                padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                ceil_mode=bound.get("ceil_mode", False), return_indices=bound.get("return_indices", False),
                dims=_POOL_FUNCTIONS[node.target])


def _dilated(args: dict) -> bool:
    d = args["dilation"]
    return any(v != 1 for v in (d if isinstance(d, (tuple, list)) else (d,)))


def _is_activation(node, gm: fx.GraphModule) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target), _MONOTONE)


def static_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value depends only on the network's input (not on any activation, which becomes a
    neuron): the simulator computes them once, so any operation there is exact."""
    static: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            static.add(node)
        elif node.op != "output" and not _is_activation(node, gm) and all(i in static for i in node.all_input_nodes):
            static.add(node)
    return static


def _pool_input(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


def _spiking_source(node: fx.Node, gm: fx.GraphModule, spiking_pools: set[fx.Node] = frozenset()) -> bool:
    """Whether ``node`` is an activation (a neuron after conversion), a spiking max pool (one of
    ``spiking_pools``: its increments are spikes of its input's θ, so a second pool on them takes the maximum
    of the first one's counts, exactly), or a channel concatenation of such."""
    if _is_activation(node, gm) or node in spiking_pools:
        return True
    if node.op == "call_function" and node.target is torch.cat:
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return dim == 1 and all(_is_activation(p, gm) or p in spiking_pools for p in parts)
    return False


def _decide_convert(node: fx.Node, gm: fx.GraphModule, policy: str, static: set[fx.Node],
                    spiking_pools: set[fx.Node] = frozenset()) -> PoolDecision:
    args = pool_arguments(node, gm)
    src = _pool_input(node)
    if args["return_indices"]:
        return PoolDecision(node, "error", False, "max pooling that returns indices has no spiking form")
    if policy == "avg":
        if _dilated(args):
            return PoolDecision(node, "error", False, "max pooling with dilation cannot be replaced by average pooling")
        return PoolDecision(node, "avg", False, "replaced by average pooling (an approximation; fine-tune after it)")
    if src in static:
        return PoolDecision(node, "static", True)
    swappable = _is_activation(src, gm) and len(src.users) == 1
    if swappable and src.args[0] in static and policy in ("error", "swap", "auto"):
        return PoolDecision(node, "swap", True)
    if policy == "swap":
        if swappable:
            return PoolDecision(node, "swap", False, "time-varying input: the neuron gets the per-step maximum of its currents")
        users = list(node.users)
        if len(users) == 1 and _is_activation(users[0], gm):
            return PoolDecision(node, "swap", False, "already in front of its activation; the neuron gets the per-step "
                                                     "maximum of its currents")
        return PoolDecision(node, "error", False, "no monotone activation directly before or after it to swap with")
    if policy in ("cummax", "auto"):
        if _dilated(args):
            return PoolDecision(node, "error", False, "the spiking max pool does not take dilation")
        if _spiking_source(src, gm, spiking_pools):
            return PoolDecision(node, "cummax", False, "exact on the SNN's spike counts, not against the ANN")
        users = list(node.users)
        if len(users) == 1 and _is_activation(users[0], gm) and len(src.users) == 1:
            return PoolDecision(node, "cummax", False, "exact on the SNN's spike counts, not against the ANN", reverse=True)
        return PoolDecision(node, "error", False, "its input is not a neuron layer's output (or a channel concatenation "
                                                  "of them), and no activation follows it to move in front")
    return PoolDecision(node, "error", False, "max pooling on time-varying input has no exact spiking form")


def plan_convert(gm: fx.GraphModule, policy: str) -> list[PoolDecision]:
    """The decision for every max pool of a normalised graph under ``policy``; raises a ConversionError
    naming every pool that policy cannot handle."""
    static = static_nodes(gm)
    decisions, spiking_pools = [], set()
    for n in maxpool_nodes(gm):  # in graph order: a pool's input pool is decided first
        decisions.append(_decide_convert(n, gm, policy, static, spiking_pools))
        if decisions[-1].mode == "cummax":
            spiking_pools.add(n)
    refused = [d for d in decisions if d.mode == "error"]
    if refused:
        lines = "\n".join(f"  - {d.name}: {d.why}" for d in refused)
        raise ConversionError(f"cannot convert {len(refused)} max pool(s) with maxpool={policy!r}:\n{lines}\n"
                              f"What to do: choose maxpool='auto', 'swap', 'cummax' or 'avg'; {MAXPOOL_COST}.")
    return decisions


def plan_prepare(gm: fx.GraphModule, policy: str) -> list[PoolDecision]:
    """``prepare``'s decision for every max pool: swap where exact in the ANN (``"swap"``), keep, average,
    or refuse."""
    decisions = []
    for node in maxpool_nodes(gm):
        args = pool_arguments(node, gm)
        src = _pool_input(node)
        if policy == "error":
            decisions.append(PoolDecision(node, "error", False, "maxpool='error'"))
        elif policy == "avg":
            decisions.append(PoolDecision(node, "avg" if not _dilated(args) else "error", False,
                                          "max pooling with dilation cannot be replaced by average pooling"))
        elif policy == "swap" and _is_activation(src, gm) and len(src.users) == 1 and not args["return_indices"]:
            decisions.append(PoolDecision(node, "swap", True))
        else:
            decisions.append(PoolDecision(node, "keep", True))
    refused = [d for d in decisions if d.mode == "error"]
    if refused:
        lines = "\n".join(f"  - {d.name}: {d.why}" for d in refused)
        raise ConversionError(f"prepare() cannot handle {len(refused)} max pool(s):\n{lines}\n"
                              "What to do: pass maxpool='swap' (default), 'keep' or 'avg'.")
    return decisions


# ---- rewrites -----------------------------------------------------------------------------------------

def swap_in_front(gm: fx.GraphModule, pool: fx.Node) -> None:
    """``act(z) → pool`` becomes ``pool(z) → act`` (the activation's only user is the pool)."""
    act = _pool_input(pool)
    z = act.args[0]
    users = list(pool.users)
    pool.replace_input_with(act, z)
    for user in users:
        user.replace_input_with(pool, act)
    act.args = (pool,)
    pool.append(act)


def swap_behind(gm: fx.GraphModule, pool: fx.Node) -> None:
    """``pool(y) → act`` becomes ``act(y) → pool`` (the pool's only user is the activation)."""
    act = next(iter(pool.users))
    y = _pool_input(pool)
    users = list(act.users)
    for user in users:
        user.replace_input_with(act, pool)
    act.args = (y,)
    pool.replace_input_with(y, act)
    pool.prepend(act)


def apply_swaps(gm: fx.GraphModule, decisions: list[PoolDecision]) -> None:
    """Do the swaps of ``decisions`` (``swap`` of a pool after its activation; the reverse swap before
    cummax) and replace ``avg`` pools; ``static``, ``keep`` and the cummax pools stay max pools here."""
    for d in decisions:
        node = d.node
        if d.mode == "swap" and _is_activation(_pool_input(node), gm) and len(_pool_input(node).users) == 1:
            swap_in_front(gm, node)
        elif d.mode == "cummax" and d.reverse:
            swap_behind(gm, node)
        elif d.mode == "avg":
            args = pool_arguments(node, gm)
            avg = avgpool_like(args, args["dims"])
            if node.op == "call_module":
                gm.add_submodule(node.target, avg)
            else:
                replace_with_module(gm, node, avg, unique_name(gm, node.name))
    gm.graph.lint()
    gm.recompile()


def _channels_of(node: fx.Node, gm: fx.GraphModule, depth: int = 0) -> int | None:
    """The channel count of ``node``'s output, from the nearest layer that fixes it (conv, linear,
    BatchNorm), walking back through activations, additions and pooling; None if unknown."""
    if depth > 64 or not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return m.out_channels
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return m.num_features
        theta = getattr(m, "theta", None)
        if torch.is_tensor(theta) and theta.dim() == 1:
            return theta.numel()
    if node.op == "call_function" and node.target is torch.cat:
        counts = [_channels_of(p, gm, depth + 1) for p in node.args[0]]
        return None if None in counts else sum(counts)
    if node.op in ("call_module", "call_function", "call_method"):
        if node.op == "call_function" and node.target not in (operator.add, operator.sub, torch.add, torch.sub,
                                                              operator.neg, torch.neg, *_POOL_FUNCTIONS,
                                                              F.avg_pool1d, F.avg_pool2d):
            return None
        for inp in node.all_input_nodes:
            c = _channels_of(inp, gm, depth + 1)
            if c is not None:
                return c
    return None


def input_theta(node: fx.Node, gm: fx.GraphModule) -> torch.Tensor:
    """θ of the spikes a cummax pool receives: its neuron layer's θ, or for a channel concatenation the
    per-channel θ of all its parts."""
    src = _pool_input(node)
    if src.op == "call_module":
        return gm.get_submodule(src.target).theta
    parts = src.args[0]
    thetas = [gm.get_submodule(p.target).theta for p in parts]
    if all(t.dim() == 0 for t in thetas) and all(torch.equal(t, thetas[0]) for t in thetas):
        return thetas[0]
    pieces = []
    for p, t in zip(parts, thetas):
        if t.dim() == 1:
            pieces.append(t)
            continue
        c = _channels_of(p.args[0], gm)
        if c is None:
            raise ConversionError(f"cannot tell the channel count of {p.target}, an input of the max pool {node.name} "
                                  "(needed for the per-channel θ of its spiking max pool)")
        pieces.append(t.expand(c))
    return torch.cat(pieces)
