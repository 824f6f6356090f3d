"""Running a spiking network: simulate a batch, evaluate a data set (the SNN at every t, and the ANN),
observe the neuron layers. The argument checks every entry point shares live here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from eclsnn.core.neurons import SpikingNeuron
from eclsnn.errors import SimulationError
from eclsnn.simulation.network import SpikingNetwork, check_time_steps

__all__ = ["simulate", "evaluate", "evaluate_ann", "observe_neurons", "check_input", "check_network"]


@contextlib.contextmanager
def observe_neurons(snn: SpikingNetwork, callback: Callable[[str, torch.Tensor, torch.Tensor], None]):
    """While active, ``callback(name, current, output)`` sees every neuron layer's multi-step update:
    its input current and its output ``θ·s(t)``, both ``[T, B, ...]`` (one call per sub-batch, in
    order). An observer of :meth:`SpikingNetwork.add_observer`: the network then runs unfused, so the
    output is the spike map itself."""

    def observer(name, node, x_seq, out):
        if isinstance(node, SpikingNeuron):
            callback(name, x_seq, out)

    handle = snn.add_observer(observer)
    try:
        yield
    finally:
        handle.remove()


def check_network(snn) -> SpikingNetwork:
    if not isinstance(snn, SpikingNetwork):
        raise SimulationError(
            f"expected a SpikingNetwork (the result of eclsnn.convert), got {type(snn).__name__}; convert the model first"
        )
    return snn


def check_input(x) -> torch.Tensor:
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
def simulate(snn: SpikingNetwork, x: torch.Tensor, time_steps: int, backend: str | None = None) -> torch.Tensor:
    """Run the spiking network on direct input ``x`` ``[B, ...]`` for ``time_steps`` steps.

    Returns ``[T, B, classes]``: at index t the mean of the readout over the first t+1 steps, so the
    accuracy at every t = 1…T comes from one run. State is reset at the start of the call.
    ``backend``: ``"auto"``, ``"reference"`` or ``"fused-cpu"`` (:mod:`eclsnn.core.backends`; None: the
    network's, else the default).
    """
    snn = check_network(snn)
    T = check_time_steps(time_steps)
    x = check_input(x)
    param = next(snn.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    mode = snn.step_mode
    try:
        if mode != "multi":
            snn.set_step_mode("multi")
        out = snn.run(x, T, backend=backend)
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


def evaluate(snn: SpikingNetwork, loader: Iterable, time_steps: int, progress: str | None = None,
             backend: str | None = None) -> dict[int, float]:
    """Accuracy of the spiking network at every t = 1…T, from one T-step run per batch.

    ``loader`` yields ``(x, y)`` batches. Returns ``{t: accuracy}`` (fractions). ``backend`` as in
    :func:`simulate`.
    """
    snn = check_network(snn)
    T = check_time_steps(time_steps)
    correct = torch.zeros(T, dtype=torch.long)
    total = 0
    for x, y in _progress(_batches(loader), progress, loader):
        out = simulate(snn, x, T, backend)
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
