"""Activation statistics on calibration data: the thresholds of the classic data-based conversion
("robust normalisation", Rueckauer et al. 2017) and the initial λ of :func:`eclsnn.prepare`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from eclsnn.errors import ConversionError

__all__ = ["iter_calibration_batches", "ActivationStatistics"]

#: the rules for θ of ReLU layers from calibration data
THRESHOLD_RULES = ("max", "percentile")
_GRANULARITIES = ("layer", "channel")


def iter_calibration_batches(calibration, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield input batches from a tensor ``[N, ...]`` or an iterable of tensors / ``(x, y)`` pairs."""
    if torch.is_tensor(calibration):
        if calibration.shape[0] == 0:
            raise ConversionError("calibration data is empty; pass at least one sample")
        yield from calibration.split(batch_size)
        return
    if not isinstance(calibration, Iterable):
        raise ConversionError(
            f"calibration must be a tensor or an iterable of batches (e.g. a DataLoader), got {type(calibration).__name__}"
        )
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.is_tensor(x):
            raise ConversionError(f"calibration batches must be tensors or (x, y) pairs, got {type(x).__name__}")
        yield x


def _kth_largest_fraction(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """Percentile along the last dim by ``kthvalue`` (``torch.quantile`` refuses > 16M elements)."""
    n = values.shape[-1]
    k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    return values.float().kthvalue(k, dim=-1).values


class ActivationStatistics:
    """Collects, by forward hooks, the max or a percentile of the outputs of chosen modules.

    ``rule="max"`` keeps the running maximum; ``rule="percentile"`` takes the percentile of each
    batch and averages it over batches (a per-batch statistic keeps memory bounded; with a few
    batches of a few hundred images it is within noise of the pooled percentile).
    ``granularity="channel"`` gives one value per channel (dim 1).
    """

    def __init__(self, modules: dict[str, nn.Module], rule: str = "max", percentile: float = 99.9, granularity: str = "layer"):
        if rule not in THRESHOLD_RULES:
            raise ConversionError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {rule!r}")
        if granularity not in _GRANULARITIES:
            raise ConversionError(f"threshold granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise ConversionError(f"percentile must be in (0, 100], got {percentile!r}")
        self.rule, self.percentile, self.granularity = rule, float(percentile), granularity
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, _inputs, out):
            out = out.detach()
            flat = out.transpose(0, 1).reshape(out.shape[1], -1) if self.granularity == "channel" else out.reshape(1, -1)
            if self.rule == "max":
                value = flat.float().amax(dim=-1)
                prev = self._sums.get(name)
                self._sums[name] = value if prev is None else torch.maximum(prev, value)
            else:
                value = _kth_largest_fraction(flat, self.percentile)
                self._sums[name] = self._sums.get(name, 0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def values(self) -> dict[str, torch.Tensor]:
        """Per module: a 0-dim tensor (layer) or ``[C]`` (channel)."""
        out = {}
        for name, total in self._sums.items():
            v = total if self.rule == "max" else total / self._counts[name]
            out[name] = v.squeeze(0) if self.granularity == "layer" else v
        return out

    @torch.no_grad()
    def run(self, model: nn.Module, calibration, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Feed the calibration data through ``model`` and return :meth:`values`."""
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        seen = 0
        try:
            for x in iter_calibration_batches(calibration):
                if not torch.isfinite(x).all():
                    raise ConversionError("calibration data contains NaN or infinite values")
                try:
                    model(x.to(device=device, dtype=dtype) if device is not None else x.to(dtype))
                except RuntimeError as exc:
                    raise ConversionError(
                        f"the model could not run on calibration data of shape {tuple(x.shape)}: "
                        f"{str(exc).splitlines()[0]}; pass inputs of the size and channel count it was trained on"
                    ) from None
                seen += x.shape[0]
        finally:
            self.close()
        if seen == 0:
            raise ConversionError("calibration data is empty; pass at least one batch")
        return self.values()
