"""Neuron modules: step modes, per-channel thresholds, state, argument checks."""

import pytest
import torch

from eclsnn import DualThresholdIFNeuron, IFNeuron

NEURONS = [
    lambda theta: IFNeuron(theta, v_init=0.5),
    lambda theta: IFNeuron(theta, v_init=0.0),
    lambda theta: DualThresholdIFNeuron(theta, v_init=0.5, theta_neg=0.0),
    lambda theta: DualThresholdIFNeuron(theta, v_init=0.5, theta_neg=-0.5),
]


@pytest.mark.parametrize("make", NEURONS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_single_step_equals_multi_step(make, per_channel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 3, 5, 5, generator=g)
    theta = torch.tensor([0.5, 1.0, 2.0]) if per_channel else 0.75
    multi = make(theta)(x)
    single_neuron = make(theta)
    single_neuron.step_mode = "single"
    single = torch.stack([single_neuron(x[t]) for t in range(x.shape[0])])
    assert torch.equal(multi, single)


@pytest.mark.parametrize("make", NEURONS)
def test_outputs_are_signed_multiples_of_theta(make):
    theta = torch.tensor([0.5, 2.0])
    out = make(theta)(torch.randn(9, 6, 2) * 2)
    s = out / theta
    assert set(s.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_if_never_emits_negative_spikes():
    out = IFNeuron(1.0)(torch.randn(20, 50) * 3)
    assert (out >= 0).all()


def test_dual_threshold_retracts_an_early_spike():
    n = DualThresholdIFNeuron(1.0, v_init=0.5)
    out = n(torch.tensor([[0.6], [-0.9], [0.0]]))
    # step 1: m = 1.1 → +1, v = 0.1; step 2: m = −0.8 < 0 with one spike → −1, v = 0.2
    assert out.flatten().tolist() == [1.0, -1.0, 0.0]


def test_theta_neg_below_zero_delays_the_retraction():
    x = torch.tensor([[0.6], [-0.9], [0.0]])
    out = DualThresholdIFNeuron(1.0, v_init=0.5, theta_neg=-1.0)(x)
    assert out.flatten().tolist() == [1.0, 0.0, 0.0]


def test_single_step_state_persists_until_reset():
    n = IFNeuron(1.0, v_init=0.0, step_mode="single")
    x = torch.tensor([0.6])
    assert [n(x).item() for _ in range(3)] == [0.0, 1.0, 0.0]
    n.reset()
    assert n(x).item() == 0.0


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_thresholds_are_refused(theta):
    with pytest.raises(ValueError):
        IFNeuron(theta)


def test_bad_step_mode_and_theta_neg():
    with pytest.raises(ValueError):
        IFNeuron(1.0, step_mode="both")
    with pytest.raises(ValueError):
        DualThresholdIFNeuron(1.0, theta_neg=1.0)
