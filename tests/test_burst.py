"""The burst (graded-spike) dual-threshold neuron: its count law for any input order, the state protocol,
and the network identity it gives — a network of burst neurons at T steps computes, on time-averaged
values, exactly its ANN with every clip at L = T (docs/METHOD.md, "Burst neuron")."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import eclsnn
from eclsnn import BurstNeuron, ConversionError, ThresholdClip
from eclsnn.io.export import export_npz
from eclsnn.io.nir_export import to_nir
from eclsnn.models import create
from eclsnn.simulation import observe_neurons


@given(st.integers(1, 8), st.lists(st.integers(-40, 40), min_size=8, max_size=8), st.sampled_from([0.25, 0.75, 2.0]))
def test_net_count_is_the_rounded_clipped_sum_for_any_input_order(T, quarters, theta):
    # inputs far outside [−θ, θ] a step (where the one-spike dual neuron loses or delays spikes); dyadic
    # values, so that the sums below are exact
    x = torch.tensor(quarters[:T], dtype=torch.float64).mul(theta / 4).reshape(T, 1)
    out = BurstNeuron(torch.tensor(theta, dtype=torch.float64))(x)
    n = out / theta
    assert torch.equal(n, n.round())  # whole spikes, possibly several a step
    counts = n.cumsum(0).squeeze(1)
    steps = torch.arange(1, T + 1, dtype=torch.float64)
    assert (counts >= 0).all() and (counts <= steps).all()  # never retracts more than it fired; rate ≤ θ
    expected = min(max(int(torch.floor(x.sum() / theta + 0.5)), 0), T)
    assert counts[-1].item() == expected


def test_the_dual_neuron_fails_that_law_where_a_step_holds_more_than_theta():
    x = torch.tensor([[0.0], [2.0]])  # [0, 2θ]: the dual neuron fires once, the sum asks for two
    assert eclsnn.DualThresholdIFNeuron(1.0)(x).sum().item() == 1.0
    assert BurstNeuron(1.0)(x).sum().item() == 2.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_single_step_carried_and_multi_step_agree(per_channel):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 3, 5, 5, generator=g) * 2
    theta = torch.tensor([0.5, 1.0, 2.0]) if per_channel else 0.75
    multi = BurstNeuron(theta)(x)
    single = BurstNeuron(theta, step_mode="single")
    assert torch.equal(multi, torch.stack([single(x[t]) for t in range(6)]))
    carried = BurstNeuron(theta)
    first = carried.multi_step(x[:2])
    assert torch.equal(torch.cat([first, carried.multi_step(x[2:], carry=True)]), multi)
    assert set(carried.state()) == {"v", "count", "steps"}
    rows = BurstNeuron(theta)
    rows.multi_step(x[:3])
    rows.keep_rows(torch.tensor([0, 2]))
    assert torch.equal(rows.multi_step(x[3:, [0, 2]], carry=True), multi[3:, [0, 2]])


def _random_resnet(levels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_channels=1, levels=levels).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, ThresholdClip):
                mod.threshold_raw.uniform_(0.5, 2.0)
    return model.double()


def _at_levels(model: torch.nn.Module, levels: int) -> torch.nn.Module:
    q = copy.deepcopy(model)
    for mod in q.modules():
        if isinstance(mod, ThresholdClip):
            mod.levels = levels
    return q


@pytest.mark.parametrize("trained_levels,T", [(4, 4), (4, 2), (2, 2)])
def test_a_burst_network_at_T_steps_is_its_ann_at_L_equal_T(trained_levels, T):
    model = _random_resnet(trained_levels)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    snn = eclsnn.convert(model, neuron="burst")
    layers = {}
    with observe_neurons(snn, lambda name, current, out: layers.setdefault(name, out.mean(0))):
        mean_logits = eclsnn.simulate(snn, x, T)[-1]
    ann = _at_levels(model, T)
    ann_layers = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: ann_layers.setdefault(name, o))
             for name, m in ann.named_modules() if isinstance(m, ThresholdClip)]
    with torch.no_grad():
        expected = ann(x)
    for h in hooks:
        h.remove()
    assert set(layers) == set(ann_layers)
    for name in layers:  # every layer's rate is the clip at L = T of the same input (float64 sums aside)
        assert torch.allclose(layers[name], ann_layers[name], rtol=0, atol=1e-9), name
    assert torch.allclose(mean_logits, expected, rtol=0, atol=1e-9)
    dual = eclsnn.simulate(eclsnn.convert(model, neuron="dual"), x, T)[-1]
    assert (dual - expected).abs().max() > 1e-3  # the one-spike neuron does not have this identity here


def test_adaptive_latency_runs_burst_networks_with_their_step_counter():
    model = _random_resnet(4).float()
    snn = eclsnn.convert(model, neuron="burst")
    x = torch.randn(5, 1, 28, 28)
    full = eclsnn.simulate(snn, x, 4)[-1]
    from eclsnn.simulation.adaptive import simulate_adaptive

    out = simulate_adaptive(snn, x, max_steps=4, margin=float("inf"))  # never stops early: the full run
    logits = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(logits, full, atol=1e-5)


def test_export_and_nir_refuse_burst_neurons_with_a_reason(tmp_path):
    snn = eclsnn.convert(_random_resnet(4).float(), neuron="burst")
    with pytest.raises(ConversionError, match="burst"):
        export_npz(snn, tmp_path / "snn.npz")
    assert not (tmp_path / "snn.npz").exists()

    with pytest.raises(ConversionError, match="burst neuron"):
        to_nir(snn, torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("maxpool", ["cummax", "auto"])
def test_the_identity_holds_through_spiking_max_pools(maxpool):
    torch.manual_seed(1)
    model = create("cnn-fmnist", num_classes=10, in_channels=1, levels=4, pool="max").eval().double()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, ThresholdClip):
                mod.threshold_raw.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    snn = eclsnn.convert(model, neuron="burst", maxpool=maxpool)
    assert set(snn.settings["maxpool_modes"].values()) <= {"cummax", "swap"}
    for T in (2, 4):
        with torch.no_grad():
            expected = _at_levels(model, T)(x)
        assert torch.allclose(eclsnn.simulate(snn, x, T)[-1], expected, rtol=0, atol=1e-7)  # float64 rounding
