"""NIR export and import (docs/NIR.md).

- Round trip to_nir -> nir.write -> nir.read -> from_nir is bit-identical to the original simulation,
  for IF and dual-threshold neurons (that goes through eclsnn's metadata, so alone it proves little).
- The default ("exact") form means what it says in NIR's own terms: a literal executor of NIR's
  primitives (nirtorch's graph interpreter with I: v += r*x, Threshold: x > thr, Scale: x*s), which
  never looks at eclsnn's metadata, reproduces the IF network spike for spike.
- Another framework: snnTorch reads the "if" form; the differences in its semantics are asserted as
  documented, and with a configuration that matches (no leak, membrane started at v_init*theta) its
  spike counts and readout equal eclsnn's at T steps.

Exact equality needs exact arithmetic, so the networks of those tests are dyadic (SPEC.md).
"""

from __future__ import annotations

import json
import warnings

import nir
import nirtorch
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from snntorch.import_nir import import_from_nir
from torch import nn

import eclsnn
from eclsnn import ConversionError, DualThresholdIFNeuron, IFNeuron, ThresholdClip, convert, simulate
from eclsnn.io.nir import META, NIRExportWarning, from_nir, read_nir, to_nir, write_nir

T = 8


# ---- networks --------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), ThresholdClip(4, 1.0), nn.Linear(16, 12),
                         ThresholdClip(4, 1.5), nn.Linear(12, 3)).eval()


class ResidualCNN(nn.Module):
    """conv - clip (per-channel θ) - [conv + skip] - clip - avgpool - adaptive avgpool - flatten - linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = ThresholdClip(4, per_channel=True, num_channels=4, init_threshold=1.0)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.act2 = ThresholdClip(4, init_threshold=2.0)
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.act2(self.conv2(a) + a)
        return self.fc(torch.flatten(self.gap(self.pool(b)), 1))


def _cnn():
    torch.manual_seed(1)
    model = ResidualCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.act1.threshold_raw.copy_(torch.tensor([1.0, 0.75, 1.5, 0.5]))
    return model.eval()


def _dyadic(model: nn.Module, seed: int, bits: int = 4, offset: float = 0.0) -> nn.Module:
    """Weights k/2^bits, k in -4..4; biases the same plus ``offset`` (a residue that keeps membranes off
    the thresholds, see the snnTorch tests). BatchNorm left at identity so folding stays exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.copy_(torch.randint(-4, 5, mod.weight.shape, generator=g).float() / 2 ** bits)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randint(-4, 5, mod.bias.shape, generator=g).float() / 2 ** bits + offset)
    return model.eval()


def _dyadic_input(shape, seed: int) -> torch.Tensor:
    return torch.randint(-8, 17, shape, generator=torch.Generator().manual_seed(seed)).float() / 16


def _dyadic_cnn():
    model = _dyadic(_cnn(), seed=3)
    with torch.no_grad():
        model.bn1.running_mean.zero_()
        model.bn1.running_var.fill_(1.0)
        model.bn1.eps = 0.0
        model.act1.threshold_raw.copy_(torch.tensor([1.0, 0.5, 2.0, 0.25]))
    return model


def _roundtrip(snn, x, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NIRExportWarning)
        path = write_nir(snn, tmp_path / "snn.nir", x, **kw)
    return read_nir(path)


# ---- round trip through eclsnn's own files -------------------------------------------------------------

@pytest.mark.parametrize("neuron", ["if", "dual"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_round_trip_is_bit_identical(tmp_path, neuron, net):
    model, x = (_mlp(), torch.randn(32, 6)) if net == "mlp" else (_cnn(), torch.randn(8, 2, 8, 8))
    snn = convert(model, neuron=neuron, theta_neg=-0.25 if neuron == "dual" else 0.0)
    back = _roundtrip(snn, x, tmp_path)
    assert isinstance(back, eclsnn.SpikingNetwork)
    assert torch.equal(simulate(back, x, T), simulate(snn, x, T))
    ours, theirs = snn.thresholds(), back.thresholds()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].shape == theirs[name].shape and torch.equal(ours[name], theirs[name])
    for (_, a), (_, b) in zip(snn.neurons(), back.neurons()):
        assert type(a) is type(b) and a.v_init == b.v_init
        assert getattr(a, "theta_neg", None) == getattr(b, "theta_neg", None)


def test_round_trip_of_the_if_form(tmp_path):
    """NIR IF nodes with θ folded into the next weights; read back through the metadata, exact for
    power-of-two θ (θ·(1/θ) = 1)."""
    model = _dyadic_cnn()
    x = _dyadic_input((4, 2, 8, 8), 5)
    for neuron in ("if", "dual"):
        snn = convert(model, neuron=neuron)
        back = _roundtrip(snn, x, tmp_path, neurons="if")
        assert torch.equal(simulate(back, x, T), simulate(snn, x, T)), neuron


@pytest.mark.parametrize("neurons", ["exact", "if"])
def test_functional_layers_round_trip(tmp_path, neurons):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding="same")
            self.fc, self.fc2 = nn.Linear(2 * 2 * 2, 2), nn.Linear(2, 2)

        def forward(self, x):
            p = F.avg_pool2d(F.relu(self.conv(x)), 2)
            b = F.relu(0.5 * p - p / 4)
            # (.reshape: .view fails on the simulator's channels-last maps)
            return self.fc(-b.reshape(b.size(0), -1)) + self.fc2(b.mean((2, 3)))

    model = _dyadic(Net(), seed=4)
    x = _dyadic_input((4, 1, 4, 4), 6)
    snn = convert(model, neuron="if", calibration=x, thresholds=None)
    for _, neuron in snn.neurons():  # power-of-two thresholds keep the "if" form's θ·(1/θ) exact
        neuron.theta.copy_(2.0 ** torch.round(torch.log2(neuron.theta)))
    back = _roundtrip(snn, x, tmp_path, neurons=neurons)
    assert torch.equal(simulate(back, x, T), simulate(snn, x, T))


# ---- what the file holds -------------------------------------------------------------------------------

def _meta(node):
    return node.metadata[META]


def test_exact_form_structure(tmp_path):
    model = _cnn()
    snn = convert(model, neuron="if", v_init=0.5)
    x = torch.randn(2, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NIRExportWarning)  # IF neurons: nothing lives only in metadata
        graph = nir.read(write_nir(snn, tmp_path / "g.nir", x))
    nodes, edges = graph.nodes, set(graph.edges)
    # the converted layers: BN folded into the conv, biases as per-step currents
    conv1 = snn.graph_module.get_submodule("conv1")
    assert isinstance(nodes["conv1"], nir.Conv2d)
    np.testing.assert_array_equal(nodes["conv1"].weight, conv1.weight.detach().numpy())
    np.testing.assert_array_equal(nodes["conv1"].bias, conv1.bias.detach().numpy())
    assert "bn1" not in nodes and not np.any(nodes["conv2"].bias)  # conv2 had no bias
    assert isinstance(nodes["pool"], nir.AvgPool2d) and isinstance(nodes["gap"], nir.AvgPool2d)
    assert isinstance(nodes["flatten"], nir.Flatten) and nodes["flatten"].start_dim == 0  # one sample's dims
    assert isinstance(nodes["fc"], nir.Affine) and isinstance(nodes["output"], nir.Output)
    for name, neuron in snn.neurons():
        theta = np.broadcast_to(neuron.theta.numpy().reshape(-1, 1, 1), nodes[f"{name}.v"].r.shape)
        v, fire, reset, out = (nodes[f"{name}{s}"] for s in (".v", ".fire", ".reset", ""))
        assert isinstance(v, nir.I) and np.all(v.r == 1)
        assert isinstance(fire, nir.Threshold) and isinstance(reset, nir.Scale) and isinstance(out, nir.Scale)
        assert {(f"{name}.v", f"{name}.fire"), (f"{name}.fire", f"{name}.reset"), (f"{name}.reset", f"{name}.v"),
                (f"{name}.fire", name)} <= edges  # the subtractive reset is the feedback edge
        np.testing.assert_array_equal(reset.scale, -theta)
        np.testing.assert_array_equal(out.scale, theta)
        # v(0) = θ/2 as a threshold of θ/2 on v − θ/2; one float32 step lower turns NIR's ">" into "≥"
        c = (theta * 0.5).astype(np.float32)
        assert np.all(fire.threshold < c) and np.all(np.nextafter(fire.threshold, np.float32(np.inf)) == c)
        record = _meta(v)
        assert record["reset"] == "subtract" and float(record["v_init"]) == 0.5 and record["neuron"] == "if"
    assert ("conv2", "act2.v") in edges and ("act1", "act2.v") in edges  # the residual sum: two edges in
    assert ("act1", "conv2") in edges
    assert json.loads(_meta(graph)["settings"])["neuron"] == "if"
    assert _meta(graph)["format"] == "eclsnn-nir"


def test_dual_neuron_lives_partly_in_metadata_and_says_so(tmp_path):
    snn = convert(_mlp(), neuron="dual", theta_neg=-0.5)
    with pytest.warns(NIRExportWarning, match="negative spikes and count gate"):
        graph = to_nir(snn, torch.randn(2, 6))
    for name, _ in snn.neurons():
        record = _meta(graph.nodes[f"{name}.v"])
        assert record["neuron"] == "dual" and record["theta_neg"] == -0.5
        assert "count gate" in record["only_in_metadata"] and "negative spikes" in record["only_in_metadata"]
        assert isinstance(graph.nodes[f"{name}.v"], nir.I)  # the IF skeleton is still exact NIR


def test_if_form_nodes_and_warning():
    snn = convert(_mlp(), neuron="if")
    with pytest.warns(NIRExportWarning, match="subtractive reset.*v_init"):
        graph = to_nir(snn, torch.randn(2, 6), neurons="if")
    neurons = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert len(neurons) == 2 and not any(isinstance(n, (nir.I, nir.Threshold)) for n in graph.nodes.values())
    for name, neuron in snn.neurons():
        node = graph.nodes[name]
        np.testing.assert_array_equal(node.v_threshold, np.full(node.v_threshold.shape, neuron.theta.item(), np.float32))
        record = _meta(node)
        assert record["reset"] == "subtract" and "v_init" in record["only_in_metadata"]
    fc = snn.graph_module.get_submodule("5")  # θ = 1.5 of the neuron before folded into the readout weights
    np.testing.assert_array_equal(graph.nodes["5"].weight, fc.weight.detach().numpy() * np.float32(1.5))
    np.testing.assert_array_equal(graph.nodes["5"].bias, fc.bias.detach().numpy())


# ---- the exact form in NIR's own semantics (no metadata) ------------------------------------------------

class _Integrator(nn.Module):
    """NIR I, one step per time unit: v += r * x, starting from 0."""

    def __init__(self, r):
        super().__init__()
        self.register_buffer("r", torch.as_tensor(np.asarray(r)))
        self.v = None

    def forward(self, x):
        self.v = self.r * x if self.v is None else self.v + self.r * x
        return self.v


class _Threshold(nn.Module):
    def __init__(self, thr):
        super().__init__()
        self.register_buffer("thr", torch.as_tensor(np.asarray(thr)))

    def forward(self, x):
        return (x > self.thr).to(x.dtype)  # NIR's Heaviside is strict


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", torch.as_tensor(np.asarray(s)))

    def forward(self, x):
        return x * self.s


def _affine(node):
    m = nn.Linear(node.weight.shape[1], node.weight.shape[0])
    m.weight.data, m.bias.data = torch.as_tensor(node.weight), torch.as_tensor(node.bias)
    return m  # (nirtorch 2.6's default Affine mapping drops the bias)


LITERAL = {nir.I: lambda n: _Integrator(n.r), nir.Threshold: lambda n: _Threshold(n.threshold),
           nir.Scale: lambda n: _Scale(n.scale), nir.Affine: _affine,
           nir.Flatten: lambda n: nn.Flatten(n.start_dim + 1, n.end_dim if n.end_dim < 0 else n.end_dim + 1)}


def _run_literally(graph, x, steps):
    net = nirtorch.nir_to_torch(graph, LITERAL)
    state, outs = None, []
    with torch.no_grad():
        for _ in range(steps):
            out, state = net(x, state)
            outs.append(out)
    return torch.stack(outs)


def test_exact_form_runs_in_a_literal_nir_executor(tmp_path):
    model = _dyadic_cnn()
    x = _dyadic_input((6, 2, 8, 8), 7)
    snn = convert(model, neuron="if", v_init=0.5)
    graph = nir.read(write_nir(snn, tmp_path / "g.nir", x))
    for node in [graph, *graph.nodes.values()]:
        node.metadata = {}  # the reader must not need eclsnn's metadata
    ours = snn.run(x, T)  # the readout of every step
    assert ours.abs().sum() > 0
    assert torch.equal(_run_literally(graph, x, T), ours)
    # without metadata, eclsnn's own reader recovers the same IF network from the structure alone
    assert torch.equal(from_nir(graph).run(x, T), ours)


def test_a_reader_that_ignores_metadata_runs_the_dual_network_as_if_neurons(tmp_path):
    model = _dyadic_cnn()
    x = _dyadic_input((6, 2, 8, 8), 8)
    with pytest.warns(NIRExportWarning):
        graph = to_nir(convert(model, neuron="dual"), x)
    as_if = convert(model, neuron="if").run(x, T)
    assert torch.equal(_run_literally(graph, x, T), as_if)
    assert not torch.equal(convert(model, neuron="dual").run(x, T), as_if)  # so the difference is real


def test_tie_rule_is_exact_in_float32():
    """Constant input θ/2 with v(0) = θ/2 reaches θ exactly at step 1: eclsnn fires (m ≥ θ); NIR's
    strict threshold fires too because it sits one float32 step below θ/2 — at θ/2 it would not."""
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0), lin.bias.zero_()
    snn = convert(nn.Sequential(lin, ThresholdClip(0, 1.0), nn.Linear(1, 1)).eval(), neuron="if")
    x = torch.tensor([[0.5]])
    graph = to_nir(snn, x)
    spikes = lambda g: torch.stack([o for o in _run_literally_layer(g, x, "1.fire")])  # noqa: E731
    assert spikes(graph).flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    graph.nodes["1.fire"].threshold = np.full((1,), 0.5, np.float32)  # the threshold without the float32 step
    assert spikes(graph).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def _run_literally_layer(graph, x, layer, steps=4):
    net = nirtorch.nir_to_torch(graph, LITERAL)
    seen = []
    net.get_submodule(layer.replace(".", "_")).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    state = None
    with torch.no_grad():
        for _ in range(steps):
            _, state = net(x, state)
    return seen


# ---- another framework: snnTorch reads the "if" form -----------------------------------------------------

OFFSET = 2.0 ** -14  # bias residue: a membrane is t·2^-14 off the 2^-9 grid of θ and v_init·θ, never on θ for t < 32


def _snntorch_mlp():
    """Dyadic MLP whose per-step input currents stay within [−θ, θ] and whose membranes never equal θ
    (no ties: snnTorch fires on mem > θ, eclsnn on ≥; that difference is tested on its own below)."""
    model = nn.Sequential(nn.Linear(6, 8), ThresholdClip(4, 1.0), nn.Linear(8, 8), ThresholdClip(4, 0.5),
                          nn.Linear(8, 3))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mod, bits in ((model[0], 5), (model[2], 6), (model[4], 5)):
            mod.weight.copy_(torch.randint(-4, 5, mod.weight.shape, generator=g).float() / 2 ** bits)
            mod.bias.copy_(torch.randint(-4, 5, mod.bias.shape, generator=g).float() / 2 ** bits + OFFSET)
    return model.eval()


def _snntorch_net(snn, x, tmp_path):
    with pytest.warns(NIRExportWarning):
        path = write_nir(snn, tmp_path / "if.nir", x, neurons="if")
    return import_from_nir(nir.read(path))


def _leaky(net):
    import snntorch

    return {n: m for n, m in net.named_modules() if isinstance(m, snntorch.Leaky)}


def _run_snntorch(net, x, steps, start=None):
    """Per-step readout and per-layer spike counts of an imported snnTorch network; ``start`` gives
    initial membranes by layer (default: snnTorch's own, zero)."""
    leaky = _leaky(net)
    counts = {n: 0 for n in leaky}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts[n] + o.detach())) for n, m in leaky.items()]
    for n, m in leaky.items():  # a fresh run: snnTorch keeps a membrane whose shape fits the input
        m.mem = torch.zeros(0) if start is None else start[n].clone()
    state, outs = None, []
    with torch.no_grad():
        for _ in range(steps):
            out, state = net(x, state)
            outs.append(out)
    for h in hooks:
        h.remove()
    return torch.stack(outs), counts


def _run_ours(snn, x, steps):
    counts = {name: 0 for name, _ in snn.neurons()}
    thetas = snn.thresholds()
    snn.set_step_mode("single")
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts[n] + o / thetas[n]))
             for n, m in snn.neurons()]
    outs = []
    with torch.no_grad():
        for _ in range(steps):
            outs.append(snn(x))
    for h in hooks:
        h.remove()
    snn.set_step_mode("multi")
    return torch.stack(outs), counts


def _inputs_stay_in_band(snn, x):
    """Precondition of the comparison: every neuron's per-step input lies in [−θ, θ], so no membrane is
    still above θ after its reset (snnTorch's Leaky subtracts θ again before the next firing check then)."""
    seen = []
    snn.set_step_mode("single")
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(bool((i[0].abs() <= m.theta).all())))
             for _, m in snn.neurons()]
    with torch.no_grad():
        for _ in range(T):
            snn(x)
    for h in hooks:
        h.remove()
    snn.set_step_mode("multi")
    return all(seen)


def _configure(net, beta=None):
    """snnTorch 1.0.0 builds nir.IF as Leaky(init_hidden=False), which returns (spikes, membrane): the
    next layer then gets a tuple. init_hidden=True makes it return spikes and keep its membrane."""
    for m in _leaky(net).values():
        m.init_hidden = True
        if beta is not None:
            m.beta = torch.tensor(beta)


def test_snntorch_spike_counts_match_with_the_documented_configuration(tmp_path):
    model = _snntorch_mlp()
    x = torch.randint(0, 17, (64, 6), generator=torch.Generator().manual_seed(12)).float() / 16
    snn = convert(model, neuron="if", v_init=0.5)
    assert _inputs_stay_in_band(snn, x)
    net = _snntorch_net(snn, x, tmp_path)
    ours_out, ours_counts = _run_ours(snn, x, T)
    assert all(c.sum() > 0 for c in ours_counts.values()) and ours_out.abs().sum() > 0

    # as imported, snnTorch 1.0.0 cannot run it, and it reads nir.IF as a leaky neuron (beta = 0.9)
    with pytest.raises(TypeError, match="tuple"):
        net(x)
    leaky = _leaky(net)
    assert sorted(leaky) == ["1", "3"]
    for m in leaky.values():
        assert m.beta.item() == pytest.approx(0.9) and m.reset_mechanism == "subtract" and not m.reset_delay
    _configure(net)
    _, counts = _run_snntorch(net, x, T)
    assert any(not torch.equal(counts[n], ours_counts[n]) for n in leaky)

    # configured to match: no leak, membrane started at v_init·θ (read from eclsnn's metadata)
    graph = nir.read(tmp_path / "if.nir")
    start = {n: torch.from_numpy(float(graph.nodes[n].metadata[META]["v_init"]) * graph.nodes[n].v_threshold)
             .expand(x.shape[0], -1) for n in leaky}
    _configure(net, beta=1.0)
    out, counts = _run_snntorch(net, x, T, start)
    for n in leaky:
        assert torch.equal(counts[n], ours_counts[n]), n
    assert torch.equal(out, ours_out)
    assert torch.equal(out.cumsum(0) / torch.arange(1, T + 1).view(T, 1, 1), simulate(snn, x, T))

    # left at mem(0) = 0, snnTorch is eclsnn's IF neuron without v_init (v(0) = 0): the metadata is ignored
    _, counts = _run_snntorch(net, x, T)
    _, zero_counts = _run_ours(convert(model, neuron="if", v_init=0.0), x, T)
    for n in leaky:
        assert torch.equal(counts[n], zero_counts[n]), n
    assert any(not torch.equal(zero_counts[n], ours_counts[n]) for n in leaky)


def test_snntorch_fires_only_above_the_threshold():
    """A tie: constant input θ/2 from v(0) = 0 reaches θ exactly at step 2; eclsnn fires then (m ≥ θ),
    snnTorch (mem > θ) at step 3."""
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0), lin.bias.zero_()
    snn = convert(nn.Sequential(lin, ThresholdClip(0, 1.0), nn.Linear(1, 1)).eval(), neuron="if", v_init=0.0)
    x = torch.tensor([[0.5]])
    with pytest.warns(NIRExportWarning):
        net = import_from_nir(to_nir(snn, x, neurons="if"))
    _configure(net, beta=1.0)
    _, counts = _run_snntorch(net, x, 4)
    _, ours = _run_ours(snn, x, 4)
    assert ours["1"].item() == 2 and counts["1"].item() == 1


def test_snntorch_refuses_per_channel_thresholds_and_flattens_batched_dims(tmp_path):
    model = _dyadic_cnn()
    x = _dyadic_input((2, 2, 8, 8), 9)
    with pytest.warns(NIRExportWarning):
        graph = to_nir(convert(model, neuron="if"), x, neurons="if")
    with pytest.raises(AssertionError, match="v_threshold"):
        import_from_nir(graph)
    # NIR's Flatten dims are those of one sample (0 = the first non-batch dim); snnTorch hands them to
    # torch.nn.Flatten, which counts the batch dimension
    flat = [n for n in graph.nodes.values() if isinstance(n, nir.Flatten)]
    assert [n.start_dim for n in flat] == [0]


# ---- errors -------------------------------------------------------------------------------------------

def test_reading_a_foreign_if_node_is_refused():
    graph = nir.NIRGraph.from_list(nir.Affine(np.eye(2, dtype=np.float32), np.zeros(2, np.float32)),
                                   nir.IF(r=np.ones(2, np.float32), v_threshold=np.ones(2, np.float32)),
                                   nir.Affine(np.eye(2, dtype=np.float32), np.zeros(2, np.float32)))
    with pytest.raises(ConversionError, match="resets to v_reset"):
        from_nir(graph)


def test_unsupported_nodes_are_named():
    lif = nir.LIF(tau=np.ones(2), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2))
    graph = nir.NIRGraph.from_list(nir.Affine(np.eye(2, dtype=np.float32), np.zeros(2, np.float32)), lif)
    with pytest.raises(ConversionError, match="'lif' \\(LIF\\)"):
        from_nir(graph)
    with pytest.raises(ConversionError, match="not found"):
        read_nir("/nonexistent/file.nir")
    with pytest.raises(ConversionError, match="nir.NIRGraph"):
        from_nir(object())


def test_export_errors_name_the_layer():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act = nn.Linear(4, 4), ThresholdClip(4, 1.0)

        def forward(self, x):
            y = self.act(self.a(x))
            return torch.cat([y, y], 1)

    snn = convert(Cat().eval())
    with pytest.raises(ConversionError, match="cat.*concatenat"):
        to_nir(snn, torch.randn(2, 4))
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 2, 1), ThresholdClip(4, 1.0), nn.Linear(8, 2)

        def forward(self, x):
            a = self.act(self.conv(x))
            return self.fc(torch.flatten(a + a.mean((2, 3), keepdim=True), 1))

    with pytest.raises(ConversionError, match="add.*broadcasting"):
        to_nir(convert(Broadcast().eval()), torch.randn(2, 1, 2, 2))
    with pytest.raises(ConversionError, match="sample_input of shape"):
        to_nir(convert(Broadcast().eval()), torch.randn(2, 3, 2, 2))
    with pytest.raises(ConversionError, match="neurons must be"):
        to_nir(snn, torch.randn(2, 4), neurons="lif")
    with pytest.raises(ConversionError, match="SpikingNetwork"):
        to_nir(_mlp(), torch.randn(2, 6))


def test_missing_nir_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nir", None)
    with pytest.raises(ConversionError, match=r'pip install "eclsnn\[nir\]"'):
        to_nir(convert(_mlp()), torch.randn(2, 6))


def test_unfolded_batchnorm_becomes_a_per_channel_affine(tmp_path):
    class PreNorm(nn.Module):  # BN after an addition: nothing to fold it into
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), ThresholdClip(4, 1.0)
            self.fc = nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.act(self.bn(self.conv(x) + x)), 1))

    model = PreNorm()
    with torch.no_grad():
        model.bn.running_var.fill_(4.0), model.bn.running_mean.fill_(0.25), model.bn.weight.fill_(0.5)
    model.eval()
    snn = convert(model, neuron="if")
    x = torch.randn(4, 2, 4, 4)
    graph = to_nir(snn, x)
    bn = graph.nodes["bn"]
    assert isinstance(bn, nir.Conv2d) and bn.weight.shape == (2, 2, 1, 1)
    back = from_nir(graph)
    torch.testing.assert_close(simulate(back, x, T), simulate(snn, x, T))


# ---- command line -------------------------------------------------------------------------------------

def test_cli_export_nir(tmp_path, capsys):
    from eclsnn.io.checkpoint import save_checkpoint
    from eclsnn.cli import main
    from eclsnn.recipes.common import load_ann
    from eclsnn.models import create

    kw = {"arch": "cnn-fmnist", "num_classes": 10, "activation": "clip", "levels": 4, "init_threshold": 4.0,
          "per_channel": False, "in_channels": 1, "pool": "avg", "dropout": 0.0}
    torch.manual_seed(0)
    args = dict(kw)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last", create(args.pop("arch"), **args), {"model": kw})
    assert main(["export", str(tmp_path / "run"), "--format", "nir"]) == 0
    out = tmp_path / "run" / "snn.nir"
    assert out.is_file() and "neurons: exact" in capsys.readouterr().out
    back = read_nir(out)
    model, _ = load_ann(tmp_path / "run")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(simulate(back, x, 2), simulate(convert(model), x, 2))
    assert isinstance(back.neurons()[0][1], DualThresholdIFNeuron)  # the default neuron survives
    assert main(["export", str(tmp_path / "run"), "--format", "nir", "--nir-neurons", "if", "--neuron", "if",
                 "-o", str(tmp_path / "if.nir")]) == 0
    assert "eclsnn: warning: NIR has no field for subtractive reset" in capsys.readouterr().err
    assert all(isinstance(m, IFNeuron) for _, m in read_nir(tmp_path / "if.nir").neurons())
