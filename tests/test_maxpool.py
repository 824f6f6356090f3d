"""Max pooling (docs/METHOD.md, "Max pooling"): the spiking max pool's invariants, the swap's exactness
where the maths allows it, the policies of convert and prepare, and what export, NIR and the analysis
do with pools."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eclsnn import ConversionError, ThresholdClip, convert, prepare, simulate
from eclsnn.core.pooling import SpikingMaxPool
from eclsnn.io.export import describe

torch.manual_seed(0)


def _spikes(T, shape, theta=1.0, signed=True, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand((T, *shape), generator=g) < p).float()
    if signed:
        s -= (torch.rand((T, *shape), generator=g) < p / 2).float()
    return s * theta


# ---- the spiking max pool -------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                                      dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=3, stride=1, padding=1)])
def test_outputs_sum_to_the_pool_of_the_counts_and_are_spikes(signed, geometry):
    theta = 0.7
    x = _spikes(12, (3, 4, 9, 9), theta, signed)
    pool = SpikingMaxPool(theta, **geometry)
    out = pool.multi_step(x)
    counts = torch.round(x / theta).cumsum(0)
    want = F.max_pool2d(counts[-1], geometry["kernel_size"], geometry.get("stride"), geometry.get("padding", 0),
                        ceil_mode=geometry.get("ceil_mode", False))
    assert torch.equal(torch.round(out.sum(0) / theta), want)
    levels = set(torch.round(out / theta).unique().tolist())
    assert levels <= ({-1.0, 0.0, 1.0} if signed else {0.0, 1.0})


def test_counts_are_integers_no_phantom_outputs_with_theta_0_3():
    # a float running sum of 0.3·s drifts by ulps, so max(C_t) − max(C_{t−1}) would be ±1e-8 where the
    # maximum count did not move; integer counts give exact spikes
    theta = 0.3
    x = _spikes(64, (8, 4, 8, 8), theta, True, p=0.4)
    out = SpikingMaxPool(theta, 2).multi_step(x)
    assert set((out / theta).unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert set(out.unique().tolist()) <= {-theta * 1.0, 0.0, theta * 1.0} | {float(torch.tensor(theta)), float(-torch.tensor(theta))}
    counts = torch.round(x / theta).cumsum(0)
    assert torch.equal(torch.round(out.sum(0) / theta), F.max_pool2d(counts[-1], 2))
    # what the float sum does on the same spikes (the reason for integer counts)
    acc, sums = torch.zeros_like(x[0]), []
    for t in range(64):  # a float32 running sum, step by step as a simulator would keep it
        acc = acc + x[t]
        sums.append(acc)
    float_pool = F.max_pool2d(torch.stack(sums).flatten(0, 1), 2).view(64, 8, 4, 4, 4)
    steps = torch.diff(float_pool, dim=0, prepend=torch.zeros_like(float_pool[:1]))
    phantom = (steps != 0) & ((steps.abs() - theta).abs() > 1e-3)
    assert phantom.any()


def test_single_step_carried_state_and_dropped_rows_match_multi_step():
    theta = torch.tensor([0.5, 1.0, 2.0])
    x = _spikes(8, (4, 3, 6, 6), 1.0, True) * theta.view(1, 1, 3, 1, 1)
    full = SpikingMaxPool(theta, 3, 2, 1).multi_step(x)
    single = SpikingMaxPool(theta, 3, 2, 1, step_mode="single")
    steps = torch.stack([single(x[t]) for t in range(8)])
    assert torch.equal(steps, full)
    carried = SpikingMaxPool(theta, 3, 2, 1)
    first = carried.multi_step(x[:3])
    carried.keep_rows(torch.tensor([True, False, True, True]))
    rest = carried.multi_step(x[3:, [0, 2, 3]], carry=True)
    assert torch.equal(torch.cat([first[:, [0, 2, 3]], rest]), full[:, [0, 2, 3]])
    assert set(carried.state()) == {"count"} and carried.state()["count"].dtype == torch.int32
    carried.reset()
    assert not carried.has_state()


def test_one_dimensional_pool_and_bad_arguments():
    x = _spikes(5, (2, 3, 10), 1.0, False)
    out = SpikingMaxPool(1.0, 2, dims=1).multi_step(x)
    assert torch.equal(out.sum(0), F.max_pool1d(x.sum(0), 2))
    with pytest.raises(ConversionError, match="finite and positive"):
        SpikingMaxPool(0.0, 2)
    with pytest.raises(Exception, match="channels"):
        SpikingMaxPool(torch.ones(4), 2).multi_step(torch.zeros(2, 1, 3, 4, 4))


# ---- conversion ----------------------------------------------------------------------------------

class _VGGish(nn.Module):
    """A stem pool (exact by swapping), a pool on a concatenation of two neuron layers with different θ
    (ceil_mode), and a stride-1 branch pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.p1 = nn.MaxPool2d(3, 2, 1)
        self.ca, self.ra = nn.Conv2d(4, 3, 3, padding=1), nn.ReLU()
        self.cb, self.rb = nn.Conv2d(4, 2, 1), nn.ReLU()
        self.p2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.c3, self.r3 = nn.Conv2d(5, 4, 3, padding=1), nn.ReLU()
        self.p3 = nn.MaxPool2d(3, 1, 1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = self.p1(self.r1(self.b1(self.c1(x))))
        x = self.p2(torch.cat([self.ra(self.ca(x)), self.rb(self.cb(x))], 1))
        x = self.p3(self.r3(self.c3(x)))
        return self.fc(x.flatten(1))


def _trained_like():
    torch.manual_seed(1)
    m = _VGGish()
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.2, 0.2)
        m.b1.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_auto_names_each_mode_and_default_refuses_with_the_modes():
    m, x = _trained_like(), torch.randn(8, 1, 14, 14)
    snn = convert(m, calibration=x, maxpool="auto")
    assert snn.settings["maxpool_modes"] == {"p1": "swap", "p2": "cummax", "p3": "cummax"}
    assert isinstance(snn.graph_module.get_submodule("p2"), SpikingMaxPool)
    assert snn.graph_module.get_submodule("p2").theta.shape == (5,)  # two layers' θ, per channel
    with pytest.raises(ConversionError) as info:
        convert(m, calibration=x)
    msg = str(info.value)
    assert "p2" in msg and "p3" in msg and "p1" not in msg.split("What to do")[0]
    assert "'auto'" in msg and "'cummax'" in msg and "docs/METHOD.md" in msg


def test_cummax_converges_to_the_ann_and_swap_keeps_a_bias():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 5 * 5, 3)).eval()
    x = torch.randn(16, 1, 10, 10)
    ann = m(x)
    auto = simulate(convert(m, calibration=x, maxpool="auto", neuron="if"), x, 256)[-1]
    with pytest.warns(UserWarning, match="approximately"):
        swap = simulate(convert(m, calibration=x, maxpool="swap", neuron="if"), x, 256)[-1]
    err_auto, err_swap = (auto - ann).abs().mean(), (swap - ann).abs().mean()
    assert err_auto < 0.05 * ann.abs().mean()
    assert err_swap > 2 * err_auto  # the per-step maximum of currents does not average out


def test_swapped_stem_is_exact_and_reverse_swap_feeds_cummax():
    class PoolThenAct(nn.Module):  # a prepared network's layout: pool → clip on time-varying input
        def __init__(self):
            super().__init__()
            self.c1, self.a1 = nn.Conv2d(1, 2, 3, padding=1), ThresholdClip(None, 1.0)  # plain clips: the SNN
            self.c2, self.p, self.a2 = nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2), ThresholdClip(None, 1.0)  # converges to them

        def forward(self, x):
            return self.a2(self.p(self.c2(self.a1(self.c1(x))))).flatten(1)

    m = PoolThenAct().eval()
    snn = convert(m, maxpool="auto")
    assert snn.settings["maxpool_modes"] == {"p": "cummax"}
    code = snn.graph_module.code
    assert code.index("self.a2(") < code.index("self.p(")  # the activation moved in front of the pool
    x = torch.randn(4, 1, 6, 6)
    ann = m(x)
    assert (simulate(snn, x, 256)[-1] - ann).abs().mean() < 0.05 * ann.abs().mean()


def test_max_pool_on_the_input_stays_exact_and_dilation_is_refused():
    m = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 2, 3), ThresholdClip(4, 1.0), nn.Flatten(), nn.Linear(8, 2)).eval()
    snn = convert(m)
    assert snn.settings["maxpool_modes"] == {"0": "static"}
    dil = nn.Sequential(nn.Conv2d(1, 2, 3), ThresholdClip(4, 1.0), nn.Conv2d(2, 2, 1), ThresholdClip(4, 1.0),
                        nn.MaxPool2d(2, dilation=2), nn.Flatten()).eval()
    with pytest.raises(ConversionError, match="dilation"):
        convert(dil, maxpool="cummax")


def test_avg_in_convert_warns_and_prepare_swaps_exactly():
    m, x = _trained_like(), torch.randn(8, 1, 14, 14)
    with pytest.warns(UserWarning, match="avg"):
        convert(m, calibration=x, maxpool="avg")
    prepared = prepare(m, calibration=x).eval()
    assert torch.allclose(prepared(x), prepare(m, calibration=x, maxpool="keep").eval()(x), atol=1e-5)
    code = prepared.code
    assert code.index("self.p1(") < code.index("self.r1(")  # the stem pool moved in front of its clip
    with pytest.raises(ConversionError, match="max pool"):
        prepare(m, calibration=x, maxpool="error")
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in prepare(m, calibration=x, maxpool="avg").modules())


def test_step_modes_and_adaptive_rows_through_the_network():
    m, x = _trained_like(), torch.randn(6, 1, 14, 14)
    snn = convert(m, calibration=x, maxpool="auto")
    multi = simulate(snn, x, 5)
    snn.set_step_mode("single")
    assert snn.graph_module.get_submodule("p2").step_mode == "single"
    snn.reset()
    single = torch.stack([snn(x) for _ in range(5)])
    snn.set_step_mode("multi")
    running_mean = single.cumsum(0) / torch.arange(1, 6).view(5, 1, 1)  # what simulate returns
    assert torch.allclose(running_mean, multi, atol=1e-5)
    snn.max_rows = None
    full = snn.run(x, 5)  # the readout of every step
    first = snn.run(x, 2)
    snn.keep_rows(torch.tensor([0, 2, 5]))
    rest = snn.run(x[[0, 2, 5]], 3, carry_state=True)
    assert torch.allclose(torch.cat([first[:, [0, 2, 5]], rest]), full[:, [0, 2, 5]], atol=1e-5)


# ---- export, NIR, analysis ---------------------------------------------------------------------------

def test_export_describes_pools_and_nir_refuses_them(tmp_path):
    m, x = _trained_like(), torch.randn(4, 1, 14, 14)
    snn = convert(m, calibration=x, maxpool="auto")
    graph, arrays = describe(snn)
    ops = {layer["name"]: layer for layer in graph["layers"]}
    assert ops["p2"]["op"] == "spiking_maxpool" and ops["p2"]["ceil_mode"] and arrays["p2.theta"].shape == (5,)
    assert graph["settings"]["maxpool_modes"]["p1"] == "swap"
    json.dumps(graph)
    pytest.importorskip("nir")
    from eclsnn import to_nir

    with pytest.raises(ConversionError, match="no max-pool node"):
        to_nir(snn, x[:1])


def test_numpy_rerun_of_an_exported_spiking_pool_matches(tmp_path):
    # the export's description of the pool is enough to re-run it: counts, pool, difference
    theta = 0.4
    x = _spikes(7, (2, 3, 6, 6), theta, True)
    pool = SpikingMaxPool(theta, 3, 2, 1)
    ours = pool.multi_step(x).numpy()
    counts = np.cumsum(np.round(x.numpy() / theta).astype(np.int32), 0)
    padded = np.pad(counts, ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.iinfo(np.int32).min)
    pooled = np.empty((7, 2, 3, 3, 3), dtype=np.int32)
    for i in range(3):
        for j in range(3):
            pooled[..., i, j] = padded[..., 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(-1, -2))
    theirs = np.diff(np.concatenate([np.zeros_like(pooled[:1]), pooled]), axis=0) * np.float32(theta)
    np.testing.assert_array_equal(theirs.astype(np.float32), ours)


def test_analysis_reports_the_pool_as_its_own_term():
    from eclsnn.analysis import analyze
    from eclsnn.analysis.report import format_analysis

    m, x = _trained_like(), torch.randn(8, 1, 14, 14)
    y = m(x).argmax(-1)
    variants = {n: convert(m, calibration=x, maxpool="auto", neuron=n) for n in ("dual", "if")}
    res = analyze(m, variants, [(x, y)], 4)
    for v in variants:
        pools = {p["name"]: p for p in res["variants"][v]["pools"]}
        assert set(pools) == {"p2", "p3"}
        assert pools["p3"]["self_error_max"] == 0.0  # exact on its own counts
        assert pools["p3"]["bias"]["mean_abs_theta"] > 0  # not against the ANN
        assert pools["p2"]["source"] is None and pools["p3"]["source"] == "r3"
        assert res["variants"][v]["totals"]["pool_comparisons"] == sum(p["comparisons"] for p in pools.values()) > 0
    assert res["variants"]["if"]["pools"][0]["firing_rate"]["negative"] == 0
    assert "Spiking max pools" in format_analysis(res)
