"""The exact statements of SPEC.md, as property tests on dyadic values (exact in float32)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eclsnn import DualThresholdIFNeuron, IFNeuron, ThresholdClip
from eclsnn.core.functional import threshold_clip

POW2_T = [1, 2, 4, 8, 16]


@st.composite
def dyadic_case(draw):
    """θ = 2^k, inputs z = m·θ/2^j: exact in float32, rounding ties included."""
    theta = 2.0 ** draw(st.integers(-3, 3))
    j = draw(st.integers(0, 5))
    T = draw(st.sampled_from(POW2_T))
    ms = draw(st.lists(st.integers(-(T + 2) * 2**j, (T + 2) * 2**j), min_size=1, max_size=64))
    z = torch.tensor([m * theta / 2**j for m in ms], dtype=torch.float32)
    return theta, T, z


def _if_mean_output(z: torch.Tensor, theta: float, T: int, v_init: float) -> torch.Tensor:
    neuron = IFNeuron(theta, v_init=v_init)
    out = neuron(z.unsqueeze(0).expand(T, *z.shape))
    return out.sum(0) / T


@settings(max_examples=300, deadline=None, derandomize=True)
@given(dyadic_case())
def test_if_with_half_threshold_start_equals_clip_at_T_equals_L(case):
    theta, T, z = case
    clip = ThresholdClip(levels=T, init_threshold=theta)
    expected = clip(z).detach()
    got = _if_mean_output(z, theta, T, v_init=0.5)
    assert torch.equal(got, expected), (theta, T, z, got, expected)
    # spike count form of the theorem
    count = torch.clamp(torch.floor(z * T / theta + 0.5), 0, T)
    assert torch.equal(got * T / theta, count)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(dyadic_case())
def test_if_with_zero_start_equals_floor_clip(case):
    theta, T, z = case
    expected = threshold_clip(z, torch.tensor(theta), levels=T, shift=0.0)
    got = _if_mean_output(z, theta, T, v_init=0.0)
    assert torch.equal(got, expected)
    assert torch.equal(got * T / theta, torch.clamp(torch.floor(z * T / theta), 0, T))


@st.composite
def dyadic_sequences(draw):
    """Per-step inputs in [−θ, θ], dyadic; a batch of sequences of length T."""
    theta = 2.0 ** draw(st.integers(-2, 2))
    j = draw(st.integers(0, 4))
    T = draw(st.integers(1, 12))
    B = draw(st.integers(1, 8))
    ms = draw(st.lists(st.integers(-(2**j), 2**j), min_size=T * B, max_size=T * B))
    x = torch.tensor(ms, dtype=torch.float32).view(T, B) * (theta / 2**j)
    perm = draw(st.permutations(list(range(T))))
    return theta, x, perm


@settings(max_examples=400, deadline=None, derandomize=True)
@given(dyadic_sequences())
def test_dual_threshold_count_is_rounded_sum_whatever_the_order(case):
    theta, x, perm = case
    T = x.shape[0]
    expected = torch.clamp(torch.floor(x.sum(0) / theta + 0.5), 0, T)
    for seq in (x, x[list(perm)]):
        neuron = DualThresholdIFNeuron(theta, v_init=0.5, theta_neg=0.0)
        out = neuron(seq)
        spikes = out / theta
        assert set(spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}
        running = spikes.cumsum(0)
        assert (running >= 0).all(), "the net spike count went below zero"
        assert torch.equal(running[-1], expected), (seq, running[-1], expected)
        assert torch.equal(neuron.count, expected)


def test_dual_threshold_outside_the_band_order_matters():
    # SPEC.md: the property is local; inputs [0, 2θ] give 1 spike, [2θ, 0] give 2.
    theta = 1.0
    a = DualThresholdIFNeuron(theta)(torch.tensor([[0.0], [2.0]])).sum()
    b = DualThresholdIFNeuron(theta)(torch.tensor([[2.0], [0.0]])).sum()
    assert (a.item(), b.item()) == (1.0, 2.0)


def test_count_gate_blocks_negative_spikes_before_the_first_spike():
    x = torch.full((8, 3), -0.75)
    out = DualThresholdIFNeuron(1.0)(x)
    assert torch.equal(out, torch.zeros_like(x))


def test_rounding_uses_floor_half_up_not_bankers_rounding():
    # z·T/θ + 1/2 = 2.5 + 0.5 = 3 exactly; round() would give 2 for 2.5.
    theta, T = 1.0, 4
    z = torch.tensor([2.5 / T])
    got = _if_mean_output(z, theta, T, 0.5) * T
    assert got.item() == 3.0 == math.floor(2.5 + 0.5)
