"""Backends: who runs the neuron updates and the clipping function, resolved in one place.

:func:`resolve` turns a requested name (or None: the default, see :mod:`.selection`) into the backend
name a call runs on, and :func:`use_fused_cpu` is the one dispatch rule, asked by the clip and by the
neurons alike: do the fused CPU kernels (:mod:`.cpu`) take this call? Adding a backend (a CUDA one)
means a name in :data:`BACKENDS`, a module beside :mod:`.cpu`, and a rule here.
"""

from __future__ import annotations

import torch

from eclsnn.core.backends import cpu
from eclsnn.core.backends.selection import BACKENDS, check_backend, default_backend, reference_only, use_backend
from eclsnn.errors import BackendError

__all__ = ["BACKENDS", "resolve", "use_fused_cpu", "use_backend", "reference_only", "default_backend", "cpu"]


def resolve(backend: str | None = None) -> str:
    """The backend a call runs on: ``backend`` if given, else the default; checked."""
    return check_backend(default_backend() if backend is None else backend)


def use_fused_cpu(backend: str | None, data: torch.Tensor, param: torch.Tensor, autograd: bool = False) -> bool:
    """Whether the fused CPU kernels run an op on ``data`` (one step of the neurons' input, or the
    clip's input) with ``param`` (θ or λ: a scalar or one value per channel of dim 1) under ``backend``
    (a name or None).

    Never with ``"reference"``; never when the op needs autograd the kernel lacks (``autograd``);
    otherwise when ``data`` is a non-empty dense CPU tensor of float32/float64 and ``param`` a CPU
    tensor of one value or one per channel, and the kernels are built. ``"fused-cpu"`` makes a failed
    build a BackendError; ``"auto"`` then warns once and uses the reference path.
    """
    name = resolve(backend)
    if name == "reference" or autograd:
        return False
    if data.device.type != "cpu" or data.dtype not in (torch.float32, torch.float64) or data.numel() == 0:
        return False
    if param.device.type != "cpu" or (param.numel() != 1 and (data.dim() < 2 or param.numel() != data.shape[1])):
        return False
    if not cpu.is_dense(data):
        return False
    if name == "fused-cpu":
        if not cpu.built(warn=False):
            raise BackendError(f"the backend 'fused-cpu' was chosen but the fused CPU kernels could not be built: "
                               f"{cpu.build_error()}; install a C compiler (gcc) or choose the backend 'auto'")
        return True
    return cpu.built()
