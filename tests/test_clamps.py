"""Clamping activations (ReLU6, Hardtanh(0, c), F.relu6, F.hardtanh, torch.clamp / .clamp) convert to
neurons with θ ≤ c and prepare into ThresholdClip with λ ≤ c; activations without a spiking form are
refused with the node's name and the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eclsnn
from eclsnn.core.functional import threshold_clip
from eclsnn.errors import ConversionError


class Head(nn.Module):
    """fc1 → act → fc2; ``act`` is any callable on the hidden units."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.act = act
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _net(fn) -> nn.Module:
    """fc1 → fn(·) inline (so torch.fx records the function or method call) → fc2."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(fn(self.fc1(x)))

    return Net().eval()


CLAMPS = {
    "ReLU6 module": (lambda: Head(nn.ReLU6()).eval(), 6.0),
    "Hardtanh(0, 2) module": (lambda: Head(nn.Hardtanh(0.0, 2.0)).eval(), 2.0),
    "F.relu6": (lambda: _net(F.relu6), 6.0),
    "F.hardtanh(x, 0, 1.5)": (lambda: _net(lambda x: F.hardtanh(x, 0.0, 1.5)), 1.5),
    "torch.clamp(x, 0, 3)": (lambda: _net(lambda x: torch.clamp(x, 0, 3)), 3.0),
    "x.clamp(min=0, max=2.5)": (lambda: _net(lambda x: x.clamp(min=0, max=2.5)), 2.5),
    "x.clamp(min=0)": (lambda: _net(lambda x: x.clamp(min=0)), None),
}


@pytest.mark.parametrize("case", list(CLAMPS))
def test_clamps_convert_to_neurons_with_theta_at_most_c(case):
    build, cap = CLAMPS[case]
    model = build()
    calib = torch.randn(256, 4) * 20  # activations far above every cap
    snn = eclsnn.convert(model, neuron="if", v_init=0.5, calibration=calib)
    (name, neuron), = snn.neurons()
    theta = float(neuron.theta)
    relu_max = float(F.relu(model.fc1(calib)).max().detach())
    if cap is None:  # clamp(min=0) is a ReLU
        assert theta == pytest.approx(relu_max, rel=1e-6)
    else:
        assert theta == cap  # the calibrated maximum is above c, so θ is c exactly
    # the first neuron layer sees a constant current: after T steps its rate is the clip with T levels at θ
    x = torch.randn(16, 4) * 5
    T = 32
    got = eclsnn.simulate(snn, x, T)[-1]
    want = model.fc2(threshold_clip(model.fc1(x), torch.tensor(theta), levels=T))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_clamp_below_its_cap_keeps_the_calibrated_threshold():
    model = Head(nn.ReLU6()).eval()
    calib = torch.randn(256, 4) * 0.1  # activations well below 6
    snn = eclsnn.convert(model, calibration=calib)
    theta = float(snn.neurons()[0][1].theta)
    assert theta == pytest.approx(float(F.relu6(model.fc1(calib)).max().detach()), rel=1e-6) and theta < 6


@pytest.mark.parametrize("make,why", [
    (lambda: Head(nn.Hardtanh(-1.0, 1.0)), "lower bound -1"),
    (lambda: _net(lambda x: torch.clamp(x, -2, 2)), "lower bound -2"),
    (lambda: _net(lambda x: x.clamp(max=3)), "lower bound None"),
    (lambda: Head(nn.SiLU()), "SiLU is not monotone"),
    (lambda: Head(nn.GELU()), "GELU"),
    (lambda: Head(nn.Sigmoid()), "sigmoid"),
    (lambda: Head(nn.LayerNorm(8)), "LayerNorm divides"),
    (lambda: _net(F.silu), "SiLU"),
    (lambda: _net(torch.sigmoid), "sigmoid"),
    (lambda: _net(F.hardswish), "Hardswish"),
    (lambda: Head(nn.LeakyReLU()), "passes negative values"),
])
def test_activations_without_a_spiking_form_are_refused_by_name(make, why):
    with pytest.raises(ConversionError, match=why) as info:
        eclsnn.convert(make().eval(), calibration=torch.randn(8, 4))
    problems = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and why in problems[0]
    # the node is named: the module's qualified name, or the function/method call
    assert problems[0].startswith(("  - act (", "  - silu", "  - sigmoid", "  - hardswish", "  - clamp", "  - clip"))


@pytest.mark.parametrize("case", ["ReLU6 module", "torch.clamp(x, 0, 3)", "F.relu6"])
def test_prepare_turns_clamps_into_clips_with_lambda_at_most_c(case):
    build, cap = CLAMPS[case]
    model = build()
    prepared = eclsnn.prepare(model, levels=4, calibration=torch.randn(256, 4) * 20)
    clips = [m for m in prepared.modules() if isinstance(m, eclsnn.ThresholdClip)]
    assert len(clips) == 1 and float(clips[0].threshold) == cap
    small = eclsnn.prepare(model, levels=4, calibration=torch.randn(256, 4) * 0.1)
    lam = float([m for m in small.modules() if isinstance(m, eclsnn.ThresholdClip)][0].threshold)
    assert 0 < lam < cap
    without_data = eclsnn.prepare(model, levels=4, init_threshold=100.0)
    assert float([m for m in without_data.modules() if isinstance(m, eclsnn.ThresholdClip)][0].threshold) == cap


def test_thresholds_given_above_the_cap_are_capped():
    model = Head(nn.ReLU6()).eval()
    snn = eclsnn.convert(model, thresholds={"act": torch.tensor(10.0)})
    assert float(snn.neurons()[0][1].theta) == 6.0
    relu = eclsnn.convert(Head(nn.ReLU()).eval(), thresholds={"act": torch.tensor(10.0)})
    assert float(relu.neurons()[0][1].theta) == 10.0
