"""``eclsnn.analysis.decomposition``: the three errors on dyadic cases where they are known exactly, firing rates,
exact SOP counting against brute force (padding, stride, dilation, groups, channels-last, folded
pools), MAC counts, and ``eclsnn analyze`` on a tiny real checkpoint."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eclsnn
from eclsnn.analysis.counting import E_AC_PJ, E_MAC_PJ, POOLED, SPIKES, _folded_fanout, _sops, fanout_map, synapse_kinds
from eclsnn.analysis.decomposition import analyze, layer_errors, quantized_reference
from eclsnn.analysis.report import format_analysis
from eclsnn.cli import main
from eclsnn.models import create


def _linear(n_in, n_out, weight, bias=0.0):
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(weight if torch.is_tensor(weight) else torch.full((n_out, n_in), float(weight)))
        layer.bias.fill_(bias)
    return layer


def _clip(levels, theta):
    return eclsnn.ThresholdClip(levels=levels, init_threshold=theta)


# ---- the three errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [dict(neuron="if", v_init=0.5), dict(neuron="if", v_init=0.0),
                                     dict(neuron="dual", v_init=0.5), dict(neuron="dual", v_init=0.0)])
def test_constant_input_errors_are_exactly_the_clip_and_quantisation_errors(variant):
    """One neuron layer fed by a constant current (the first layer's input is the same every step):
    with T = L its SNN output is h_T exactly, so the unevenness error is 0 and the clipping and
    quantisation errors are relu − clamp and clamp − h, on dyadic inputs where float32 is exact."""
    theta, T = 2.0, 4
    z = torch.tensor([k * theta / 8 for k in range(-8, 25)])  # −θ .. 3θ in steps of θ/8, rounding ties included
    n = z.numel()
    model = nn.Sequential(_linear(n, n, torch.eye(n)), _clip(T, theta), _linear(n, 3, 0.1)).eval()
    snn = eclsnn.convert(model, **variant)
    res = analyze(model, {"v": snn}, [(z.unsqueeze(0), torch.tensor([0]))], T)["variants"]["v"]
    (layer,) = res["neurons"]
    v0 = variant["v_init"]
    zs = z.tolist()
    clip = [max(x, 0) - min(max(x, 0), theta) for x in zs]
    h = [theta * min(max(math.floor(x * T / theta + v0), 0), T) / T for x in zs]
    quant = [min(max(x, 0), theta) - hx for x, hx in zip(zs, h)]
    err = layer["errors"]
    assert err["clipping"]["mean_abs"] == pytest.approx(sum(map(abs, clip)) / n, abs=1e-12)
    assert err["clipping"]["mean"] == pytest.approx(sum(clip) / n, abs=1e-12)
    assert err["quantization"]["mean_abs"] == pytest.approx(sum(map(abs, quant)) / n, abs=1e-12)
    assert err["quantization"]["mean"] == pytest.approx(sum(quant) / n, abs=1e-12)
    assert err["quantization"]["mean_abs_theta"] == pytest.approx(sum(map(abs, quant)) / n / theta, abs=1e-12)
    assert err["unevenness"]["mean_abs"] == 0.0
    assert err["total"]["mean"] == pytest.approx((sum(clip) + sum(quant)) / n, abs=1e-12)
    # spikes: T·h/θ per neuron, all positive
    assert layer["firing_rate"]["positive"] == pytest.approx(sum(h) / theta / n, abs=1e-12)
    assert layer["firing_rate"]["negative"] == 0.0
    assert layer["clipped_fraction"] == pytest.approx(sum(x > theta for x in zs) / n)
    assert layer["neurons_per_sample"] == n


def test_quantized_reference_is_the_clip_with_T_levels():
    z = torch.arange(-16, 48, dtype=torch.float32) / 8
    for T in (1, 2, 4, 8):
        expected = eclsnn.core.functional.threshold_clip(z, torch.tensor(2.0), levels=T, shift=0.5)
        assert torch.equal(quantized_reference(z, 2.0, T, 0.5), expected)
    e = layer_errors(z, torch.zeros_like(z), 2.0, 4, 0.5)
    assert torch.equal(e["clipping"] + e["quantization"] + e["unevenness"], e["total"])


def test_unevenness_of_a_second_layer_and_its_repair_by_the_negative_spike():
    """Layer 1 (θ = 1, v(0) = θ/2, constant 0.5) spikes at t = 1 only; layer 2 gets 2·s − 1 = [1, −1]:
    mean 0, so h_T = 0. The IF neuron fires at t = 1 and cannot take it back (unevenness −θ/2); the
    dual-threshold neuron retracts it at t = 2 (unevenness 0, one negative spike)."""
    model = nn.Sequential(_linear(1, 1, 1.0), _clip(2, 1.0), _linear(1, 1, 2.0, -1.0), _clip(2, 1.0), _linear(1, 2, 1.0)).eval()
    x, y = torch.tensor([[0.5]]), torch.tensor([0])
    variants = {"if": eclsnn.convert(model, neuron="if", v_init=0.5), "dual": eclsnn.convert(model, neuron="dual", v_init=0.5)}
    res = analyze(model, variants, [(x, y)], 2)["variants"]
    for v in ("if", "dual"):
        first = res[v]["neurons"][0]
        assert all(first["errors"][k]["mean_abs"] == 0.0 for k in ("clipping", "quantization", "unevenness"))
        assert first["firing_rate"]["positive"] == 0.5
    second_if, second_dual = res["if"]["neurons"][1], res["dual"]["neurons"][1]
    assert second_if["errors"]["clipping"]["mean"] == 0.0 and second_if["errors"]["quantization"]["mean"] == 0.0
    assert second_if["errors"]["unevenness"]["mean"] == -0.5 and second_if["errors"]["total"]["mean"] == -0.5
    assert second_if["firing_rate"] == {"positive": 0.5, "negative": 0.0}
    assert second_dual["errors"]["unevenness"]["mean_abs"] == 0.0 and second_dual["errors"]["total"]["mean_abs"] == 0.0
    assert second_dual["firing_rate"] == {"positive": 0.5, "negative": 0.5}


def _small_cnn(theta, levels=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), _clip(levels, theta), nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), _clip(levels, theta),
        nn.Conv2d(6, 6, 3, padding=1), _clip(levels, theta), nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    ).eval()


def test_clip_network_has_no_clipping_error_when_every_input_is_below_theta_and_the_terms_add_up():
    model = _small_cnn(theta=1000.0)
    x = torch.randn(8, 2, 8, 8)
    res = analyze(model, {"dual": eclsnn.convert(model)}, [(x, torch.zeros(8, dtype=torch.long))], 4)["variants"]["dual"]
    assert len(res["neurons"]) == 3
    for layer in res["neurons"]:
        e = layer["errors"]
        assert e["clipping"]["mean_abs"] == 0.0 and layer["clipped_fraction"] == 0.0
        assert e["clipping"]["mean"] + e["quantization"]["mean"] + e["unevenness"]["mean"] == pytest.approx(e["total"]["mean"], abs=1e-9)
    # and with a small θ the first layer clips
    small = _small_cnn(theta=0.05)
    res = analyze(small, {"dual": eclsnn.convert(small)}, [(x, torch.zeros(8, dtype=torch.long))], 4)["variants"]["dual"]
    assert res["neurons"][0]["errors"]["clipping"]["mean_abs"] > 0 and res["neurons"][0]["clipped_fraction"] > 0


# ---- operations --------------------------------------------------------------------------------------

def _brute_force_sops(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Every output, every tap: count the (output, tap) pairs that land on a non-zero input."""
    b, c, h, w = x.shape
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw), g = conv.stride, conv.padding, conv.dilation, conv.groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cin_g, cout_g = c // g, conv.out_channels // g
    nz = (x != 0).tolist()
    count = 0
    for n in range(b):
        for o in range(conv.out_channels):
            group = o // cout_g
            for i in range(ho):
                for j in range(wo):
                    for ci in range(group * cin_g, (group + 1) * cin_g):
                        for a in range(kh):
                            for bb in range(kw):
                                y, xx = i * sh - ph + a * dh, j * sw - pw + bb * dw
                                if 0 <= y < h and 0 <= xx < w and nz[n][ci][y][xx]:
                                    count += 1
    return count


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=3, padding=2, groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=5, padding=2, stride=2),
])
def test_sops_of_a_conv_equal_a_brute_force_count(kwargs):
    conv = nn.Conv2d(**kwargs)
    torch.manual_seed(1)
    x = torch.where(torch.rand(3, kwargs["in_channels"], 7, 6) < 0.3, torch.sign(torch.randn(3, kwargs["in_channels"], 7, 6)), 0.0)
    fan = fanout_map(conv, x.shape[1:])
    expected = _brute_force_sops(conv, x)
    assert _sops(x, fan) == expected
    assert _sops(x.contiguous(memory_format=torch.channels_last), fan) == expected
    # a dense input: every position's fan-out adds up to all (output, tap) pairs that hit the image
    assert int(fan.sum()) == _brute_force_sops(conv, torch.ones(1, *x.shape[1:]))


def test_linear_fanout_and_folded_pool_fanout_equal_the_jacobian_support():
    assert torch.equal(fanout_map(nn.Linear(6, 7), (6,)), torch.full((6,), 7))
    pool, conv = nn.AvgPool2d(2), nn.Conv2d(2, 3, 3, padding=1)
    shape = (2, 7, 6)  # odd height: the last row is dropped by the pool (fan-out 0)
    with torch.no_grad():
        conv.weight.uniform_(0.5, 1.0)
    jac = torch.autograd.functional.jacobian(lambda x: conv(pool(x)).flatten(), torch.zeros(1, *shape))
    support = (jac.reshape(-1, math.prod(shape)) != 0).sum(0).reshape(shape)
    assert torch.equal(_folded_fanout(pool, conv, shape), support)
    assert _folded_fanout(nn.AvgPool2d(3, stride=2), conv, shape) is None  # overlapping windows: not folded


def test_operation_counts_of_a_network():
    model = _small_cnn(theta=1.0)
    snn = eclsnn.convert(model, neuron="dual")
    kinds = synapse_kinds(snn)
    assert [k["kind"] for k in kinds.values()] == ["analog input (once)", POOLED, SPIKES, SPIKES]
    x = torch.randn(5, 2, 8, 8) * 3
    T = 3
    res = analyze(model, {"d": snn}, [(x[:2], torch.zeros(2, dtype=torch.long)), (x[2:], torch.zeros(3, dtype=torch.long))], T)
    syn = {s["name"]: s for s in res["variants"]["d"]["synapses"]}
    names = list(syn)
    # ANN MACs: output elements × fan-in of one output
    assert [syn[n]["ann_macs"] for n in names] == [4 * 64 * 2 * 9, 6 * 4 * 4 * 9, 6 * 4 * 6 * 9, 5 * 24]
    # first layer: computed once; pooled layer: dense MACs every step; spike-fed layers: no MACs
    assert syn[names[0]]["snn_macs"] == syn[names[0]]["ann_macs"] and syn[names[0]]["snn_sops"] == 0
    assert syn[names[1]]["snn_macs"] == T * syn[names[1]]["ann_macs"] and syn[names[1]]["snn_sops"] == 0
    assert syn[names[2]]["snn_macs"] == 0 and syn[names[3]]["snn_macs"] == 0
    # SOPs of the spike-fed layers against brute force on the recorded spikes
    spikes = {}
    hooks = [snn.graph_module.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: spikes.setdefault(n, []).append(a[0].clone()))
             for n in names[2:]]
    for xb in (x[:2], x[2:]):
        eclsnn.simulate(snn, xb, T)
    for h in hooks:
        h.remove()
    conv = snn.graph_module.get_submodule(names[2])
    expected = sum(_brute_force_sops(conv, s.contiguous()) for s in spikes[names[2]])
    assert syn[names[2]]["snn_sops"] == pytest.approx(expected / 5)
    expected_fc = sum(int((s != 0).sum()) * 5 for s in spikes[names[3]])
    assert syn[names[3]]["snn_sops"] == pytest.approx(expected_fc / 5)
    totals = res["variants"]["d"]["totals"]
    assert totals["ann_macs"] == sum(s["ann_macs"] for s in syn.values())
    assert totals["snn_energy_uj"] == pytest.approx((E_AC_PJ * totals["snn_sops"] + E_MAC_PJ * totals["snn_macs"]) * 1e-6)
    assert totals["neuron_updates_per_step"] == 4 * 8 * 8 + 6 * 2 * 2 + 6 * 2 * 2
    assert totals["snn_macs_pool_folded"] == syn[names[0]]["snn_macs"]
    assert "| d | " in format_analysis(res)


def test_cnn_fmnist_ann_macs_match_the_model_docstring():
    model = create("cnn-fmnist", num_classes=10).eval()
    res = analyze(model, {"dual": eclsnn.convert(model)}, [(torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], 1)
    assert res["variants"]["dual"]["totals"]["ann_macs"] == 6_047_488


# ---- the command -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for act in ("clip", "relu"):
        assert main(["train", "--epochs", "1", "--max-train-samples", "256", "--activation", act, "--output", str(out),
                     "--run-name", act, "--set", "train.progress=false", "--set", "train.eval_test=false",
                     "--set", "data.val_fraction=0.02"]) == 0
    return out


def test_analyze_command_writes_table_json_and_plot(tiny_runs, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["analyze", str(tiny_runs / "clip"), "-T", "2", "--max-samples", "128", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| variant | layer |" in printed and "E_SNN/E_ANN" in printed
    results = json.loads((out / "analysis.json").read_text())
    assert results["num_samples"] == 128 and results["time_steps"] == 2 and results["split"] == "test"
    assert list(results["variants"]) == ["if-v0", "if-v0.5", "dual-v0.5"]
    for res in results["variants"].values():
        assert len(res["neurons"]) == 4 and len(res["synapses"]) == 5
        assert res["totals"]["ann_macs"] == 6_047_488
        for layer in res["neurons"]:
            assert all(math.isfinite(v) for e in layer["errors"].values() for v in e.values())
            assert 0 <= layer["firing_rate"]["positive"] <= 1 and 0 <= layer["firing_rate"]["negative"] <= 1
    assert (out / "analysis.md").read_text().startswith("Errors per neuron layer")
    assert (out / "analysis.png").stat().st_size > 10_000


def test_analyze_command_on_a_relu_checkpoint_with_one_variant(tiny_runs, capsys):
    assert main(["analyze", str(tiny_runs / "relu"), "-T", "1", "--split", "val", "--max-samples", "64", "--neuron", "if",
                 "--v-init", "0", "--no-progress"]) == 0
    results = json.loads((tiny_runs / "relu" / "analysis" / "analysis.json").read_text())
    assert list(results["variants"]) == ["if-v0"] and results["split"] == "val"
    assert results["relu_thresholds"] and len(results["relu_thresholds"]) == 4


def test_analyze_command_errors_are_one_line(tiny_runs, tmp_path, capsys):
    assert main(["analyze", str(tiny_runs / "clip"), "-T", "0", "--no-progress"]) == 2
    assert "time_steps must be at least 1" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "eclsnn: error:" in capsys.readouterr().err
