"""Adaptive-latency inference: stopped samples keep the fixed-run prediction of their stopping step,
finished samples leave the batch, and the bound is calibrated on held-out data."""

import math

import pytest
import torch
from torch import nn

from eclsnn import SimulationError, ThresholdClip, convert, simulate
from eclsnn.simulation.adaptive import calibrate_margin, evaluate_adaptive, simulate_adaptive


@pytest.fixture(scope="module")
def snn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), ThresholdClip(4, 1.0), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 16), ThresholdClip(4, 1.0), nn.Linear(16, 5)).eval()
    return convert(model)


def test_infinite_margin_is_the_fixed_run(snn):
    x = torch.randn(24, 1, 8, 8)
    logits, steps = simulate_adaptive(snn, x, 6, float("inf"))
    assert torch.equal(steps, torch.full((24,), 6))
    torch.testing.assert_close(logits, simulate(snn, x, 6)[-1], rtol=1e-5, atol=1e-5)


def test_stopped_samples_keep_the_prediction_of_their_step(snn):
    x = torch.randn(64, 1, 8, 8)
    fixed = simulate(snn, x, 8)
    logits, steps = simulate_adaptive(snn, x, 8, margin=0.5)
    assert (steps >= 1).all() and (steps <= 8).all() and (steps < 8).any()
    expected = fixed[steps - 1, torch.arange(64)]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    top2 = expected.topk(2, -1).values
    early = steps < 8
    assert ((top2[early, 0] - top2[early, 1]) > 0.5).all()


def test_calibrated_margin_meets_the_accuracy_target_on_the_calibration_data(snn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = simulate(snn, x, 16)[-1].argmax(-1)  # labels the fixed-T network gets right
    y[:16] = (y[:16] + 1) % 5
    loader = list(zip(x.split(32), y.split(32)))
    loss = 0.005  # the default: tight enough that the smallest candidates (nearly all samples stop at step 1) miss it
    margin, table = calibrate_margin(snn, loader, 8, max_accuracy_loss=loss)
    fixed, rows = table[0]["fixed_accuracy"], table[1:]
    # a real bound, not "never stop early" (margin inf also meets any accuracy target)
    assert math.isfinite(margin)
    candidates = [row["margin"] for row in rows]
    assert candidates == sorted(candidates) and margin in candidates
    i = candidates.index(margin)
    assert rows[i]["accuracy"] >= fixed - loss - 1e-9 and rows[i]["mean_steps"] < 8
    # the smallest margin that meets the target: the next smaller candidate misses it
    assert i > 0, "the smallest candidate was chosen: the test data do not exercise the choice"
    assert rows[i - 1]["accuracy"] < fixed - loss
    result = evaluate_adaptive(snn, loader, 8, margin)
    assert result.accuracy >= fixed - loss - 1e-9
    assert result.mean_steps < 8 and sum(result.steps_histogram.values()) == 128
    assert result.mean_steps == pytest.approx(rows[i]["mean_steps"], abs=2 / 128)  # as scored in calibration


def test_bad_arguments(snn):
    with pytest.raises(SimulationError):
        simulate_adaptive(snn, torch.randn(2, 1, 8, 8), 0, 1.0)
    with pytest.raises(SimulationError):
        simulate_adaptive(snn, torch.randn(2, 1, 8, 8), 4, float("nan"))


@pytest.mark.parametrize("block", [1, 2, 3, 8])
def test_blocks_and_sub_batches_stop_every_sample_at_the_same_step(snn, block):
    """Simulating in blocks (state carried between runs, finished samples removed after each block)
    stops each sample exactly where a step-by-step loop would, whatever the block and sub-batch size."""
    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    fixed = simulate(snn, x, 8)
    rows = snn.max_rows
    try:
        for max_rows in (None, 24):
            snn.max_rows = max_rows
            logits, steps = simulate_adaptive(snn, x, 8, margin=0.5, block=block)
            ref_logits, ref_steps = simulate_adaptive(snn, x, 8, margin=0.5, block=1)
            assert torch.equal(steps, ref_steps)
            torch.testing.assert_close(logits, fixed[steps - 1, torch.arange(50)], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    finally:
        snn.max_rows = rows
    assert (steps < 8).any() and (steps > 1).any()


def test_carried_state_continues_a_run(snn):
    """run(x, a) then run(x, b, carry_state=True) is run(x, a + b) split in two."""
    x = torch.randn(6, 1, 8, 8)
    whole = snn.run(x, 7)
    first = snn.run(x, 3)
    second = snn.run(x, 4, carry_state=True)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=0)
