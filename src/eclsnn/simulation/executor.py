"""The executor: runs a spiking network's graph for T steps, following a plan made once per graph.

Layout: stateless layers see all T steps at once, flattened into the batch (``[T·B, ...]``); stateful
nodes (:mod:`eclsnn.core.state`: the neurons) unflatten to ``[T, B, ...]`` and step through time.
Everything that depends only on the input — the layers before the first neuron — is computed once
and fed to the first neurons as a constant current, instead of T times.

The plan (:func:`make_plan`) holds the node order, where each value is last used (to free it early),
and the fusions: a neuron layer whose only user is a k×k / stride-k average pooling runs together with
it in one kernel call (:func:`fused_neuron_pool`), with the neuron's parameters and state taken through its
state protocol; a neuron layer fed by an addition ``a + b`` that nothing else uses (a residual block's
output) takes both operands and forms the sum in its kernel (``multi_step_sum`` of the node, where it
has one), so the sum of T steps is never stored. Observers (:meth:`eclsnn.simulation.SpikingNetwork.add_observer`) see every stateful
node's input and output; while any is registered, nothing is fused, so they see the spike maps.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.core import backends
from eclsnn.core.backends import cpu as kernels
from eclsnn.core.state import is_stateful
from eclsnn.errors import SimulationError

__all__ = ["Plan", "make_plan", "execute", "fused_neuron_pool", "STATIC", "SEQ", "getattr_path"]

# How a value in the simulator relates to time: the same for every step and batched ([B, ...]),
# a sequence ([T·B, ...]), or a constant that is neither (a buffer, a Python number).
STATIC, SEQ, CONST = "static", "seq", "const"

#: observer(name, node module, input [T, B, ...], output [T, B, ...])
Observer = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Plan:
    nodes: list[fx.Node]
    #: node → the values whose last user it is (freed after it ran)
    last_use: dict[fx.Node, list[fx.Node]]
    #: neuron node → (its pooling node, k): run as one fused step
    fusions: dict[fx.Node, tuple[fx.Node, int]]
    #: neuron node → the addition feeding it (its only user): the sum is formed in the neuron's kernel
    additions: dict[fx.Node, fx.Node] = None  # type: ignore[assignment]


def make_plan(gm: fx.GraphModule) -> Plan:
    nodes = list(gm.graph.nodes)
    fusions, additions = {}, {}
    for node in nodes:
        target = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not (is_stateful(target) and getattr(target, "fused_kernel", False)):
            continue
        if len(node.users) == 1:
            user = next(iter(node.users))
            k = _pool_kernel(user, gm)
            if k is not None and user.args and user.args[0] is node:
                fusions[node] = (user, k)
                continue
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and _is_addition(src) and len(src.users) == 1 and hasattr(target, "multi_step_sum"):
            additions[node] = src
    deferred = {add: neuron for neuron, add in additions.items()}
    last_use: dict[fx.Node, list[fx.Node]] = {}
    seen: set[fx.Node] = set()
    for node in reversed(nodes):  # free each value after its last user has run
        if node in deferred:
            continue  # a deferred addition's operands are used by its neuron
        inputs = node.all_input_nodes
        if node in additions:
            inputs = [*additions[node].all_input_nodes, *inputs]  # (the sum itself, if it had to be formed)
        for inp in inputs:
            if inp not in seen:
                seen.add(inp)
                last_use.setdefault(node, []).append(inp)
    return Plan(nodes, last_use, fusions, additions)


def _is_addition(node: fx.Node) -> bool:
    """``a + b`` of two graph values, nothing else (no alpha, no scalars): what the kernels can add."""
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def fused_neuron_pool(neuron, xs: torch.Tensor, k: int, carry: bool = False,
                      backend: str | None = None) -> torch.Tensor | None:
    """The neuron layer over ``xs`` ``[T, B, C, H, W]`` and the k×k average pooling after it in one
    kernel call (the spike maps are never materialised); None when the kernel cannot take it."""
    y = xs[0]
    theta, neg_units = neuron.kernel_parameters(y)
    autograd = xs.requires_grad and torch.is_grad_enabled()
    if not backends.use_fused_cpu(backend, y, theta, autograd=autograd) or not kernels.pool_fusable(y, k):
        return None
    state = neuron.start_state(y, carry, dense=True)
    out = kernels.neuron_pool_run(xs, theta, state["v"], state.get("count"), neg_units, k)
    neuron.load_state(state)
    return out


def execute(gm: fx.GraphModule, plan: Plan, x: torch.Tensor, T: int, input_kind: str, *, backend: str,
            carry: bool = False, fuse: bool = True, fuse_additions: bool = True,
            observers: Iterable[Observer] = ()) -> torch.Tensor:
    """Run the graph on ``x`` (``[B, ...]`` static, or ``[T·B, ...]`` a sequence) for T steps; returns the
    output ``[T·B, ...]``. ``backend`` is a resolved backend name; ``carry`` continues every stateful
    node from its state; ``fuse`` / ``fuse_additions``: the neuron+pooling / addition+neuron fusions."""
    observers = tuple(observers)
    fuse_additions = fuse_additions and not observers
    fuse = fuse and not observers
    env: dict[fx.Node, object] = {}
    kind: dict[fx.Node, str] = {}
    fused: set[fx.Node] = set()

    def as_seq(node: fx.Node):
        value = env[node]
        if kind[node] == STATIC and torch.is_tensor(value):
            return value.unsqueeze(0).expand(T, *value.shape).flatten(0, 1)
        return value

    def steps(node: fx.Node) -> torch.Tensor:
        """A tensor value as T steps [T, B, ...] (a view)."""
        value = env[node]
        return value.view(T, -1, *value.shape[1:]) if kind[node] == SEQ else value.unsqueeze(0).expand(T, *value.shape)

    def compute(node: fx.Node) -> None:
        """A stateless node: on sequences if any input is one, else once (static or constant)."""
        kinds = {kind[n] for n in node.all_input_nodes}
        if SEQ in kinds or (STATIC in kinds and _is_shape_query(node)):
            # Shapes of a static value are asked of its time-expanded form, so that code like
            # x.view(x.size(0), -1) sizes sequences correctly.
            load = as_seq if SEQ in kinds else (lambda n: _expanded_meta(env[n], T) if kind[n] == STATIC else env[n])
            env[node], kind[node] = _call(node, gm, fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)), SEQ
        else:
            load = env.__getitem__
            value = _call(node, gm, fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load))
            env[node], kind[node] = value, (STATIC if STATIC in kinds else CONST)

    def run_stateful(node: fx.Node, target: nn.Module) -> None:
        src = node.args[0]
        addition = additions.get(node)
        if addition is not None:  # the residual addition before the neuron: formed in its kernel if it can be
            a, b = addition.args
            # (static + sequence: torch lays the stored sum out like its first operand's time-expanded
            # copy, contiguous; the kernel would keep the static value's layout, and later reductions
            # would round differently — left to torch)
            if fuse_additions and torch.is_tensor(env[a]) and torch.is_tensor(env[b]) \
                    and not (kind[a] == STATIC and kind[b] == SEQ):
                out = target.multi_step_sum(steps(a), steps(b), carry=carry, backend=backend)
                if out is not None:
                    env[node], kind[node] = out.flatten(0, 1), SEQ
                    return
            compute(addition)
        xs = steps(src)
        if fuse and node in plan.fusions:
            pool_node, k = plan.fusions[node]
            pooled = fused_neuron_pool(target, xs, k, carry, backend)
            if pooled is not None:
                env[pool_node], kind[pool_node] = pooled.flatten(0, 1), SEQ
                fused.add(pool_node)
                return
        out = target.multi_step(xs, carry=carry, backend=backend)
        for observer in observers:
            observer(node.target, target, xs, out)
        env[node], kind[node] = out.flatten(0, 1), SEQ

    additions = plan.additions or {}
    deferred = set(additions.values())
    for node in plan.nodes:
        if node in fused or node in deferred:
            pass  # computed together with the neuron layer before it / the neuron layer after it
        elif node.op == "placeholder":
            env[node], kind[node] = x, input_kind
        elif node.op == "get_attr":
            env[node], kind[node] = getattr_path(gm, node.target), CONST
        elif node.op == "output":
            result = node.args[0]
            return as_seq(result) if kind[result] == STATIC else env[result]
        else:
            target = gm.get_submodule(node.target) if node.op == "call_module" else None
            if is_stateful(target):
                run_stateful(node, target)
            else:
                compute(node)
        for dead in plan.last_use.get(node, ()):
            env.pop(dead, None)
    raise SimulationError("the network graph has no output")


def _pool_kernel(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """k for a k×k / stride-k average pooling without padding, or None: the poolings the fused neuron
    kernel reproduces bit for bit. (Adaptive average pooling is left out: torch sums its windows
    in another order, which in float32 can differ in the last bit for large windows.)"""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.AvgPool2d):
            k, st, pad = mod.kernel_size, mod.stride, mod.padding
            ok = not mod.ceil_mode and mod.divisor_override is None
        else:
            return None
        if len(node.args) != 1 or node.kwargs:
            return None
    elif node.op == "call_function" and node.target is F.avg_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        k, st, pad = bound.get("kernel_size"), bound.get("stride"), bound.get("padding", 0)
        ok = not bound.get("ceil_mode", False) and bound.get("divisor_override") is None and not isinstance(k, fx.Node)
    else:
        return None
    k2, st2, pad2 = (_pair(k), _pair(st if st not in (None, []) else k), _pair(pad))
    if ok and None not in (k2, st2, pad2) and k2[0] == k2[1] == st2[0] == st2[1] and pad2 == (0, 0):
        return k2[0]
    return None


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    return None


def getattr_path(obj, target: str):
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target is getattr and node.args[1] == "shape")


def _expanded_meta(value, T: int):
    """A shape-only stand-in for a static tensor expanded over T steps (no memory)."""
    if not torch.is_tensor(value):
        return value
    return torch.empty((T * value.shape[0], *value.shape[1:]), device="meta")


def _call(node: fx.Node, gm: fx.GraphModule, args, kwargs):
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    obj, *rest = args
    if node.target == "view" and torch.is_tensor(obj) and not obj.is_contiguous():
        # the simulator keeps image tensors channels-last (faster convolutions and pooling), where
        # x.view(B, -1) would fail; reshape gives the same values (a copy in NCHW order)
        return obj.reshape(*rest, **kwargs)
    return getattr(obj, node.target)(*rest, **kwargs)
