"""The converter: allow-list errors, BN folding, graph coverage, step-mode equivalence, prepare()."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eclsnn
from eclsnn import ConversionError, DualThresholdIFNeuron, IFNeuron, ThresholdClip, convert, prepare, simulate
from eclsnn.conversion.converter import fold_batchnorm, trace
from eclsnn.core.functional import LAMBDA_MIN, threshold_clip
from eclsnn.simulation import observe_neurons


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class ConvNet(nn.Module):
    def __init__(self, bias=True, act=lambda: ThresholdClip(levels=4, init_threshold=1.0)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), act(), nn.AvgPool2d(2),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), act()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 32, bias=bias)
        self.bn = nn.BatchNorm1d(32)
        self.act = act()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.fc2(self.drop(self.act(self.bn(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))  # residual addition before the neuron


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


# ---- folding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folding_is_exact(bias):
    model = _randomise_bn(ConvNet(bias=bias, act=nn.Identity))
    x = torch.randn(8, 3, 8, 8)
    gm = fold_batchnorm(trace(model))
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_not_folded_into_conv_with_a_second_user():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomise_bn(TwoUsers())
    gm = fold_batchnorm(trace(model))
    assert isinstance(gm.bn, nn.BatchNorm2d)
    assert torch.equal(gm.conv.weight, model.conv.weight)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x))


def test_unfolded_batchnorm_stays_as_per_step_affine_layer():
    class BNFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = ThresholdClip(levels=4, init_threshold=1.0)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(self.bn(x))).flatten(1))

    torch.manual_seed(0)
    model = _randomise_bn(BNFirst())
    snn = convert(model)
    assert isinstance(snn.graph_module.bn, nn.BatchNorm2d)

    # The BN node itself, in the multi-step forward with a different input at every step: it runs
    # once on all T steps, and its output at each step is bn(x_t) with the ANN's running statistics.
    T, B = 5, 4
    x_seq = torch.randn(T, B, 3, 6, 6)
    seen = []
    handle = snn.graph_module.bn.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].clone(), out.clone())))
    try:
        with torch.no_grad():
            snn(x_seq)
    finally:
        handle.remove()
    assert len(seen) == 1, f"the BatchNorm layer ran {len(seen)} times in a {T}-step forward"
    bn_in, bn_out = (v.view(T, B, 3, 6, 6) for v in seen[0])
    torch.testing.assert_close(bn_in, x_seq, rtol=0, atol=0)
    with torch.no_grad():
        for t in range(T):
            torch.testing.assert_close(bn_out[t], model.bn(x_seq[t]), rtol=1e-6, atol=1e-6)

    # End to end: the converted network on x equals the converted rest of the network (conv, clip,
    # fc; no BN) on bn(x) -- so the BN step is applied, once per step, and nothing else changes.
    rest = nn.Sequential(model.conv, model.act, nn.Flatten(), model.fc).eval()
    x = torch.randn(B, 3, 6, 6)
    out = simulate(snn, x, 64)
    with torch.no_grad():
        ref = simulate(convert(rest), model.bn(x), 64)
        # one neuron layer on a constant current from v = θ/2 fires at the rate of the clip with T levels,
        # and the readout is affine: after T steps the SNN is exactly fc(clip_T(conv(bn(x))))
        rate = threshold_clip(model.conv(model.bn(x)), model.act.threshold, levels=64)
        expected = model.fc(rate.flatten(1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[-1], expected, rtol=1e-5, atol=1e-5)


def test_input_model_is_not_modified():
    model = _randomise_bn(TinyResNet())
    before = copy.deepcopy(model.state_dict())
    model.train()
    convert(model, calibration=torch.randn(8, 3, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn, nn.BatchNorm2d)


# ---- coverage ----------------------------------------------------------------------------------------

def test_resnet_with_functional_relu_and_residual_additions_converts_and_simulates():
    model = _randomise_bn(TinyResNet())
    x = torch.randn(16, 3, 8, 8)
    snn = convert(model, calibration=x, threshold_rule="max")
    neurons = snn.neurons()
    assert len(neurons) == 5 and all(isinstance(n, DualThresholdIFNeuron) for _, n in neurons)
    out = simulate(snn, x, 64)
    assert out.shape == (64, 16, 4)
    ann = model(x)
    # with max-calibrated thresholds there is no clipping error; the rate code converges
    assert (out[-1] - ann).abs().mean() < 0.1 * ann.abs().mean() + 1e-3


def test_nested_sequential_and_adaptive_pooling_convert_and_simulate():
    model = _randomise_bn(ConvNet())
    snn = convert(model, neuron="if")
    assert [type(n) for _, n in snn.neurons()] == [IFNeuron] * 3
    thetas = [n.theta.item() for _, n in snn.neurons()]
    assert thetas == [1.0, 1.0, 1.0]  # θ = λ
    torch.manual_seed(1)
    x, T = torch.randn(4, 3, 8, 8), 8
    out = simulate(snn, x, T)
    assert out.shape == (T, 4, 5) and torch.isfinite(out).all()

    # Values: at every step each neuron layer's input current is the ANN's layers between the two
    # activations (nested Sequential, average and adaptive pooling, BN1d, dropout gone) applied to the
    # previous neuron layer's output at that step, and the readout is fc2 of the last one.
    seen = {}
    with observe_neurons(snn, lambda name, current, output: seen.setdefault(name, (current.clone(), output.clone()))):
        readout = snn.run(x, T)
    assert list(seen) == ["features.2", "features.4.2", "act"]
    (i1, o1), (i2, o2), (i3, o3) = seen.values()
    f, close = model.features, dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(i1, f[1](f[0](x)).expand(T, -1, -1, -1, -1), **close)
        torch.testing.assert_close(i2, f[4][1](f[4][0](f[3](o1.flatten(0, 1)))).view_as(i2), **close)
        i3_ann = model.bn(model.fc1(model.pool(o2.flatten(0, 1)).flatten(1)))
        torch.testing.assert_close(i3, i3_ann.view_as(i3), **close)
        torch.testing.assert_close(readout, model.fc2(o3), **close)
        torch.testing.assert_close(out, readout.cumsum(0) / torch.arange(1, T + 1).view(T, 1, 1), **close)
    # IF neurons with θ = 1: every output is a spike (0 or θ), and the first layer, on a constant current
    # from v = θ/2, fires at the rate of the clip with T levels
    for o in (o1, o2, o3):
        assert ((o == 0) | (o == 1.0)).all()
    assert 0 < (o1 != 0).float().mean() < 1
    torch.testing.assert_close(o1.mean(0), threshold_clip(i1[0], torch.tensor(1.0), levels=T), rtol=0, atol=1e-6)


def test_shared_activation_module_gets_one_neuron_per_call_site():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.relu = nn.ReLU()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.relu(self.b(self.relu(self.a(x)))))

    x = torch.randn(32, 4)
    snn = convert(Shared(), calibration=x)
    neurons = snn.neurons()
    assert len(neurons) == 2 and neurons[0][1] is not neurons[1][1]


def test_relu_network_needs_calibration():
    with pytest.raises(ConversionError, match="calibration"):
        convert(TinyResNet())


def _tiny_resnet_relu_outputs(model: TinyResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of TinyResNet's five ReLUs, in graph order, computed from its modules."""
    with torch.no_grad():
        h = model.bn(model.conv(x)).relu()
        outs = [h]
        for block in (model.layer1, model.layer2):
            a = F.relu(block.bn1(block.conv1(h)))
            h = torch.relu(block.bn2(block.conv2(a)) + block.short(h))
            outs += [a, h]
    return outs


def test_percentile_and_channel_thresholds_from_calibration():
    torch.manual_seed(0)
    model = _randomise_bn(TinyResNet())
    x = torch.randn(64, 3, 8, 8)
    snn_max = convert(model, calibration=x, threshold_rule="max")
    snn_pct = convert(model, calibration=x, threshold_rule="percentile", percentile=99.0)
    snn_ch = convert(model, calibration=x, threshold_rule="max", threshold_granularity="channel")
    acts = _tiny_resnet_relu_outputs(model, x)
    assert len(acts) == len(snn_max.neurons()) == len(snn_pct.neurons()) == len(snn_ch.neurons()) == 5
    for act, (_, a), (_, b), (_, c) in zip(acts, snn_max.neurons(), snn_pct.neurons(), snn_ch.neurons()):
        # "max": the largest activation of the ANN on the calibration data; "channel": per channel
        torch.testing.assert_close(a.theta, act.max(), rtol=1e-5, atol=0)
        assert c.theta.dim() == 1 and torch.isclose(c.theta.max(), a.theta)
        eps = 1e-5 * act.max().item()  # rounding: BN folded into the conv vs applied after it
        torch.testing.assert_close(c.theta, act.amax(dim=(0, 2, 3)).clamp(min=LAMBDA_MIN), rtol=1e-5, atol=eps)
        # "percentile": the 99th percentile by its definition -- at least 99% of the activations are at
        # or below it and at most 99% below it
        n, theta = act.numel(), b.theta.item()
        assert (act <= theta + eps).sum().item() >= 0.99 * n
        assert (act < theta - eps).sum().item() <= 0.99 * n
        assert b.theta.item() < a.theta.item()  # (these activations have no ties at the top)


def test_per_channel_clip_thresholds_carry_over():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), ThresholdClip(per_channel=True, num_channels=3, init_threshold=1.0), nn.Flatten(), nn.Linear(3 * 4, 2))
    with torch.no_grad():
        model[1].threshold_raw.copy_(torch.tensor([0.5, 1.0, 2.0]))
    snn = convert(model)
    theta = snn.neurons()[0][1].theta
    assert torch.equal(theta, torch.tensor([0.5, 1.0, 2.0]))
    assert simulate(snn, torch.randn(3, 2, 2, 2), 4).shape == (4, 3, 2)


# ---- errors ----------------------------------------------------------------------------------------------

def _clip():
    return ThresholdClip(levels=4, init_threshold=1.0)


def test_max_pooling_on_time_varying_input_is_an_error_by_default_and_replaced_on_request():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _clip(), nn.Conv2d(4, 4, 3, padding=1), _clip(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with pytest.raises(ConversionError) as info:
        convert(model)
    msg = str(info.value)
    assert "  - 4: max pooling on time-varying input" in msg and "maxpool='auto'" in msg and "'avg'" in msg
    snn = convert(model, maxpool="avg")
    assert isinstance(snn.graph_module.get_submodule("4"), nn.AvgPool2d)
    assert simulate(snn, torch.randn(2, 1, 8, 8), 2).shape == (2, 2, 3)


def test_max_pooling_after_the_first_activation_converts_exactly_by_default():
    # conv → clip → max pool on the input image: the pool moves in front of the clip, where its input is
    # static (computed once), so the default converts it without approximation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _clip(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    snn = convert(model)
    assert snn.settings["maxpool_modes"] == {"2": "swap"}
    x = torch.randn(2, 1, 8, 8)
    ref = convert(model, maxpool="cummax")
    assert torch.equal(simulate(snn, x, 6), simulate(ref, x, 6))  # swap = counting the spikes: same numbers


def test_functional_max_pooling_is_an_error_too():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3, padding=1)
            self.a = _clip()
            self.c2 = nn.Conv2d(2, 2, 1)
            self.a2 = _clip()

        def forward(self, x):
            return F.max_pool2d(self.a2(self.c2(self.a(self.c(x)))), 2).flatten(1)

    with pytest.raises(ConversionError, match=r"max_pool2d"):
        convert(M())
    out = simulate(convert(M(), maxpool="avg"), torch.randn(2, 1, 4, 4), 3)
    assert out.shape == (3, 2, 8)


@pytest.mark.parametrize("module, name", [(nn.GELU(), "GELU"), (nn.Tanh(), "Tanh")])
def test_unsupported_modules_are_named(module, name):
    model = nn.Sequential(nn.Linear(4, 4), module, nn.Linear(4, 4), _clip(), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match=rf"1 \({name}\)"):
        convert(model)


def test_lstm_is_named():
    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4)
            self.act = _clip()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(self.act(y))

    with pytest.raises(ConversionError) as info:
        convert(RNN())
    assert "lstm (LSTM)" in str(info.value)


def test_sigmoid_and_product_of_activations_are_named_all_at_once():
    class SE(nn.Module):
        """Squeeze-excitation: a product of two activations."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = _clip()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.act(self.conv(x))
            w = torch.sigmoid(self.fc(y.mean((2, 3))))
            return (y * w[:, :, None, None]).mean((2, 3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = SE()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    with pytest.raises(ConversionError) as info:
        convert(Net())
    msg = str(info.value)
    assert "sigmoid (function sigmoid) in block" in msg
    assert "mul (function mul) in block" in msg and "product of two activations" in msg
    assert "getitem" in msg  # indexing an activation is not on the list either


def test_scaling_by_a_constant_is_allowed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = _clip()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.act(self.fc(x) * 0.5) / 2)

    assert simulate(convert(Scaled()), torch.randn(3, 4), 2).shape == (2, 3, 2)


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(ConversionError, match="could not trace"):
        convert(Branchy())


@pytest.mark.parametrize("kwargs", [dict(neuron="lif"), dict(maxpool="max"), dict(threshold_rule="mean"), dict(v_init=float("nan")), dict(theta_neg=1.5)])
def test_bad_settings(kwargs):
    with pytest.raises(ConversionError):
        convert(ConvNet(), **kwargs)


def test_no_activation_is_an_error():
    with pytest.raises(ConversionError, match="no activation"):
        convert(nn.Sequential(nn.Linear(2, 2)))


# ---- step modes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("neuron", ["if", "dual"])
def test_multi_step_and_single_step_agree_on_a_converted_network(neuron):
    torch.manual_seed(0)
    model = _randomise_bn(TinyResNet()).double()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    T = 6
    snn = convert(model, neuron=neuron, calibration=x, threshold_rule="percentile", percentile=99.0)
    multi = snn.run(x, T)
    seq_in = x.unsqueeze(0).expand(T, *x.shape) + 0.1 * torch.randn(T, *x.shape, dtype=torch.float64)
    multi_seq = snn(seq_in)
    snn.set_step_mode("single")
    single = torch.stack([snn(x) for _ in range(T)])
    snn.reset()
    single_seq = torch.stack([snn(seq_in[t]) for t in range(T)])
    assert torch.equal(multi, single)
    assert torch.equal(multi_seq, single_seq)
    # simulate() restores the single-step mode it found and gives the cumulative mean
    out = simulate(snn, x, T)
    assert snn.step_mode == "single"
    assert torch.allclose(out, single.cumsum(0) / torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1))


def test_state_is_reset_between_calls():
    model = _randomise_bn(TinyResNet())
    x = torch.randn(4, 3, 8, 8)
    snn = convert(model, calibration=x)
    a = simulate(snn, x, 5)
    simulate(snn, torch.randn(4, 3, 8, 8), 3)
    assert torch.equal(simulate(snn, x, 5), a)


# ---- prepare ---------------------------------------------------------------------------------------------

def test_prepare_replaces_every_relu_and_initialises_lambda_from_percentiles():
    model = _randomise_bn(TinyResNet())
    x = torch.randn(64, 3, 8, 8)
    prepared = prepare(model, levels=8, calibration=x, percentile=99.9)
    clips = [m for m in prepared.modules() if isinstance(m, ThresholdClip)]
    assert len(clips) == 5 and all(c.levels == 8 for c in clips)
    assert not any(isinstance(m, nn.ReLU) for m in prepared.modules())
    stem = model.bn(model.conv(x)).relu().flatten()
    k = int(torch.tensor(0.999 * stem.numel()).ceil())
    assert torch.isclose(clips[0].threshold, stem.kthvalue(k).values, rtol=1e-5)
    # trainable, and converts with θ = λ
    prepared.train()
    prepared(x).sum().backward()
    assert all(c.threshold_raw.grad is not None for c in clips)
    snn = convert(prepared)
    assert [n.theta.item() for _, n in snn.neurons()] == [c.threshold.item() for c in clips]


def test_prepare_keeps_module_names_of_relu_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    prepared = prepare(model, levels=2)
    assert isinstance(prepared.get_submodule("1"), ThresholdClip)
    assert set(prepared.state_dict()) == {"0.weight", "0.bias", "1.threshold_raw", "2.weight", "2.bias"}


def test_prepare_without_relu_is_an_error():
    with pytest.raises(ConversionError, match="no ReLU"):
        prepare(nn.Sequential(nn.Linear(2, 2)))


def test_public_api_names():
    for name in ["ThresholdClip", "IFNeuron", "DualThresholdIFNeuron", "convert", "prepare", "simulate", "evaluate", "ConversionError"]:
        assert hasattr(eclsnn, name)
    assert callable(eclsnn.core.functional.threshold_clip)


def test_calibrated_network_rebuilds_from_stored_thresholds_without_data():
    model = _randomise_bn(TinyResNet())
    x = torch.randn(16, 3, 8, 8)
    snn = convert(model, calibration=x, threshold_rule="percentile")
    rebuilt = convert(model, threshold_rule="percentile", thresholds=snn.thresholds())
    assert torch.equal(simulate(snn, x, 4), simulate(rebuilt, x, 4))
    with pytest.raises(ConversionError, match="do not match"):
        convert(model, thresholds={"nope": torch.tensor(1.0)})
