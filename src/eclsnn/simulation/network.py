"""The multi-step simulator: a converted network, run for T steps on direct (analog) input.

Layout: stateless layers see all T steps at once, flattened into the batch (``[T·B, ...]``); the
neurons unflatten to ``[T, B, ...]`` and step through time. Everything that depends only on the
input — the layers before the first neuron — is computed once and fed to the first neurons as a
constant current, instead of T times.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from eclsnn.errors import SimulationError
from eclsnn.core.neurons import SpikingNeuron

__all__ = ["SpikingNetwork", "simulate", "evaluate", "evaluate_ann", "check_time_steps", "observe_neurons"]

# How a value in the simulator relates to time: the same for every step and batched ([B, ...]),
# a sequence ([T·B, ...]), or a constant that is neither (a buffer, a Python number).
_STATIC, _SEQ, _CONST = "static", "seq", "const"

#: default of :attr:`SpikingNetwork.max_rows`
DEFAULT_MAX_ROWS = 256


def check_time_steps(time_steps) -> int:
    """Validate T: a positive integer (``True`` and 2.0 are refused)."""
    if isinstance(time_steps, bool):
        raise SimulationError(f"time_steps must be a positive integer, got {time_steps!r}")
    try:
        t = operator.index(time_steps)
    except TypeError:
        raise SimulationError(f"time_steps must be a positive integer, got {time_steps!r}") from None
    if t < 1:
        raise SimulationError(f"time_steps must be at least 1, got {t}")
    return t


class SpikingNetwork(nn.Module):
    """A converted spiking network: the ANN's graph with neurons in place of its activations.

    ``forward`` follows the neurons' step mode:

    - ``"multi"``: input ``[T, B, ...]`` (one input per step) → output ``[T, B, ...]`` of the
      readout at each step; the state starts fresh at every call.
    - ``"single"``: input ``[B, ...]`` → one step's readout; state is kept until :meth:`reset`.

    :meth:`run` (used by :func:`simulate`) feeds one static input for T steps, computing the
    layers before the first neuron once.
    """

    def __init__(self, graph_module: fx.GraphModule, settings: dict | None = None, channels_last: bool | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.settings = dict(settings or {})
        self._plan: tuple[list[fx.Node], dict[fx.Node, list[fx.Node]], dict[fx.Node, tuple[fx.Node, int]]] | None = None
        #: fuse a neuron layer with the average pooling after it into one kernel (eclsnn.core.backends.cpu)
        self.fuse_pooling = True
        #: :meth:`run` simulates the batch in sub-batches of at most this many rows (steps × samples) at
        #: once, so that every layer's T-step tensor stays in cache (None: the whole batch at once).
        #: Chosen by ``benchmarks/speed.py --rows``; samples are independent, so the results are the same.
        self.max_rows: int | None = DEFAULT_MAX_ROWS
        # Image networks run in channels-last layout: on CPU, oneDNN convolutions and average pooling
        # are markedly faster on it (pooling ~3x on spike maps), and neurons are layout-agnostic.
        if channels_last is None:
            channels_last = any(isinstance(m, nn.Conv2d) for m in graph_module.modules())
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.graph_module.to(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # -- neurons and state ------------------------------------------------------------------------
    def neurons(self) -> list[tuple[str, SpikingNeuron]]:
        """The neuron layers in graph order, with their qualified names."""
        return [(n.target, self.graph_module.get_submodule(n.target)) for n in self.graph_module.graph.nodes
                if n.op == "call_module" and isinstance(self.graph_module.get_submodule(n.target), SpikingNeuron)]

    def thresholds(self) -> dict[str, torch.Tensor]:
        """θ of every neuron layer by qualified name (a 0-dim tensor or ``[C]``)."""
        return {name: neuron.theta.detach().clone() for name, neuron in self.neurons()}

    def reset(self) -> None:
        for _, neuron in self.neurons():
            neuron.reset()

    @property
    def step_mode(self) -> str:
        modes = {n.step_mode for _, n in self.neurons()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_step_mode(self, mode: str) -> SpikingNetwork:
        if mode not in ("multi", "single"):
            raise SimulationError(f"step_mode must be 'multi' or 'single', got {mode!r}")
        for _, neuron in self.neurons():
            neuron.step_mode = mode
        self.reset()
        return self

    # -- execution ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "single":
            return self.graph_module(self._layout(x))
        if x.dim() < 2:
            raise SimulationError(f"multi-step input must be [T, B, ...], got shape {tuple(x.shape)}")
        T, B = x.shape[:2]
        out = self._execute(self._layout(x.flatten(0, 1)), T, _SEQ)
        return out.view(T, B, *out.shape[1:])

    def run(self, x: torch.Tensor, time_steps: int, carry_state: bool = False) -> torch.Tensor:
        """Drive the network with the same input ``x`` ``[B, ...]`` at every step for ``time_steps``
        steps; returns the readout of every step, ``[T, B, ...]``. State starts fresh, unless
        ``carry_state``: then the neurons continue from where the previous run left them (the same
        samples in the same order; the whole batch runs at once), so T steps can be simulated as
        several shorter runs — adaptive-latency inference does so, dropping finished samples between
        runs. (The state is that of the last sub-batch of the previous run, so a run to be continued
        must have been one sub-batch: ``B·T ≤ max_rows``, or ``max_rows = None``.)"""
        T = check_time_steps(time_steps)
        B = x.shape[0]
        if carry_state:
            neurons = [n for _, n in self.neurons()]
            for n in neurons:
                n.carry_state = True
            try:
                out = self._execute(self._layout(x), T, _STATIC)
            finally:
                for n in neurons:
                    n.carry_state = False
            return out.view(T, B, *out.shape[1:])
        chunk = B if not self.max_rows else max(1, self.max_rows // T)
        outs = []
        for start in range(0, B, chunk):
            self.reset()
            part = x[start:start + chunk]
            out = self._execute(self._layout(part), T, _STATIC)
            outs.append(out.view(T, part.shape[0], *out.shape[1:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _plan_graph(self):
        if self._plan is None:
            nodes = list(self.graph_module.graph.nodes)
            last_use: dict[fx.Node, list[fx.Node]] = {}
            seen: set[fx.Node] = set()
            for node in reversed(nodes):  # free each value after its last user has run
                for inp in node.all_input_nodes:
                    if inp not in seen:
                        seen.add(inp)
                        last_use.setdefault(node, []).append(inp)
            fusions = {}
            for node in nodes:
                if node.op == "call_module" and isinstance(self.graph_module.get_submodule(node.target), SpikingNeuron) \
                        and len(node.users) == 1:
                    user = next(iter(node.users))
                    k = _pool_kernel(user, self.graph_module)
                    if k is not None and user.args and user.args[0] is node:
                        fusions[node] = (user, k)
            self._plan = (nodes, last_use, fusions)
        return self._plan

    def _execute(self, x: torch.Tensor, T: int, input_kind: str) -> torch.Tensor:
        nodes, last_use, fusions = self._plan_graph()
        gm = self.graph_module
        env: dict[fx.Node, object] = {}
        kind: dict[fx.Node, str] = {}
        fused: set[fx.Node] = set()

        def as_seq(node: fx.Node):
            value = env[node]
            if kind[node] == _STATIC and torch.is_tensor(value):
                return value.unsqueeze(0).expand(T, *value.shape).flatten(0, 1)
            return value

        for node in nodes:
            if node in fused:
                pass  # computed together with the neuron layer before it
            elif node.op == "placeholder":
                env[node], kind[node] = x, input_kind
            elif node.op == "get_attr":
                env[node], kind[node] = getattr_path(gm, node.target), _CONST
            elif node.op == "output":
                result = node.args[0]
                return as_seq(result) if kind[result] == _STATIC else env[result]
            else:
                inputs = node.all_input_nodes
                kinds = {kind[n] for n in inputs}
                target = gm.get_submodule(node.target) if node.op == "call_module" else None
                if isinstance(target, SpikingNeuron):
                    src = node.args[0]
                    value = env[src]
                    xs = value.view(T, -1, *value.shape[1:]) if kind[src] == _SEQ else value.unsqueeze(0).expand(T, *value.shape)
                    pooled = None
                    if node in fusions and self.fuse_pooling and "multi_step" not in vars(target):
                        # (an instance attribute multi_step is an observer, e.g. eclsnn.analysis.decomposition: keep its view)
                        pool_node, k = fusions[node]
                        pooled = target.multi_step_pooled(xs, k)
                    if pooled is not None:
                        env[pool_node], kind[pool_node] = pooled.flatten(0, 1), _SEQ
                        fused.add(pool_node)
                    else:
                        env[node], kind[node] = target.multi_step(xs).flatten(0, 1), _SEQ
                elif _SEQ in kinds or (_STATIC in kinds and _is_shape_query(node)):
                    # Shapes of a static value are asked of its time-expanded form, so that code like
                    # x.view(x.size(0), -1) sizes sequences correctly.
                    load = as_seq if _SEQ in kinds else (lambda n: _expanded_meta(env[n], T) if kind[n] == _STATIC else env[n])
                    env[node], kind[node] = _call(node, gm, fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)), _SEQ
                else:
                    load = env.__getitem__
                    value = _call(node, gm, fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load))
                    env[node], kind[node] = value, (_STATIC if _STATIC in kinds else _CONST)
            for dead in last_use.get(node, ()):
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


# ---- user-facing functions -------------------------------------------------------------------------

@contextlib.contextmanager
def observe_neurons(snn: SpikingNetwork, callback: Callable[[str, torch.Tensor, torch.Tensor], None]):
    """While active, ``callback(name, current, output)`` sees every neuron layer's multi-step update:
    its input current and its output ``θ·s(t)``, both ``[T, B, ...]`` (one call per sub-batch, in
    order). The observer is an instance attribute ``multi_step`` shadowing the method; the simulator
    then runs that layer unfused from its pooling, so the output is the spike map itself."""
    patched = []
    try:
        for name, neuron in snn.neurons():
            original = neuron.multi_step

            def observed(x_seq, _original=original, _name=name):
                out = _original(x_seq)
                callback(_name, x_seq, out)
                return out

            neuron.multi_step = observed
            patched.append(neuron)
        yield
    finally:
        for neuron in patched:
            del neuron.multi_step


def _check_network(snn) -> SpikingNetwork:
    if not isinstance(snn, SpikingNetwork):
        raise SimulationError(
            f"expected a SpikingNetwork (the result of eclsnn.convert), got {type(snn).__name__}; convert the model first"
        )
    return snn


def _check_input(x) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise SimulationError(f"input must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise SimulationError(f"input must be a floating-point tensor (normalised images), got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise SimulationError(f"input must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise SimulationError("input contains NaN or infinite values")
    return x


@torch.no_grad()
def simulate(snn: SpikingNetwork, x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Run the spiking network on direct input ``x`` ``[B, ...]`` for ``time_steps`` steps.

    Returns ``[T, B, classes]``: at index t the mean of the readout over the first t+1 steps, so the
    accuracy at every t = 1…T comes from one run. State is reset at the start of the call.
    """
    snn = _check_network(snn)
    T = check_time_steps(time_steps)
    x = _check_input(x)
    param = next(snn.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    mode = snn.step_mode
    try:
        if mode != "multi":
            snn.set_step_mode("multi")
        out = snn.run(x, T)
    except RuntimeError as exc:
        raise SimulationError(
            f"the network could not run on input of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}. "
            "Check the image size and channel count the model was trained with."
        ) from None
    finally:
        if mode not in ("multi", "mixed"):
            snn.set_step_mode(mode)
    steps = torch.arange(1, T + 1, device=out.device, dtype=out.dtype).view(T, *([1] * (out.dim() - 1)))
    return out.cumsum(0).div_(steps)


def _batches(loader: Iterable):
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise SimulationError("the loader must yield (inputs, labels) batches")
        yield batch[0], batch[1]


def evaluate(snn: SpikingNetwork, loader: Iterable, time_steps: int, progress: str | None = None) -> dict[int, float]:
    """Accuracy of the spiking network at every t = 1…T, from one T-step run per batch.

    ``loader`` yields ``(x, y)`` batches. Returns ``{t: accuracy}`` (fractions).
    """
    snn = _check_network(snn)
    T = check_time_steps(time_steps)
    correct = torch.zeros(T, dtype=torch.long)
    total = 0
    for x, y in _progress(_batches(loader), progress, loader):
        out = simulate(snn, x, T)
        correct += (out.argmax(-1) == y.to(out.device)).sum(1).cpu()
        total += y.shape[0]
    if total == 0:
        raise SimulationError("the loader yielded no samples; nothing to evaluate")
    return {t + 1: correct[t].item() / total for t in range(T)}


@torch.no_grad()
def evaluate_ann(model: nn.Module, loader: Iterable, progress: str | None = None) -> float:
    """Top-1 accuracy of an ANN (eval mode) on ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    correct = total = 0
    try:
        for x, y in _progress(_batches(loader), progress, loader):
            if param is not None:
                x = x.to(device=param.device, dtype=param.dtype)
            correct += (model(x).argmax(-1) == y.to(x.device)).sum().item()
            total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise SimulationError("the loader yielded no samples; nothing to evaluate")
    return correct / total


def _progress(it, desc: str | None, loader):
    if not desc:
        return it
    from tqdm.auto import tqdm

    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return tqdm(it, desc=desc, total=total, leave=False)
