"""Integrate-and-fire neurons: plain IF, the dual-threshold (signed) IF neuron and its burst variant.

Both reset by subtraction, start from ``v(0) = v_init·θ`` and pass ``θ·s(t)`` to the next layer.
They run in two step modes with identical results:

- ``step_mode="multi"`` (default): input ``[T, B, ...]``, output of the same shape; the state is
  reset at the start of every call.
- ``step_mode="single"``: one step ``[B, ...]`` per call; the state is kept until :meth:`reset`.

θ is a scalar or a per-channel vector ``[C]`` (channel = dim 1 of one step's input).
"""

from __future__ import annotations

import torch

from eclsnn.core import backends
from eclsnn.core import functional as SF
from eclsnn.core.backends import cpu as kernels
from eclsnn.core.clip import channel_view
from eclsnn.core.state import StatefulModule
from eclsnn.errors import ConversionError, SimulationError

__all__ = ["IFNeuron", "DualThresholdIFNeuron", "BurstNeuron", "SpikingNeuron", "STEP_MODES", "check_step_mode"]

#: the step modes of neurons and networks
STEP_MODES = ("multi", "single")


def check_step_mode(mode) -> str:
    """``mode`` if it is a step mode, else a SimulationError."""
    if mode not in STEP_MODES:
        raise SimulationError(f"step_mode must be one of {STEP_MODES}, got {mode!r}")
    return mode


def _needs_autograd(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


class SpikingNeuron(StatefulModule):
    """Common state handling of the IF neurons (the state protocol of :mod:`eclsnn.core.state`: the
    membrane potential ``v``, and the net spike count ``count`` of the dual-threshold neuron).
    Subclasses implement the dynamics on the reference path; the fused CPU kernels take the same
    parameters (:meth:`kernel_parameters`)."""

    state_names: tuple[str, ...] = ("v",)
    _signed = False
    #: whether the fused CPU kernels implement this neuron (:meth:`kernel_parameters`)
    fused_kernel = True

    def __init__(self, theta, v_init: float = 0.5, step_mode: str = "multi"):
        super().__init__()
        theta = torch.as_tensor(theta, dtype=torch.float32).detach().clone()
        if theta.dim() > 1:
            theta = theta.flatten()
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            raise ConversionError(f"theta must be finite and positive, got {theta}")
        self.register_buffer("theta", theta)
        self.v_init = float(v_init)
        self.step_mode = check_step_mode(step_mode)
        self.v: torch.Tensor | None = None

    # -- parameters and state --------------------------------------------------------------------
    def theta_like(self, x: torch.Tensor) -> torch.Tensor:
        """θ in the dtype of one step ``x`` ``[B, C, ...]``, shaped to broadcast against it."""
        return channel_view(self.theta.to(x.dtype), x.dim())

    def kernel_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """What the fused kernels take for one step like ``x``: (θ, θ_neg in units of θ or None for IF)."""
        return self.theta_like(x), None

    def start_state(self, x: torch.Tensor, carry: bool = False, dense: bool = False) -> dict[str, torch.Tensor | None]:
        """The state a run with steps like ``x`` starts from: the current state if ``carry`` and there
        is one, else the initial state (``v = v_init·θ``, count 0). With ``dense`` the tensors have the
        memory layout of ``x`` (what the kernels need; they update them in place)."""
        if carry and self.v is not None:
            if self.v.shape != x.shape:
                raise SimulationError(f"cannot continue the state {tuple(self.v.shape)} with input of shape {tuple(x.shape)}; "
                                      "reset() the network first")
            state = self.state()
            if dense:
                state = {k: None if s is None else s if s.stride() == x.stride() and s.dtype == x.dtype
                         else torch.empty_like(x).copy_(s) for k, s in state.items()}
            return state
        theta = self.theta_like(x)
        state = {"v": torch.empty_like(x).copy_((theta * self.v_init).expand_as(x))}
        if self._signed:
            state["count"] = torch.zeros_like(x)
        return state

    def _state_fits(self, x: torch.Tensor) -> bool:
        return all(s is not None and s.shape == x.shape and s.stride() == x.stride() and s.dtype == x.dtype
                   for s in self.state().values())

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "single":
            return self.single_step(x)
        return self.multi_step(x)

    def multi_step(self, x_seq: torch.Tensor, carry: bool = False, backend: str | None = None) -> torch.Tensor:
        """T steps ``x_seq`` ``[T, B, ...]`` → outputs ``θ·s(t)`` ``[T, B, ...]``. The state starts
        afresh unless ``carry`` (then it continues from the current state); ``backend`` as in
        :mod:`eclsnn.core.backends`."""
        y = x_seq[0]
        theta, neg = self.kernel_parameters(y)
        if backends.use_fused_cpu(backend, y, theta, autograd=_needs_autograd(x_seq)):
            state, v_start = self.kernel_state(y, carry)
            out = kernels.neuron_run(x_seq, theta, state["v"], state.get("count"), neg, v_start=v_start)
        else:
            out, state = self._reference_steps(x_seq, theta, self.start_state(y, carry))
        self.load_state(state)
        return out

    def multi_step_sum(self, x_seq: torch.Tensor, addend: torch.Tensor, carry: bool = False,
                       backend: str | None = None) -> torch.Tensor | None:
        """:meth:`multi_step` of ``x_seq + addend`` (both ``[T, B, ...]``), the sum formed inside the
        fused kernel and never stored — the simulator runs a neuron after a residual addition so. None
        when the kernel cannot take the pair (then the caller adds and calls :meth:`multi_step`);
        the results are bit-identical either way."""
        if not self.fused_kernel:
            return None
        y = x_seq[0]
        theta, neg = self.kernel_parameters(y)
        autograd = _needs_autograd(x_seq) or _needs_autograd(addend)
        if not (backends.use_fused_cpu(backend, y, theta, autograd=autograd) and kernels.addable(x_seq, addend)):
            return None
        state, v_start = self.kernel_state(y, carry)
        out = kernels.neuron_run(x_seq, theta, state["v"], state.get("count"), neg, addend=addend, v_start=v_start)
        self.load_state(state)
        return out

    def kernel_state(self, y: torch.Tensor, carry: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The state tensors the fused kernels update in a run with steps like ``y``, and ``v``'s start
        value for a fresh start (θ's shape), which the kernel writes itself (the tensors are then left
        uninitialised); None when the run continues the current state (``carry``)."""
        if carry and self.v is not None:
            return self.start_state(y, carry=True, dense=True), None
        state = {"v": torch.empty_like(y)}
        if self._signed:
            state["count"] = torch.empty_like(y)
        return state, self.theta_like(y) * self.v_init

    def single_step(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """One step ``x`` ``[B, ...]``; the state is kept until :meth:`reset`."""
        theta, neg = self.kernel_parameters(x)
        if backends.use_fused_cpu(backend, x, theta, autograd=_needs_autograd(x)) and (
                not self.has_state() or self._state_fits(x)):
            if not self.has_state():
                self.load_state(self.start_state(x, dense=True))
            return kernels.neuron_run(x.unsqueeze(0), theta, self.v, self.state().get("count"), neg)[0]
        state = self.start_state(x, carry=True)
        out, state = self._reference_step(x, theta, state)
        self.load_state(state)
        return out

    def _reference_steps(self, x_seq, theta, state):
        raise NotImplementedError

    def _reference_step(self, x, theta, state):
        raise NotImplementedError

    def extra_repr(self) -> str:
        theta = f"theta={self.theta.item():.4g}" if self.theta.dim() == 0 else f"theta=[{self.theta.numel()} channels]"
        return f"{theta}, v_init={self.v_init}, step_mode={self.step_mode!r}"


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire neuron, reset by subtraction (docs/METHOD.md, "IF neuron").

    ``m(t) = v(t−1) + I(t);  s(t) = H(m(t) − θ);  v(t) = m(t) − s(t)·θ``, output ``θ·s(t)``.
    With ``v_init = 0.5`` and a constant input z for T = L steps the output equals the threshold
    clipping function with λ = θ exactly (rounding instead of flooring).

    Args:
        theta: threshold θ (> 0), scalar or per-channel ``[C]``.
        v_init: initial membrane potential in units of θ (0.5 is the paper's θ/2).
        step_mode: ``"multi"`` or ``"single"``.
    """

    def _reference_steps(self, x_seq, theta, state):
        out, v = SF.if_multistep(x_seq, theta, state["v"])
        return out, {"v": v}

    def _reference_step(self, x, theta, state):
        out, v = SF.if_step(x, state["v"], theta)
        return out, {"v": v}


class DualThresholdIFNeuron(SpikingNeuron):
    """Dual-threshold (signed) IF neuron (Liu et al., ICML 2025; docs/METHOD.md, "Dual-threshold neuron").

    ``m(t) = v(t−1) + I(t)``; ``s(t) = +1`` if ``m ≥ θ``, ``−1`` if ``m < θ_neg`` and the net spike
    count so far ``c(t−1) > 0``, else 0; ``v(t) = m − s·θ``; output ``θ·s``. The negative spike
    retracts a spike fired too early; the count gate (SNM, Wang et al., IJCAI 2022) stops neurons whose
    ANN output is 0 from emitting negative values. With θ_neg = 0 and v_init = 0.5, for inputs in
    [−θ, θ] each step the net count after T steps is ``clamp(floor(ΣI/θ + 1/2), 0, T)`` whatever the
    order of the inputs.

    Args:
        theta: positive threshold θ, scalar or per-channel ``[C]``.
        v_init: initial membrane potential in units of θ.
        theta_neg: negative threshold in units of θ (0 = fire a negative spike once the potential
            drops below 0).
        step_mode: ``"multi"`` or ``"single"``.
    """

    state_names = ("v", "count")
    _signed = True

    def __init__(self, theta, v_init: float = 0.5, theta_neg: float = 0.0, step_mode: str = "multi"):
        super().__init__(theta, v_init, step_mode)
        if not theta_neg < 1.0:
            raise ConversionError(f"theta_neg (in units of theta) must be below 1 (the positive threshold), got {theta_neg}")
        self.theta_neg = float(theta_neg)
        self.count: torch.Tensor | None = None

    def kernel_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        return self.theta_like(x), self.theta_neg

    def _reference_steps(self, x_seq, theta, state):
        out, v, count = SF.dual_threshold_multistep(x_seq, theta, theta * self.theta_neg, state["v"], state["count"])
        return out, {"v": v, "count": count}

    def _reference_step(self, x, theta, state):
        out, v, count = SF.dual_threshold_step(x, state["v"], state["count"], theta, theta * self.theta_neg)
        return out, {"v": v, "count": count}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", theta_neg={self.theta_neg}"


class BurstNeuron(SpikingNeuron):
    """Burst (graded-spike) dual-threshold IF neuron: may fire several spikes in one step
    (docs/METHOD.md, "Burst neuron").

    ``m(t) = v(t−1) + I(t)``; ``n(t) = clamp(floor(m/θ), −c(t−1), t − c(t−1))``; ``v(t) = m − n·θ``;
    output ``θ·n(t)``, an integer number of spikes (negative: retractions) sent as one graded event.
    The dual-threshold neuron fires at most one spike a step, so input that arrives in bursts (a
    residual addition: two branches' spikes in the same step) is cut or delayed; this neuron fires what
    its potential holds, never more than one spike per elapsed step in all (rate ≤ θ), and retracts
    only what it fired. With ``v_init = 0.5`` the net count after T steps is
    ``clamp(floor(ΣI/θ + 1/2), 0, T)`` for *any* input sequence — no band condition — so a network of
    these neurons computes, on time-averaged values, exactly its ANN with every clip at L = T
    (the same λ): conversion error is then quantisation alone. Reference path only (no fused kernel).

    Args:
        theta: positive threshold θ, scalar or per-channel ``[C]``.
        v_init: initial membrane potential in units of θ.
        step_mode: ``"multi"`` or ``"single"``.
    """

    state_names = ("v", "count", "steps")
    _signed = True
    fused_kernel = False

    def __init__(self, theta, v_init: float = 0.5, step_mode: str = "multi"):
        super().__init__(theta, v_init, step_mode)
        self.count: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None

    def start_state(self, x: torch.Tensor, carry: bool = False, dense: bool = False) -> dict[str, torch.Tensor | None]:
        state = super().start_state(x, carry, dense)
        if not (carry and self.steps is not None):
            state["steps"] = torch.zeros_like(x)
        return state

    def multi_step(self, x_seq: torch.Tensor, carry: bool = False, backend: str | None = None) -> torch.Tensor:
        y = x_seq[0]
        state = self.start_state(y, carry)
        out, v, count, steps = SF.burst_multistep(x_seq, self.theta_like(y), state["v"], state["count"], state["steps"])
        self.load_state({"v": v, "count": count, "steps": steps})
        return out

    def single_step(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        state = self.start_state(x, carry=True)
        out, v, count, steps = SF.burst_step(x, state["v"], state["count"], state["steps"], self.theta_like(x))
        self.load_state({"v": v, "count": count, "steps": steps})
        return out
