"""The spiking network: a converted network's graph with its stateful nodes, its settings (step mode,
backend, sub-batching, fusion) and its observers; :meth:`SpikingNetwork.run` drives it for T steps
through the executor (:mod:`eclsnn.simulation.executor`)."""

from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn
from torch.utils.hooks import RemovableHandle

from eclsnn.core.backends import resolve, use_backend
from eclsnn.core.backends.selection import check_backend
from eclsnn.core.neurons import SpikingNeuron, check_step_mode
from eclsnn.core.state import StatefulModule, is_stateful
from eclsnn.errors import SimulationError
from eclsnn.simulation.executor import SEQ, STATIC, Observer, Plan, execute, make_plan

__all__ = ["SpikingNetwork", "check_time_steps", "DEFAULT_MAX_ROWS"]

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

    :meth:`run` (used by :func:`eclsnn.simulate`) feeds one static input for T steps, computing the
    layers before the first neuron once.
    """

    def __init__(self, graph_module: fx.GraphModule, settings: dict | None = None, channels_last: bool | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.settings = dict(settings or {})
        self._plan: Plan | None = None
        self._observers: OrderedDict[int, Observer] = OrderedDict()
        self._backend: str | None = None
        #: fuse a neuron layer with the average pooling after it into one kernel (eclsnn.core.backends.cpu)
        self.fuse_pooling = True
        #: form a residual addition inside the kernel of the neuron layer after it (the sum is not stored)
        self.fuse_additions = True
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

    # -- settings ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str | None:
        """The backend of this network's runs (:mod:`eclsnn.core.backends`); None follows the default.
        A ``backend=`` argument of a call takes precedence."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = None if name is None else check_backend(name)

    # -- stateful nodes and state -----------------------------------------------------------------
    def stateful_nodes(self) -> list[tuple[str, StatefulModule]]:
        """The stateful nodes (:mod:`eclsnn.core.state`) in graph order, with their qualified names."""
        gm = self.graph_module
        return [(n.target, gm.get_submodule(n.target)) for n in gm.graph.nodes
                if n.op == "call_module" and is_stateful(gm.get_submodule(n.target))]

    def neurons(self) -> list[tuple[str, SpikingNeuron]]:
        """The neuron layers in graph order, with their qualified names."""
        return [(name, node) for name, node in self.stateful_nodes() if isinstance(node, SpikingNeuron)]

    def thresholds(self) -> dict[str, torch.Tensor]:
        """θ of every neuron layer by qualified name (a 0-dim tensor or ``[C]``)."""
        return {name: neuron.theta.detach().clone() for name, neuron in self.neurons()}

    def reset(self) -> None:
        """Forget the state of every stateful node."""
        for _, node in self.stateful_nodes():
            node.reset()

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep the state of the samples ``keep`` only, in every stateful node (finished samples leave)."""
        for _, node in self.stateful_nodes():
            node.keep_rows(keep)

    @property
    def step_mode(self) -> str:
        modes = {n.step_mode for _, n in self.stateful_nodes() if hasattr(n, "step_mode")}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_step_mode(self, mode: str) -> SpikingNetwork:
        check_step_mode(mode)
        for _, node in self.stateful_nodes():
            if hasattr(node, "step_mode"):
                node.step_mode = mode
        self.reset()
        return self

    # -- observers --------------------------------------------------------------------------------
    def add_observer(self, observer: Observer) -> RemovableHandle:
        """Call ``observer(name, node, input, output)`` after every stateful node's update in
        :meth:`run` and multi-step ``forward`` (input and output ``[T, B, ...]``; once per sub-batch,
        in order). While any observer is registered the network runs unfused, so the output is the
        node's own (e.g. the spike map, not its pooling). Returns a handle whose ``remove()`` ends it."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = observer
        return handle

    # -- execution ---------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """The executor's plan for this graph (node order, frees, fusions), made on first use."""
        if self._plan is None:
            self._plan = make_plan(self.graph_module)
        return self._plan

    def _execute(self, x: torch.Tensor, T: int, input_kind: str, backend: str | None, carry: bool = False) -> torch.Tensor:
        name = resolve(backend if backend is not None else self._backend)
        return execute(self.graph_module, self.plan(), x, T, input_kind, backend=name, carry=carry,
                       fuse=self.fuse_pooling, fuse_additions=self.fuse_additions,
                       observers=self._observers.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "single":
            with use_backend(self._backend) if self._backend is not None else contextlib.nullcontext():
                return self.graph_module(self._layout(x))
        if x.dim() < 2:
            raise SimulationError(f"multi-step input must be [T, B, ...], got shape {tuple(x.shape)}")
        T, B = x.shape[:2]
        out = self._execute(self._layout(x.flatten(0, 1)), T, SEQ, None)
        return out.view(T, B, *out.shape[1:])

    def run(self, x: torch.Tensor, time_steps: int, carry_state: bool = False, backend: str | None = None) -> torch.Tensor:
        """Drive the network with the same input ``x`` ``[B, ...]`` at every step for ``time_steps``
        steps; returns the readout of every step, ``[T, B, ...]``. State starts fresh, unless
        ``carry_state``: then the stateful nodes continue from where the previous run left them (the
        same samples in the same order; the whole batch runs at once), so T steps can be simulated as
        several shorter runs — adaptive-latency inference does so, dropping finished samples between
        runs. (The state is that of the last sub-batch of the previous run, so a run to be continued
        must have been one sub-batch: ``B·T ≤ max_rows``, or ``max_rows = None``.) ``backend``: see
        :mod:`eclsnn.core.backends` (None: the network's, else the default)."""
        T = check_time_steps(time_steps)
        B = x.shape[0]
        if carry_state:
            out = self._execute(self._layout(x), T, STATIC, backend, carry=True)
            return out.view(T, B, *out.shape[1:])
        chunk = B if not self.max_rows else max(1, self.max_rows // T)
        outs = []
        for start in range(0, B, chunk):
            self.reset()
            part = x[start:start + chunk]
            out = self._execute(self._layout(part), T, STATIC, backend)
            outs.append(out.view(T, part.shape[0], *out.shape[1:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
