"""Which backend runs the neuron updates and the clipping function: the names and the default.

A backend is chosen by name: ``"auto"`` (the fused CPU kernels where they apply, else the PyTorch
reference; kernels that cannot be built give a warning and the reference path), ``"reference"`` (the
PyTorch reference path everywhere) or ``"fused-cpu"`` (the fused CPU kernels where they apply; a
failed build is an error). The CPU kernels apply to CPU tensors of float32/float64 in a dense layout
that need no autograd through the op (the clip has a kernel backward pass, the neurons do not); every
other case runs on the reference path, whatever the backend. A CUDA backend would be one more name.

The choice, most specific first: the argument of the call (``simulate(..., backend=)``,
``SpikingNetwork.run``), the network's :attr:`~eclsnn.simulation.SpikingNetwork.backend`, the
innermost :func:`use_backend` block, and last the environment variable ``ECLSNN_KERNELS``
(``off`` → ``"reference"``, ``on`` → ``"fused-cpu"``, anything else → ``"auto"``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from eclsnn.errors import BackendError

__all__ = ["BACKENDS", "default_backend", "use_backend", "reference_only", "check_backend"]

#: the backend names (the first is the default)
BACKENDS = ("auto", "reference", "fused-cpu")

_ENV_NAMES = {"off": "reference", "0": "reference", "false": "reference", "no": "reference",
              "on": "fused-cpu", "1": "fused-cpu", "true": "fused-cpu", "yes": "fused-cpu"}

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("eclsnn_backend", default=None)


def check_backend(name) -> str:
    """``name`` if it is a backend name, else a BackendError listing them."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return name


def env_backend() -> str:
    """The backend the environment variable ``ECLSNN_KERNELS`` names (``"auto"`` when unset)."""
    return _ENV_NAMES.get(os.environ.get("ECLSNN_KERNELS", "auto").strip().lower(), "auto")


def default_backend() -> str:
    """The backend of calls that name none: the innermost :func:`use_backend` block, else the
    environment variable."""
    chosen = _chosen.get()
    return chosen if chosen is not None else env_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, calls and networks that name no backend use ``name``."""
    token = _chosen.set(check_backend(name))
    try:
        yield
    finally:
        _chosen.reset(token)


def reference_only():
    """``use_backend("reference")``: run everything inside on the PyTorch reference path."""
    return use_backend("reference")
