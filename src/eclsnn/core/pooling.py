"""The spiking max pool (``maxpool="cummax"``, docs/METHOD.md, "Max pooling").

Its input is a spike train ``θ·s(t)`` of one neuron layer (or a channel concatenation of several, each
with its own θ). With ``C_t`` the cumulative spike count of every input unit (an integer), it emits

    out_t = θ · (maxpool(C_t) − maxpool(C_{t−1})),   C_0 = 0,

so that ``Σ_t out_t = θ·maxpool(C_T)`` exactly: after T steps the pool has passed the maximum of its
inputs' counts, which is what the ANN's max pool of the rate-coded activations is to the SNN. Each
unit's count moves by at most 1 per step, so every increment lies in {−1, 0, 1}·θ (in {0, 1}·θ for
IF inputs): the output is still a spike train. Counts are kept as integers (``int32``): a float
running sum of ``θ·s`` with θ = 0.3 drifts by an ulp and would emit phantom outputs.

The count map is the node's state (:mod:`eclsnn.core.state`), so single- and multi-step runs,
carried state and adaptive latency (dropping finished rows) work as for the neurons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eclsnn.core.clip import channel_view
from eclsnn.core.state import StatefulModule
from eclsnn.errors import ConversionError, SimulationError

__all__ = ["SpikingMaxPool"]


def _tuple(v, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


class SpikingMaxPool(StatefulModule):
    """Max pooling of cumulative spike counts (see the module docstring).

    Args:
        theta: θ of the input spikes: a scalar, or ``[C]`` (one per input channel).
        kernel_size, stride, padding, ceil_mode: as ``nn.MaxPool1d``/``nn.MaxPool2d`` (no dilation).
        dims: 1 or 2 spatial dimensions.
        step_mode: ``"multi"`` (``[T, B, ...]`` per call, fresh state) or ``"single"`` (one step).
    """

    state_names = ("count",)
    emits_spikes = True

    def __init__(self, theta, kernel_size, stride=None, padding=0, ceil_mode: bool = False, dims: int = 2,
                 step_mode: str = "multi"):
        super().__init__()
        if dims not in (1, 2):
            raise ConversionError(f"the spiking max pool has 1 or 2 spatial dimensions, got {dims}")
        theta = torch.as_tensor(theta, dtype=torch.float32).detach().clone().flatten()
        theta = theta.reshape(()) if theta.numel() == 1 else theta
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            raise ConversionError(f"theta of a spiking max pool must be finite and positive, got {theta}")
        self.register_buffer("theta", theta)
        self.dims = dims
        self.kernel_size = _tuple(kernel_size, dims)
        self.stride = _tuple(stride if stride not in (None, (), []) else kernel_size, dims)
        self.padding = _tuple(padding, dims)
        self.ceil_mode = bool(ceil_mode)
        self.step_mode = step_mode
        self.count: torch.Tensor | None = None

    # -- the pooling of counts -----------------------------------------------------------------------
    def _pool(self, counts: torch.Tensor) -> torch.Tensor:
        if self.dims == 2:
            return F.max_pool2d(counts, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)
        # 1-d as a 1×k 2-d pool (torch's 1-d max pool has no integer kernel)
        out = F.max_pool2d(counts.unsqueeze(-2), (1, *self.kernel_size), (1, *self.stride), (0, *self.padding),
                           ceil_mode=self.ceil_mode)
        return out.squeeze(-2)

    def _pool_float(self, x: torch.Tensor) -> torch.Tensor:
        """This pool's window over real values (the analysis compares rates with it)."""
        return self._pool(x)

    def _units(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ shaped like one step ``x``, the integer spike counts ``x / θ``)."""
        if self.theta.dim() == 1 and (x.dim() < 2 or x.shape[1] != self.theta.numel()):
            raise SimulationError(f"the spiking max pool has θ for {self.theta.numel()} channels, got input of shape "
                                  f"{tuple(x.shape)}")
        theta = channel_view(self.theta.to(x.dtype), x.dim())
        s = torch.round(x / theta)
        return theta, s.to(torch.int32)

    def _start(self, y: torch.Tensor, carry: bool) -> torch.Tensor:
        if carry and self.count is not None:
            if self.count.shape != y.shape:
                raise SimulationError(f"cannot continue the state {tuple(self.count.shape)} with input of shape "
                                      f"{tuple(y.shape)}; reset() the network first")
            return self.count
        return torch.zeros(y.shape, dtype=torch.int32, device=y.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single_step(x) if self.step_mode == "single" else self.multi_step(x)

    def multi_step(self, x_seq: torch.Tensor, carry: bool = False, backend: str | None = None) -> torch.Tensor:
        """T steps ``[T, B, C, ...]`` of input spikes → ``[T, B, C, ...']`` pooled increments. ``backend``
        is accepted for the protocol; there is one implementation."""
        T = x_seq.shape[0]
        theta, s = self._units(x_seq.flatten(0, 1))
        s = s.view(x_seq.shape)
        start = self._start(x_seq[0], carry)
        counts = torch.cumsum(s, 0, dtype=torch.int32) + start
        pooled = self._pool(torch.cat([start.unsqueeze(0), counts]).flatten(0, 1))
        pooled = pooled.view(T + 1, x_seq.shape[1], *pooled.shape[1:])
        self.count = counts[-1]
        return (pooled[1:] - pooled[:-1]).to(x_seq.dtype) * theta

    def single_step(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        theta, s = self._units(x)
        start = self._start(x, carry=True)
        count = start + s
        self.count = count
        return (self._pool(count) - self._pool(start)).to(x.dtype) * theta

    def extra_repr(self) -> str:
        theta = f"theta={self.theta.item():.4g}" if self.theta.dim() == 0 else f"theta=[{self.theta.numel()} channels]"
        return (f"{theta}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")
