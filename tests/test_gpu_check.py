"""benchmarks/gpu_check.py in its tiny CPU mode, so that the one-command GPU check cannot rot: it trains,
converts, simulates and compares spike counts with a float64 run, and its distance-to-threshold replay
finds a neuron that sits at its threshold."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

from eclsnn import DualThresholdIFNeuron, IFNeuron  # noqa: E402


def test_tiny_mode_runs_every_part_and_its_mismatches_sit_at_thresholds(tmp_path):
    report = gpu_check.main(["--tiny", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").is_file()
    assert report["train"]["images_per_s"] > 0 and torch.isfinite(torch.tensor(report["train"]["final_loss"]))
    assert set(report["simulate_images_per_s"]) == {"1", "2", "4", "8"}
    check = report["spike_check"]
    assert len(check["layers"]) == 17  # every neuron layer of ResNet-18
    for layer in check["layers"]:  # float32 against float64 differs only by rounding at a threshold
        if layer["mismatches"]:
            assert layer["max_distance_to_threshold"] < 1e-4 or layer["layer"] != check["first_layer_with_mismatch"]


def test_distance_to_threshold_replays_the_membrane():
    # θ = 1, v(0) = θ/2: inputs 0.5 then 0.25 → m = 1.0 (fires: distance 0), then v = 0, m = 0.25
    for neuron in (IFNeuron(1.0), DualThresholdIFNeuron(1.0)):
        currents = torch.tensor([[0.5], [0.25]], dtype=torch.float64).view(2, 1, 1)
        outputs = torch.tensor([[1.0], [0.0]], dtype=torch.float64).view(2, 1, 1)
        d = gpu_check._distance_to_threshold(neuron, currents, outputs)
        assert d.item() == 0.0
        # inputs 0.25 then 0.125, no spike: m = 0.75, then 0.875 → closest to θ at 0.125
        d = gpu_check._distance_to_threshold(neuron, currents * 0.5, torch.zeros_like(outputs))
        assert abs(d.item() - 0.125) < 1e-12
