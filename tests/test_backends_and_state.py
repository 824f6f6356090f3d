"""The backend choice (one name, resolved in one place, per call > per network > use_backend > the
environment), the state protocol of stateful nodes, and observers on the executor."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import eclsnn
from eclsnn.core import backends
from eclsnn.core.backends import cpu as kernels
from eclsnn.core.neurons import DualThresholdIFNeuron, IFNeuron
from eclsnn.core.state import StatefulModule, is_stateful
from eclsnn.errors import BackendError, SimulationError
from eclsnn.simulation import SpikingNetwork


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = eclsnn.ThresholdClip(levels=4, init_threshold=1.0)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.act2 = eclsnn.ThresholdClip(levels=4, init_threshold=1.0)

    def forward(self, x):
        return self.act2(self.fc(self.pool(self.act(self.conv(x))).flatten(1)))


@pytest.fixture
def snn():
    torch.manual_seed(0)
    return eclsnn.convert(PoolNet().eval(), neuron="dual")


@pytest.fixture
def calls(monkeypatch):
    """Count the calls into the fused CPU kernels."""
    counts = {"neuron_run": 0, "neuron_pool_run": 0, "clip_forward": 0}
    for name in counts:
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return counts


def _kernel_calls(counts) -> int:
    return counts["neuron_run"] + counts["neuron_pool_run"]


@pytest.fixture(autouse=True)
def _kernels_built():
    assert kernels.built(), kernels.build_error()


def test_an_unknown_backend_is_refused_with_the_names(snn):
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(BackendError, match="'auto', 'reference', 'fused-cpu'"):
        eclsnn.simulate(snn, x, 2, backend="cuda-please")
    with pytest.raises(BackendError):
        snn.backend = "fast"
    with pytest.raises(BackendError):
        with eclsnn.use_backend("nope"):
            pass


def test_the_backend_is_chosen_per_call_per_network_by_block_and_by_environment(snn, calls, monkeypatch):
    x = torch.randn(3, 2, 8, 8)
    auto = eclsnn.simulate(snn, x, 4)
    assert _kernel_calls(calls) > 0 and calls["neuron_pool_run"] > 0  # fused with the 2×2 pooling
    before = _kernel_calls(calls)
    assert torch.equal(eclsnn.simulate(snn, x, 4, backend="reference"), auto)
    assert _kernel_calls(calls) == before  # the call's choice
    snn.backend = "reference"
    assert torch.equal(eclsnn.simulate(snn, x, 4), auto)
    assert _kernel_calls(calls) == before  # the network's choice
    eclsnn.simulate(snn, x, 4, backend="fused-cpu")
    assert _kernel_calls(calls) > before  # the call beats the network
    snn.backend = None
    before = _kernel_calls(calls)
    with eclsnn.use_backend("reference"):
        eclsnn.simulate(snn, x, 4)
    assert _kernel_calls(calls) == before  # the block's choice
    monkeypatch.setenv("ECLSNN_KERNELS", "off")
    eclsnn.simulate(snn, x, 4)
    assert _kernel_calls(calls) == before  # the environment's default
    eclsnn.simulate(snn, x, 4, backend="auto")
    assert _kernel_calls(calls) > before  # an explicit choice beats the environment


def test_the_clip_follows_the_same_rule(calls):
    clip = eclsnn.ThresholdClip(levels=4)
    z = torch.randn(4, 3, 5, 5)
    out = clip(z)
    assert calls["clip_forward"] == 1
    clip.backend = "reference"
    assert torch.equal(clip(z), out)
    assert calls["clip_forward"] == 1
    with eclsnn.use_backend("reference"):
        clip.backend = None
        clip(z)
    assert calls["clip_forward"] == 1


def test_fused_cpu_without_kernels_is_an_error_auto_falls_back(snn, monkeypatch):
    monkeypatch.setattr(kernels, "built", lambda warn=True: False)
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(BackendError, match="could not be built.*'auto'"):
        eclsnn.simulate(snn, x, 2, backend="fused-cpu")
    with eclsnn.use_backend("reference"):
        ref = eclsnn.simulate(snn, x, 2)
    assert torch.equal(eclsnn.simulate(snn, x, 2, backend="auto"), ref)


def test_resolve_gives_the_default_and_checks_names(monkeypatch):
    monkeypatch.delenv("ECLSNN_KERNELS", raising=False)
    assert backends.resolve() == "auto"
    monkeypatch.setenv("ECLSNN_KERNELS", "on")
    assert backends.resolve() == "fused-cpu"
    with backends.use_backend("reference"):
        assert backends.resolve() == "reference" and backends.resolve("auto") == "auto"


# ---- the state protocol -------------------------------------------------------------------------------

@pytest.mark.parametrize("neuron_cls", [IFNeuron, DualThresholdIFNeuron])
@pytest.mark.parametrize("backend", ["reference", "fused-cpu"])
def test_state_and_load_state_continue_a_run_exactly(neuron_cls, backend):
    torch.manual_seed(1)
    n = neuron_cls(torch.tensor([0.5, 1.0, 1.5]))
    x = torch.randn(7, 4, 3, 5)
    whole = n.multi_step(x, backend=backend)
    first = n.multi_step(x[:3], backend=backend)
    saved = {k: v.clone() for k, v in n.state().items()}
    n.reset()
    assert not n.has_state()
    n.load_state(saved)
    rest = n.multi_step(x[3:], carry=True, backend=backend)
    assert torch.equal(torch.cat([first, rest]), whole)
    assert set(saved) == set(n.state_names) and all(v.shape == x[0].shape for v in saved.values())
    assert (whole != 0).any()
    with pytest.raises(KeyError, match="no state"):
        n.load_state({"w": saved["v"]})


@torch.no_grad()
@pytest.mark.parametrize("backend", ["reference", "fused-cpu"])
def test_keep_rows_drops_samples_from_every_stateful_node(snn, backend):
    torch.manual_seed(2)
    x = torch.randn(6, 2, 8, 8)
    snn.max_rows = None
    whole = snn.run(x, 6, backend=backend)
    snn.reset()
    snn.run(x, 2, carry_state=True, backend=backend)
    keep = torch.tensor([True, False, True, True, False, True])
    snn.keep_rows(keep)
    for _, node in snn.stateful_nodes():
        assert all(v.shape[0] == 4 for v in node.state().values())
    rest = snn.run(x[keep], 4, carry_state=True, backend=backend)
    assert torch.equal(rest, whole[2:, keep])


class StepCounter(StatefulModule):
    """A toy stateful node that is not a neuron: outputs its input times the number of steps seen."""

    state_names = ("steps",)
    emits_spikes = False

    def __init__(self):
        super().__init__()
        self.steps = None

    def multi_step(self, x_seq, carry=False, backend=None):
        start = self.steps if carry and self.steps is not None else torch.zeros(x_seq.shape[1])
        counts = start + torch.arange(1, x_seq.shape[0] + 1).view(-1, 1)
        self.steps = counts[-1]
        return x_seq * counts.view(*counts.shape, *([1] * (x_seq.dim() - 2)))


def test_the_network_finds_stateful_nodes_through_the_protocol():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.counter = StepCounter()

        def forward(self, x):
            return self.counter(self.fc(x))

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, StepCounter) or super().is_leaf_module(m, qualname)

    model = Net()
    net = SpikingNetwork(fx.GraphModule(model, Tracer().trace(model)))
    assert is_stateful(net.graph_module.counter)
    assert [name for name, _ in net.stateful_nodes()] == ["counter"] and net.neurons() == []
    x = torch.randn(4, 3)
    out = net.run(x, 3)
    assert torch.allclose(out[2], 3 * out[0])
    net.keep_rows(torch.tensor([0, 2]))
    assert net.graph_module.counter.steps.shape == (2,)
    net.reset()
    assert net.graph_module.counter.steps is None


# ---- observers ------------------------------------------------------------------------------------

@torch.no_grad()  # (the kernels have no autograd: with gradients the neurons run on the reference path)
def test_observers_see_spike_maps_unfused_and_can_be_removed(snn, calls):
    x = torch.randn(2, 2, 8, 8)
    fused = snn.run(x, 4)
    seen = []
    handle = snn.add_observer(lambda name, node, inp, out: seen.append((name, tuple(out.shape), node)))
    pooled_before = calls["neuron_pool_run"]
    assert torch.equal(snn.run(x, 4), fused)
    assert calls["neuron_pool_run"] == pooled_before  # observed layers run unfused
    assert [(n, s) for n, s, _ in seen] == [("act", (4, 2, 4, 8, 8)), ("act2", (4, 2, 3))]
    assert all(isinstance(node, DualThresholdIFNeuron) for *_, node in seen)
    handle.remove()
    snn.run(x, 4)
    assert len(seen) == 2 and calls["neuron_pool_run"] > pooled_before


def test_a_bad_step_mode_is_one_error_type():
    with pytest.raises(SimulationError, match="step_mode"):
        IFNeuron(1.0, step_mode="multiple")
    snn = eclsnn.convert(nn.Sequential(nn.Linear(3, 3), eclsnn.ThresholdClip()))
    with pytest.raises(SimulationError, match="step_mode"):
        snn.set_step_mode("multiple")
