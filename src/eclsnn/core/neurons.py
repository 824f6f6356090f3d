"""Integrate-and-fire neurons: plain IF and the dual-threshold (signed) IF neuron.

Both reset by subtraction, start from ``v(0) = v_init·θ`` and pass ``θ·s(t)`` to the next layer.
They run in two step modes with identical results:

- ``step_mode="multi"`` (default): input ``[T, B, ...]``, output of the same shape; the state is
  reset at the start of every call.
- ``step_mode="single"``: one step ``[B, ...]`` per call; the state is kept until :meth:`reset`.

θ is a scalar or a per-channel vector ``[C]`` (channel = dim 1 of one step's input).
"""

from __future__ import annotations

import torch
from torch import nn

from eclsnn.core import functional as SF
from eclsnn.core.backends import cpu as kernels
from eclsnn.core.clip import channel_view
from eclsnn.errors import ConversionError, SimulationError

__all__ = ["IFNeuron", "DualThresholdIFNeuron", "SpikingNeuron"]

_STEP_MODES = ("multi", "single")


class SpikingNeuron(nn.Module):
    """Common state handling of the IF neurons. Subclasses implement the dynamics."""

    def __init__(self, theta, v_init: float = 0.5, step_mode: str = "multi"):
        super().__init__()
        theta = torch.as_tensor(theta, dtype=torch.float32).detach().clone()
        if theta.dim() > 1:
            theta = theta.flatten()
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            raise ConversionError(f"theta must be finite and positive, got {theta}")
        if step_mode not in _STEP_MODES:
            raise ConversionError(f"step_mode must be one of {_STEP_MODES}, got {step_mode!r}")
        self.register_buffer("theta", theta)
        self.v_init = float(v_init)
        self.step_mode = step_mode
        self.v: torch.Tensor | None = None
        #: multi-step calls continue from the current state instead of starting afresh (set by
        #: ``SpikingNetwork.run(..., carry_state=True)``, e.g. for adaptive-latency inference in blocks)
        self.carry_state = False

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the membrane potential (and spike count); the next step starts from v_init·θ."""
        self.v = None

    def _theta_for(self, x: torch.Tensor) -> torch.Tensor:
        return channel_view(self.theta.to(x.dtype), x.dim())

    def _initial_v(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return (theta * self.v_init).expand_as(x).clone()

    # -- fused CPU kernels (eclsnn.core.backends.cpu): the same arithmetic in one pass ----------------------
    def _kernel_state(self, y: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The state to start a multi-step run from, with the memory layout of one step ``y`` (the kernels
        need equal layouts): the carried state if :attr:`carry_state`, else fresh."""
        carried = self._carried(y)
        if carried is not None:  # (updated in place by the kernels: reuse when the layout already fits)
            return tuple(None if s is None else s if s.stride() == y.stride() else torch.empty_like(y).copy_(s)
                         for s in carried)  # type: ignore[return-value]
        v = torch.empty_like(y).copy_((theta * self.v_init).expand_as(y))
        return v, (torch.zeros_like(y) if self._signed else None)

    def _carried(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(v, count) to continue from, or None for a fresh start."""
        if not self.carry_state or self.v is None:
            return None
        if self.v.shape != y.shape:
            raise SimulationError(f"cannot continue the state {tuple(self.v.shape)} with input of shape {tuple(y.shape)}; "
                                  "reset() the network first")
        return self.v, getattr(self, "count", None)

    def _kernel_ok(self, x_seq: torch.Tensor, theta: torch.Tensor) -> bool:
        if x_seq.requires_grad and torch.is_grad_enabled():
            return False  # the kernels have no autograd; the reference path does
        return kernels.enabled() and kernels.supports(x_seq, theta) and kernels.step_layout(x_seq) is not None

    def _state_fits(self, x: torch.Tensor, *state: torch.Tensor | None) -> bool:
        return all(s is not None and s.shape == x.shape and s.stride() == x.stride() and s.dtype == x.dtype
                   for s in state)

    _signed = False
    _neg_units: float | None = None

    def multi_step_pooled(self, x_seq: torch.Tensor, k: int) -> torch.Tensor | None:
        """T steps of this neuron followed by ``avg_pool2d(kernel_size=k, stride=k)``, fused (the spike
        maps are never materialised). Returns the pooled ``[T, B, C, H/k, W/k]``, or None if the fused
        kernel cannot take this input (the caller then runs :meth:`multi_step` and the pooling)."""
        theta = self._theta_for(x_seq[0])
        if not self._kernel_ok(x_seq, theta) or not kernels.pool_fusable(x_seq[0], k):
            return None
        v, count = self._kernel_state(x_seq[0], theta)
        out = kernels.neuron_pool_run(x_seq, theta, v, count, self._neg_units, k)
        self._set_state(v, count)
        return out

    def _set_state(self, v: torch.Tensor, count: torch.Tensor | None) -> None:
        self.v = v

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "single":
            return self.single_step(x)
        return self.multi_step(x)

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def multi_step(self, x_seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        theta = f"theta={self.theta.item():.4g}" if self.theta.dim() == 0 else f"theta=[{self.theta.numel()} channels]"
        return f"{theta}, v_init={self.v_init}, step_mode={self.step_mode!r}"


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire neuron, reset by subtraction (SPEC.md "IF neuron").

    ``m(t) = v(t−1) + I(t);  s(t) = H(m(t) − θ);  v(t) = m(t) − s(t)·θ``, output ``θ·s(t)``.
    With ``v_init = 0.5`` and a constant input z for T = L steps the output equals the threshold
    clipping function with λ = θ exactly (rounding instead of flooring).

    Args:
        theta: threshold θ (> 0), scalar or per-channel ``[C]``.
        v_init: initial membrane potential in units of θ (0.5 is the paper's θ/2).
        step_mode: ``"multi"`` or ``"single"``.
    """

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        theta = self._theta_for(x)
        if self._kernel_ok(x.unsqueeze(0), theta) and (self.v is None or self._state_fits(x, self.v)):
            if self.v is None:
                self.v, _ = self._kernel_state(x, theta)
            return kernels.neuron_run(x.unsqueeze(0), theta, self.v, None, None)[0]
        if self.v is None:
            self.v = self._initial_v(x, theta)
        out, self.v = SF.if_step(x, self.v, theta)
        return out

    def multi_step(self, x_seq: torch.Tensor) -> torch.Tensor:
        theta = self._theta_for(x_seq[0])
        if self._kernel_ok(x_seq, theta):
            v, _ = self._kernel_state(x_seq[0], theta)
            out = kernels.neuron_run(x_seq, theta, v, None, None)
        else:
            carried = self._carried(x_seq[0])
            v0 = carried[0] if carried else self._initial_v(x_seq[0], theta)
            out, v = SF.if_multistep(x_seq, theta, v0)
        self.v = v
        return out


class DualThresholdIFNeuron(SpikingNeuron):
    """Dual-threshold (signed) IF neuron (Liu et al., ICML 2025; SPEC.md "Dual-threshold neuron").

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

    def __init__(self, theta, v_init: float = 0.5, theta_neg: float = 0.0, step_mode: str = "multi"):
        super().__init__(theta, v_init, step_mode)
        if not theta_neg < 1.0:
            raise ConversionError(f"theta_neg (in units of theta) must be below 1 (the positive threshold), got {theta_neg}")
        self.theta_neg = float(theta_neg)
        self.count: torch.Tensor | None = None

    _signed = True

    @property
    def _neg_units(self) -> float:  # type: ignore[override]
        return self.theta_neg

    def reset(self) -> None:
        super().reset()
        self.count = None

    def _set_state(self, v: torch.Tensor, count: torch.Tensor | None) -> None:
        self.v, self.count = v, count

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        theta = self._theta_for(x)
        if self._kernel_ok(x.unsqueeze(0), theta) and (self.v is None or self._state_fits(x, self.v, self.count)):
            if self.v is None:
                self.v, self.count = self._kernel_state(x, theta)
            return kernels.neuron_run(x.unsqueeze(0), theta, self.v, self.count, self.theta_neg)[0]
        if self.v is None:
            self.v = self._initial_v(x, theta)
            self.count = torch.zeros_like(x)
        out, self.v, self.count = SF.dual_threshold_step(x, self.v, self.count, theta, theta * self.theta_neg)
        return out

    def multi_step(self, x_seq: torch.Tensor) -> torch.Tensor:
        theta = self._theta_for(x_seq[0])
        if self._kernel_ok(x_seq, theta):
            v, count = self._kernel_state(x_seq[0], theta)
            out = kernels.neuron_run(x_seq, theta, v, count, self.theta_neg)
            self.v, self.count = v, count
            return out
        carried = self._carried(x_seq[0])
        v0, c0 = carried if carried else (self._initial_v(x_seq[0], theta), torch.zeros_like(x_seq[0]))
        out, self.v, self.count = SF.dual_threshold_multistep(x_seq, theta, theta * self.theta_neg, v0, c0)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", theta_neg={self.theta_neg}"
