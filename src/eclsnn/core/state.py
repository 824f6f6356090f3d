"""The state protocol of stateful simulation nodes.

A node of a spiking network that carries state from one time step to the next (the neurons today; a
spiking max pool is the next) derives from :class:`StatefulModule`. The simulator, adaptive-latency
inference and the analysis find such nodes with :func:`is_stateful` and handle their state only
through these four methods, never through the node's tensors:

- :meth:`~StatefulModule.state` — the current state, a dict of tensors (``None`` entries before the
  first step);
- :meth:`~StatefulModule.load_state` — continue from a state returned by :meth:`state`;
- :meth:`~StatefulModule.keep_rows` — keep only the samples ``keep`` (a boolean mask or index over the
  batch dimension), e.g. when finished samples leave the batch;
- :meth:`~StatefulModule.reset` — forget the state: the next step starts afresh.

A stateful node also runs T steps at once, ``multi_step(x_seq, carry=False, backend=None)``
(``x_seq`` ``[T, B, ...]``; ``carry`` continues from the current state instead of starting afresh;
``backend`` a name of :mod:`eclsnn.core.backends`) and one step, ``single_step(x, backend=None)``.
Optionally, ``multi_step_sum(x_seq, addend, carry=False, backend=None)`` runs ``multi_step`` on
``x_seq + addend`` without storing the sum, or returns None where it cannot (the simulator then adds
first); its results must be identical to adding first.
:attr:`~StatefulModule.emits_spikes` says whether its output is a spike train (``θ·s`` with
``s`` ∈ {−1, 0, 1}), which the operation counts of the analysis rely on.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StatefulModule", "is_stateful"]


class StatefulModule(nn.Module):
    """Base class of stateful nodes. Subclasses list their state tensors in :attr:`state_names` and keep
    each as an attribute of that name (``None`` when there is no state yet)."""

    #: the names of the state tensors, in order
    state_names: tuple[str, ...] = ()
    #: whether the output is a (signed) spike train times a threshold
    emits_spikes: bool = True

    def state(self) -> dict[str, torch.Tensor | None]:
        """The current state by name (the tensors themselves, not copies)."""
        return {name: getattr(self, name) for name in self.state_names}

    def load_state(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from ``state`` (as returned by :meth:`state`)."""
        unknown = set(state) - set(self.state_names)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no state {sorted(unknown)}; its state is {list(self.state_names)}")
        for name in self.state_names:
            setattr(self, name, state.get(name))

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep the state of the samples ``keep`` only (rows of the batch dimension)."""
        for name in self.state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])

    def reset(self) -> None:
        """Forget the state; the next step starts afresh."""
        for name in self.state_names:
            setattr(self, name, None)

    def has_state(self) -> bool:
        return any(getattr(self, name) is not None for name in self.state_names)


def is_stateful(module) -> bool:
    """Whether ``module`` is a stateful node (follows the state protocol)."""
    return isinstance(module, StatefulModule)
