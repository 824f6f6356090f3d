"""Numerics of the training and evaluation steps: mixed precision and the input memory layout.

AMP runs on CUDA only: bf16 where the device supports it, else fp16 with a GradScaler (a no-op
scaler otherwise, so the step is written once). ``train.channels_last`` puts 4-d inputs in NHWC.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from eclsnn.config import TrainConfig

__all__ = ["Precision"]


@dataclass
class Precision:
    amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    scaler: torch.amp.GradScaler

    @classmethod
    def from_config(cls, t: TrainConfig, cuda: bool) -> Precision:
        amp = bool(t.amp and cuda)
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        return cls(amp, amp_dtype, t.channels_last, scaler)

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return nullcontext()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        """``", AMP bfloat16"`` (for the start line of a run), or ``""`` without AMP."""
        return ", AMP " + str(self.amp_dtype).replace("torch.", "") if self.amp else ""
