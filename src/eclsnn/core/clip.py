"""The learnable threshold clipping function as a module, a drop-in replacement for ``nn.ReLU``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from eclsnn.errors import ConfigError
from eclsnn.core.functional import LAMBDA_MIN, check_levels, threshold_clip
from eclsnn._util import DEFAULT_INIT_THRESHOLD

__all__ = ["ThresholdClip", "channel_view"]


def channel_view(param: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector ``[C]`` to broadcast over ``[B, C, ...]`` of ``ndim`` dims (a
    0-dim tensor is returned as it is)."""
    if param.dim() == 0:
        return param
    return param.view(param.shape[0], *([1] * (ndim - 2)))


class ThresholdClip(LazyModuleMixin, nn.Module):
    """Learnable threshold clipping function (Liu et al., ICML 2025; QCFS form, Bu et al., ICLR 2022).

    ``h(z) = λ · clamp(floor(z·L/λ + 1/2)/L, 0, 1)`` with a trainable threshold λ that becomes the
    spiking threshold θ on conversion. Use it wherever ``nn.ReLU`` would go.

    Args:
        levels: number of quantisation levels L (the ANN then has L+1 output levels); ``None`` or 0
            gives the plain learnable clip ``clamp(z, 0, λ)``.
        init_threshold: initial λ.
        per_channel: one λ per channel (dim 1 of the input) instead of one per layer.
        num_channels: number of channels for ``per_channel``; if omitted it is taken from the first
            input (run one forward pass before building the optimizer).
        shift: ψ in the formula; 1/2 is the paper's choice (rounding), 0 the floor version.

    λ stays positive: the forward pass uses ``max(λ, LAMBDA_MIN)`` while the straight-through gradient
    still reaches the parameter.
    """

    cls_to_become = None  # stay a ThresholdClip after lazy initialisation

    def __init__(
        self,
        levels: int | None = 4,
        init_threshold: float = DEFAULT_INIT_THRESHOLD,
        per_channel: bool = False,
        num_channels: int | None = None,
        shift: float = 0.5,
    ):
        super().__init__()
        levels = check_levels(levels)
        if not init_threshold > 0:
            raise ConfigError(f"init_threshold must be positive, got {init_threshold!r}")
        self.levels = int(levels) if levels else None
        self.init_threshold = float(init_threshold)
        self.per_channel = bool(per_channel)
        self.shift = float(shift)
        #: the backend of the forward and backward pass (:mod:`eclsnn.core.backends`; None: the default)
        self.backend: str | None = None
        if not self.per_channel:
            self.threshold_raw = nn.Parameter(torch.tensor(self.init_threshold))
        elif num_channels is not None:
            self.threshold_raw = nn.Parameter(torch.full((int(num_channels),), self.init_threshold))
        else:
            self.threshold_raw = nn.parameter.UninitializedParameter()

    def initialize_parameters(self, z: torch.Tensor) -> None:  # LazyModuleMixin hook
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.threshold_raw.materialize((z.shape[1],), device=z.device, dtype=torch.float32)
                self.threshold_raw.fill_(self.init_threshold)

    @property
    def threshold(self) -> torch.Tensor:
        """The effective λ (what the forward pass uses, and θ after conversion); detached."""
        return self.threshold_raw.detach().clamp(min=LAMBDA_MIN)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return threshold_clip(z, channel_view(self.threshold_raw, z.dim()), self.levels, self.shift, self.backend)

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_layer"
        return f"levels={self.levels}, {kind}, shift={self.shift}"
