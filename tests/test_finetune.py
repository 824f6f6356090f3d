"""Training with the converted SNN in the loop (eclsnn.training.spiking_loop): the forward pass carries the SNN's
own rates, the gradient is the clip function's, and the trainer runs the last epochs that way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import eclsnn
from eclsnn.training.trainer import train
from eclsnn.data import BatchLoader, load_dataset, split_train_val
from eclsnn.io.checkpoint import build_model, load_checkpoint
from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConfigError
from eclsnn.training.spiking_loop import SpikingLoop, SpikingLoopError, layer_rates
from eclsnn.models import create

from test_train import metrics, needs_data, tiny


def _cnn(per_channel: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create("cnn-fmnist", num_classes=10, levels=2, init_threshold=1.0, per_channel=per_channel)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.momentum = None  # running statistics = plain averages: BN outputs of unit scale, as after training
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


def _toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), ThresholdClip(levels=2, init_threshold=1.0), nn.Linear(16, 16),
                          ThresholdClip(levels=2, init_threshold=1.0), nn.Linear(16, 3)).eval()
    with torch.no_grad():  # layer 2's input per step then leaves [-θ, θ], where arrival order matters
        model[2].weight.mul_(4)
    return model


@pytest.mark.parametrize("neuron", ["dual", "if"])
@pytest.mark.parametrize("T", [1, 2, 3])
def test_layer_rates_are_spike_counts_and_the_readout_is_the_simulation(neuron, T):
    model = _cnn()
    snn = eclsnn.convert(model, neuron=neuron)
    x = torch.randn(12, 1, 28, 28)
    readout, rates = layer_rates(snn, x, T)
    assert torch.allclose(readout, eclsnn.simulate(snn, x, T)[-1], atol=1e-6)
    assert set(rates) == {name for name, _ in snn.neurons()}
    fired = 0
    for name, neuron_layer in snn.neurons():
        theta = neuron_layer.theta
        counts = rates[name] * T / theta
        assert torch.allclose(counts, counts.round(), atol=1e-4), name  # θ · (integer net count) / T
        assert counts.min() >= -1e-4 and counts.max() <= T + 1e-4, name  # net counts in [0, T]
        fired += int((counts > 0.5).sum())
    assert fired > 0


def test_layer_rates_do_not_depend_on_sub_batches():
    snn = eclsnn.convert(_cnn())
    x = torch.randn(10, 1, 28, 28)
    snn.max_rows = None
    whole = layer_rates(snn, x, 2)
    snn.max_rows = 6  # sub-batches of 3 samples
    parts = layer_rates(snn, x, 2)
    assert torch.allclose(whole[0], parts[0], atol=1e-5)  # convolutions of other batch sizes round differently
    for name in whole[1]:
        assert torch.equal(whole[1][name], parts[1][name]), name


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("neuron", ["dual", "if"])
def test_the_loop_forward_is_the_snn_readout(per_channel, neuron):
    model = _cnn(per_channel)
    x = torch.randn(12, 1, 28, 28)
    loop = SpikingLoop(model, 2, neuron=neuron)
    logits = loop(model, x)
    snn_logits = eclsnn.simulate(eclsnn.convert(model, neuron=neuron), x, 2)[-1]
    assert torch.allclose(logits, snn_logits, atol=1e-4)
    assert not torch.allclose(logits, model(x), atol=1e-3)  # the SNN at T=2 is not the ANN here
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    lam = [m.threshold_raw.grad for m in model.modules() if isinstance(m, ThresholdClip)]
    assert all(g.abs().sum() > 0 for g in lam)  # λ learns from the SNN's loss


def test_the_gradient_is_the_clip_functions_at_the_snn_activations():
    model = _toy()
    x = torch.randn(64, 6) * 2
    loop = SpikingLoop(model, 2)
    _, rates = loop.rates(x)
    # layer 1 gets the same input every step: with θ/2 and T = L its rate is the ANN's exactly
    assert torch.allclose(rates["1"], model[1](model[0](x)), atol=1e-6)
    r = rates["3"]
    assert not torch.allclose(r, model[:4](x), atol=1e-3)  # layer 2's input varies over the steps
    loop(model, x).sum().backward()
    w1, w3 = model[0].weight.grad.clone(), model[4].weight.grad.clone()
    # out = W3·r + b3: d(sum out)/dW3[j] = Σ_b r_b
    assert torch.allclose(w3, r.sum(0).expand_as(w3), atol=1e-5)
    model.zero_grad()
    model(x).sum().backward()
    # straight through: dh/dz depends on z and λ only, and every z up to layer 2 is the same in both passes
    assert torch.allclose(w1, model[0].weight.grad, atol=1e-5)
    assert not torch.allclose(w3, model[4].weight.grad, atol=1e-3)  # the activations of layer 2 differ


def test_the_loop_rejects_networks_it_cannot_train():
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SpikingLoopError, match="all ThresholdClip"):
        SpikingLoop(relu)
    mixed = nn.Sequential(nn.Linear(4, 4), ThresholdClip(levels=2), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SpikingLoopError, match="1 ReLU"):
        SpikingLoop(mixed)

    class Shared(nn.Module):  # one activation module used by two layers
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.act = ThresholdClip(levels=2, init_threshold=1.0)

        def forward(self, x):
            return self.out(self.act(self.b(self.act(self.a(x)))))

    with pytest.raises(SpikingLoopError, match="called twice|do not match"):
        SpikingLoop(Shared().eval())(Shared().eval(), torch.randn(3, 4))


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="snn_epochs"):
        tiny(tmp_path, train__snn_epochs=3)  # more than train.epochs = 2
    with pytest.raises(ConfigError, match="model.activation"):
        tiny(tmp_path, train__snn_epochs=1, model__activation="relu")
    with pytest.raises(ConfigError, match="snn_time_steps"):
        tiny(tmp_path, train__snn_epochs=1, train__snn_time_steps=0)


@needs_data
def test_training_runs_the_last_epochs_with_the_snn_in_the_loop(tmp_path):
    # one plain epoch, then resume with one more epoch in the loop
    first = train(tiny(tmp_path, train__epochs=1, model__levels=2))
    saved = tmp_path / "epoch1"
    shutil.copytree(first / "checkpoints" / "last", saved)
    run = train(tiny(tmp_path, train__epochs=2, train__snn_epochs=1, train__resume=True, model__levels=2))
    rows = metrics(run)
    assert "val_snn_acc" not in rows[0]
    assert rows[1]["snn_time_steps"] == 2
    # the logged SNN accuracy is the saved network's, converted with the run's settings and simulated at
    # T = 2 on the validation split (to one image: the trainer averages the steps its own way); it follows
    # the ANN's validation accuracy and is far above chance (0.1; measured 0.32, ANN 0.33)
    ckpt = load_checkpoint(run / "checkpoints" / "last")
    c = ckpt.meta["config"]["convert"]
    snn = eclsnn.convert(build_model(ckpt), neuron=c["neuron"], v_init=c["v_init"], theta_neg=c["theta_neg"],
                         maxpool=c["maxpool"])
    data = load_dataset("fashion-mnist", train=True)
    _, val_idx = split_train_val(len(data), 0.005, 0)
    correct = 0
    with torch.no_grad():
        for x, y in BatchLoader(data, val_idx, batch_size=len(val_idx)):
            correct += int((eclsnn.simulate(snn, x, 2)[-1].argmax(1) == y).sum())
    assert abs(correct / len(val_idx) - rows[1]["val_snn_acc"]) <= 1.01 / len(val_idx), (correct, rows[1])
    assert rows[1]["val_snn_acc"] >= max(0.25, rows[1]["val_acc"] - 0.05), rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_by"].startswith("val_snn_acc") and summary["best_epoch"] == 2
    before, after = load_checkpoint(saved).state_dict, load_checkpoint(run / "checkpoints" / "last").state_dict
    buffers = [k for k in before if "running_" in k]
    assert buffers and all(torch.equal(before[k], after[k]) for k in buffers)  # BN statistics frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # but it learned


def test_the_in_the_loop_epochs_can_restart_the_schedule():
    from eclsnn.config import load_config
    from eclsnn.training.trainer import lr_lambda, schedule_factor

    one = load_config(None, {"train.epochs": 5, "train.snn_epochs": 1}).train
    two = load_config(None, {"train.epochs": 5, "train.snn_epochs": 1, "train.snn_lr": 0.01}).train
    for step in (0, 100, 399, 400, 450, 499):
        assert schedule_factor(step, 100, one) == pytest.approx(lr_lambda(step, 0, 500))
    for step in (0, 200, 399):  # the plain epochs: the schedule of a plain 4-epoch run
        assert schedule_factor(step, 100, two) == pytest.approx(lr_lambda(step, 0, 400))
    assert schedule_factor(400, 100, two) == pytest.approx(0.1)  # restarts at snn_lr / lr
    assert schedule_factor(450, 100, two) == pytest.approx(0.05)
    assert schedule_factor(500, 100, two) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="warmup"):
        load_config(None, {"train.epochs": 2, "train.snn_epochs": 2, "train.snn_lr": 0.01, "train.warmup_epochs": 1})
