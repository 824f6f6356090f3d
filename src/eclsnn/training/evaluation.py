"""Scoring during training, on an evaluation set split across ranks (each rank scores its share of
:func:`~eclsnn.training.setup.eval_loader`, the sums are all-reduced, so every sample counts once).

:func:`evaluate` gives the ANN's loss and accuracy (the validation split after every epoch, the test
set at the end). :func:`evaluate_snn` gives the accuracy of the converted SNN at
``train.snn_time_steps``: with the SNN in the loop it is the score that picks the best checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from eclsnn.training.distributed import Dist
from eclsnn.training.precision import Precision

if TYPE_CHECKING:
    from eclsnn.training.spiking_loop import SpikingLoop

__all__ = ["evaluate", "evaluate_snn"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, ddp: Dist, device: torch.device,
             precision: Precision) -> tuple[float | None, float | None]:
    """Loss and accuracy over an evaluation set split across ranks (None if it is empty). ``model`` is
    the bare module: no DDP collectives, ranks may have different batch counts."""
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    model.eval()
    if loader is not None:
        for x, y in loader:
            with precision.autocast():
                out = model(precision.prepare_input(x))
            loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
            stats += torch.stack([loss.double(), (out.argmax(1) == y).sum().double(),
                                  torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    ddp.all_reduce(stats)
    if stats[2] == 0:
        return None, None
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


@torch.no_grad()
def evaluate_snn(model: nn.Module, loop: SpikingLoop, loader, ddp: Dist, device: torch.device) -> float | None:
    """Accuracy of the converted SNN at train.snn_time_steps over an evaluation set split across ranks."""
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # correct, count
    model.eval()
    if loader is not None:
        snn = loop.network()
        for x, y in loader:
            out = snn.run(x, loop.time_steps).mean(0)
            stats += torch.stack([(out.argmax(1) == y).sum().double(),
                                  torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    ddp.all_reduce(stats)
    return None if stats[1] == 0 else float(stats[0] / stats[1])
