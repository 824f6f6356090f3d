"""benchmarks/depth.py end to end on a tiny campaign, so that the long benchmark cannot rot: train →
validate → evaluate → render for a clip and a ReLU network with max pools (converted per the config's
``convert.maxpool``), a rerun that retrains and re-evaluates nothing, and the choice of the pretrained
path's fine-tune on the validation split (the test set sees the chosen one only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import depth  # noqa: E402

TINY = {"train.max_train_samples": 256, "data.val_fraction": 0.02, "model.pool": "max", "convert.maxpool": "auto"}


@pytest.fixture
def campaign(tmp_path, monkeypatch):
    for name, sub in (("RUNS_DIR", "runs"), ("RESULTS", "results"), ("OUT", "results/depth"),
                      ("VAL", "results/depth/val")):
        monkeypatch.setattr(depth, name, tmp_path / sub)
    for name, value in (("T_MAX", 4), ("T_VAL", 4), ("T_ABLATION", 2), ("SJ_SELECT_SAMPLES", 64)):
        monkeypatch.setattr(depth, name, value)
    specs = [depth.Spec("cnn-fmnist", "clip", 4, 0, 1, config="fmnist-cnn.toml", overrides=TINY, variant="tiny"),
             depth.Spec("cnn-fmnist", "relu", None, 0, 1, config="fmnist-cnn.toml", overrides=TINY, variant="tiny")]
    monkeypatch.setattr(depth, "RUNS", specs)
    return tmp_path, specs


def test_campaign_trains_validates_evaluates_renders_and_resumes(campaign):
    tmp, (clip, relu) = campaign
    depth.main(["all", "--max-samples", "64"])
    out = tmp / "results" / "depth"
    result = json.loads((out / f"{clip.name}.json").read_text())
    assert result["num_samples"] == 64
    assert set(result["snn_accuracy"]) == {"dual θ/2", "burst θ/2", "dual θ/2, burst after additions", "IF v0", "IF θ/2"}
    assert list(result["snn_accuracy"]["dual θ/2"]) == ["1", "2", "3", "4"]
    assert list(result["snn_accuracy"]["IF v0"]) == ["1", "2"]
    # a clip network converts exactly: burst neurons at T = L reproduce the L-level ANN
    assert result["snn_accuracy"]["burst θ/2"]["4"] == pytest.approx(result["ann_accuracy"], abs=1 / 64 + 1e-9)
    val = json.loads((out / "val" / f"{clip.name}.json").read_text())
    assert val["num_samples"] == 1200 and val["run_val_accuracy"] == depth._val_accuracy(tmp / "runs" / clip.name)[-1]
    relu_result = json.loads((out / f"{relu.name}.json").read_text())
    assert "dual θ/2 (p99.9)" in relu_result["snn_accuracy"] and not (out / "val" / f"{relu.name}.json").exists()
    md = (tmp / "results" / "depth.md").read_text()
    assert clip.name in md and "cnn-fmnist clip L=4 + tiny" in md and "cnn-fmnist ReLU + tiny" in md
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("*.json"), *(tmp / "runs").rglob("summary.json")]}
    depth.main(["all", "--max-samples", "64"])  # finished runs and results are kept as they are
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_only_the_finetune_chosen_on_validation_meets_the_test_set(campaign, monkeypatch):
    tmp, _ = campaign
    a, b = (depth.Spec("cnn-fmnist", "clip", 4, 0, 1, config="fmnist-cnn.toml", overrides=TINY, variant=f"ft{i}")
            for i in (1, 2))
    monkeypatch.setattr(depth, "FINETUNES", [a, b])
    log = []
    assert depth._r18_chosen_finetune() is None
    (tmp / "results" / "depth" / "val").mkdir(parents=True)
    for spec, acc in ((a, 0.5), (b, 0.7)):
        (tmp / "runs" / spec.name / "checkpoints" / "last").mkdir(parents=True)
        (tmp / "runs" / spec.name / "summary.json").write_text("{}")
        assert depth.evaluate(spec, 8, log.append) is None  # not before both are validated
        (depth.VAL / f"{spec.name}.json").write_text(json.dumps({"snn_accuracy": {"dual θ/2": {"4": acc}}}))
    assert depth._r18_chosen_finetune() == b.name
    assert depth.evaluate(a, 8, log.append) is None and f"chosen on the validation split: {b.name}" in log[-1]


def test_the_pad_stem_moves_out_of_the_network_for_spikingjelly():
    """SpikingJelly's converter refuses ZeroPad2d (VGG-16's pad28 stem): the pad is cut from the graph and
    applied to the input, the same network; a network without one is passed through unchanged."""
    import torch

    from eclsnn.models import create

    model = create("vgg16", num_classes=10, in_channels=1, activation="relu", width=0.125, stem="pad28").eval()
    x = torch.randn(3, 1, 28, 28)
    net, calib, pad = depth._sj_ready(model, [x])
    assert not any(isinstance(m, torch.nn.ZeroPad2d) for m in net.modules())
    assert calib[0].shape == (3, 1, 32, 32)
    assert torch.equal(net(pad(x)), model(x))
    plain = create("resnet8", num_classes=10, in_channels=1, activation="relu").eval()
    same, calib, pad = depth._sj_ready(plain, [x])
    assert same is plain and calib[0] is x and pad(x) is x
