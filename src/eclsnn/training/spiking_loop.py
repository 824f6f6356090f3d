"""Fine-tuning with the spiking network in the loop: train the ANN on its own SNN's activations.

After conversion, a spiking layer's rate at a small T differs from its clip function's output sample
by sample, even with θ/2 and the dual-threshold neuron: a neuron fires at most one spike a step, so
input that arrives late (0.2θ, then 1.6θ) loses a spike, and every layer downstream sees the result.
No per-layer constant corrects this (a bias correction on the validation split moved accuracy by
±0.2 points); the weights after the layer must learn to expect it.

:class:`SpikingLoop` does that, in the tandem-learning scheme of Wu et al. (IEEE TNNLS 2021): for each
batch the current ANN is converted (BN folded, θ = λ), the SNN runs ``time_steps`` steps on the batch,
and in the ANN's forward pass every ``ThresholdClip`` output is replaced by the matching spiking layer's
mean output (θ · net spikes / T), with the clip function's straight-through gradient. Every layer then
receives exactly the mean input current it has in the SNN (pooling, residual additions and the
readout are linear), so the loss is the SNN's own loss at T — its mean logits — and its gradient is
the ANN's. BatchNorm runs on its running statistics (``eval`` mode) so that the ANN computes what the
folded SNN computes; BN's affine parameters still learn.

In training it is ``train.snn_epochs``: the last that many of ``train.epochs`` run this way, on the
same optimizer (one cosine schedule, or one restarted from ``train.snn_lr``), so the budget in epochs
and optimizer steps stays that of a plain run; an in-the-loop epoch costs about 2.3× a plain one on
CPU. Which neuron, v_init and θ_neg it simulates come from the run's ``[convert]`` settings. Measured
in docs/METHOD.md: at the budgets tried there it does not beat training longer, so it is off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from eclsnn.core.clip import ThresholdClip
from eclsnn.conversion.converter import convert
from eclsnn.errors import EclsnnError, SpikingLoopError
from eclsnn.simulation import SpikingNetwork, check_time_steps, observe_neurons

__all__ = ["SpikingLoop", "SpikingLoopError", "layer_rates"]


@torch.no_grad()
def layer_rates(snn: SpikingNetwork, x: torch.Tensor, time_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``snn`` on ``x`` for ``time_steps`` steps; returns its readout averaged over the steps
    ``[B, classes]`` and, by neuron layer name, each layer's mean output over the steps (θ times the
    net spike count over T), shaped like the layer's ANN activation."""
    T = check_time_steps(time_steps)
    sums: dict[str, list[torch.Tensor]] = {name: [] for name, _ in snn.neurons()}
    with observe_neurons(snn, lambda name, _, out: sums[name].append(out.sum(0))), \
            torch.autocast(x.device.type, enabled=False):
        out = snn.run(x, T)
    rates = {name: torch.cat(parts).div_(T) for name, parts in sums.items()}  # sub-batches in order
    return out.mean(0), rates


class SpikingLoop:
    """Forward passes of ``model`` whose activations are those of its spiking network at ``time_steps``.

    ``loop(net, x)`` converts ``model`` (with ``convert_kwargs``, e.g. ``neuron``, ``v_init``,
    ``theta_neg``), simulates the batch and returns ``net(x)`` with every ``ThresholdClip`` output
    replaced by the spiking layer's rate (straight-through gradient). ``net`` is ``model`` or a
    wrapper of it (DistributedDataParallel); put it in ``eval`` mode first so BatchNorm uses the
    running statistics the SNN folds in.
    """

    def __init__(self, model: nn.Module, time_steps: int = 2, **convert_kwargs):
        self.model = model
        self.time_steps = check_time_steps(time_steps)
        self.convert_kwargs = convert_kwargs
        self.clips = {name: m for name, m in model.named_modules() if isinstance(m, ThresholdClip)}
        others = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
        if not self.clips or others:
            raise SpikingLoopError(
                "training with the SNN in the loop needs a network whose activations are all ThresholdClip "
                f"(found {len(self.clips)} ThresholdClip and {len(others)} ReLU modules); train with "
                "model.activation = \"clip\", or start from a ReLU network with train.init_from"
            )

    def network(self) -> SpikingNetwork:
        """The SNN of the model as it is now."""
        snn = convert(self.model, step_mode="multi", **self.convert_kwargs)
        names = {name for name, _ in snn.neurons()}
        if names != set(self.clips):
            raise SpikingLoopError(
                f"the spiking network's neuron layers {sorted(names)} do not match the ThresholdClip modules "
                f"{sorted(self.clips)}; every activation must be its own module, called once per forward pass"
            )
        return snn

    @torch.no_grad()
    def rates(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SNN's mean readout and per-layer rates on ``x`` (see :func:`layer_rates`)."""
        return layer_rates(self.network(), x, self.time_steps)

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _, rates = self.rates(x)
        used: set[str] = set()

        def substitute(name):
            def hook(module, inputs, out):
                if name in used:
                    raise SpikingLoopError(f"activation module {name!r} is called twice in one forward pass; give "
                                           "each layer its own ThresholdClip to train with the SNN in the loop")
                used.add(name)
                rate = rates[name]
                if rate.shape != out.shape:
                    raise SpikingLoopError(f"the spiking layer {name!r} has output shape {tuple(rate.shape)} but the "
                                           f"ANN activation {tuple(out.shape)}")
                return out + (rate.to(out.dtype) - out).detach()
            return hook

        handles = [m.register_forward_hook(substitute(name)) for name, m in self.clips.items()]
        try:
            return net(x)
        finally:
            for h in handles:
                h.remove()
