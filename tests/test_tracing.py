"""Tracing what torch.fx cannot trace as is (docs/MODELS.md, "Tracing"), and the graph forms that
torchvision and timm models bring (functional BatchNorm with shape assertions, channel shuffles, feature
slices, stacked max pools) — on small pure-torch models, so these run without either library."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eclsnn
from eclsnn.conversion.converter import fold_batchnorm
from eclsnn.conversion.graph import normalise, trace
from eclsnn.errors import ConversionError


class ShapeBranchHead(nn.Module):
    """As timm's VGG ConvMlp: pools up only inputs smaller than its kernel (Python branching on a shape)."""

    def __init__(self, channels: int, classes: int = 5, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.fc1 = nn.Conv2d(channels, 16, kernel)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        if x.shape[-2] < self.kernel or x.shape[-1] < self.kernel:
            x = F.adaptive_avg_pool2d(x, (max(self.kernel, x.shape[-2]), max(self.kernel, x.shape[-1])))
        return self.fc2(self.act(self.fc1(x)).mean((2, 3)))


def shape_branch_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         ShapeBranchHead(8)).eval()


def test_shape_branch_needs_an_example_and_the_error_names_the_module():
    with pytest.raises(ConversionError, match=r"submodule '3' \(ShapeBranchHead\).*example_input="):
        eclsnn.convert(shape_branch_net())


@pytest.mark.parametrize("side", [4, 12])  # the branch taken (4 -> 2 px < kernel) and not taken
def test_example_input_resolves_shape_branches_exactly(side):
    model = shape_branch_net()
    x = torch.randn(3, 3, side, side)
    gm = trace(model, example_input=x)
    assert torch.equal(gm(x), model(x))
    assert any(n.target is F.adaptive_avg_pool2d for n in gm.graph.nodes) == (side == 4)
    # the batch size stays free: shapes other than the batch are what the example fixes
    assert torch.equal(gm(torch.cat([x, x])), model(torch.cat([x, x])))
    snn = eclsnn.convert(model, calibration=x, example_input=x[:1])
    assert eclsnn.simulate(snn, x, 4).shape == (4, 3, 5)


def test_a_calibration_tensor_serves_as_the_example():
    model, x = shape_branch_net(), torch.randn(6, 3, 4, 4)
    snn = eclsnn.convert(model, calibration=x)
    prepared = eclsnn.prepare(model, calibration=x, levels=4)
    assert eclsnn.simulate(snn, x, 2).shape == (2, 6, 5) and prepared(x).shape == (6, 5)


class ValueBranch(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.sum() > 0 else -x


def test_a_branch_on_tensor_values_is_refused_even_with_an_example():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ValueBranch(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    with pytest.raises(ConversionError, match=r"submodule '1' \(ValueBranch\).*tensor values"):
        trace(model, example_input=x)


class FunctionalNormAct(nn.BatchNorm2d):
    """As timm's BatchNormAct2d: a BatchNorm2d whose forward asserts the rank, calls F.batch_norm, then acts."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


def test_functional_batchnorm_folds_and_shape_asserts_go():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), FunctionalNormAct(6), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(5, 3, 8, 8)
    model(x)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
    model.eval()
    gm = normalise(trace(model))
    assert not any(n.target is torch._assert for n in gm.graph.nodes)
    folded = fold_batchnorm(gm)
    assert not any(n.target is F.batch_norm or n.op == "get_attr" for n in folded.graph.nodes)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    snn = eclsnn.convert(model, calibration=x)
    assert len(snn.neurons()) == 1


class Shuffle(nn.Module):
    """ShuffleNet v2's channel shuffle and split, and DPN's channel slices."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        left, right = x.chunk(2, dim=1)
        return torch.cat([left, self.act(self.conv(torch.cat([right, x[:, :4]], 1)))[:, 2:]], 1)


def test_channel_shuffle_chunk_and_slices_convert_exactly_in_the_first_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Shuffle(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(4, 3, 6, 6)
    model(x)
    model.eval()
    snn = eclsnn.convert(model, calibration=x)
    out = eclsnn.simulate(snn, x, 64)[-1]
    ann = model(x)
    assert (out - ann).norm() / ann.norm() < 0.1  # converges to the ANN (rates, not an identity)


def test_moving_the_batch_dimension_is_refused():
    class BatchMove(nn.Module):
        def forward(self, x):
            return torch.transpose(F.relu(x), 0, 1)

    with pytest.raises(ConversionError, match="transpose involving the batch dimension"):
        eclsnn.convert(nn.Sequential(nn.Conv2d(3, 3, 1), BatchMove()), calibration=torch.rand(2, 3, 4, 4))


def test_a_max_pool_on_a_spiking_max_pool_is_a_spiking_max_pool():
    """GoogLeNet: a stage's max pool feeds a branch's stride-1 max pool; the second pool's increments are
    spikes of θ too, so it takes the maximum of the first pool's counts (exact on the SNN's counts)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 1, 1, ceil_mode=True), nn.Flatten(),
                          nn.LazyLinear(3))
    x = torch.rand(3, 3, 7, 7)
    model(x)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = eclsnn.convert(model, calibration=x, maxpool="auto", neuron="if")
    assert snn.settings["maxpool_modes"] == {"4": "cummax", "5": "cummax"}
    pools = [m for _, m in snn.named_modules() if type(m).__name__ == "SpikingMaxPool"]
    seen = {}
    snn.add_observer(lambda name, node, xs, out: seen.setdefault(name, out))
    eclsnn.simulate(snn, x, 8)
    neuron_out = seen["3"]  # [T, B, C, H, W] spikes ×θ of the last neuron layer
    theta = pools[0].theta
    counts = torch.round(neuron_out / theta).sum(0)
    inner = F.max_pool2d(counts, 2, ceil_mode=True)
    assert torch.equal(torch.round(seen["4"] / theta).sum(0), inner)
    assert torch.equal(torch.round(seen["5"] / theta).sum(0), F.max_pool2d(inner, 3, 1, 1, ceil_mode=True))
    assert counts.max() > 0


def test_functional_batchnorm_of_a_batchnorm_subclass_becomes_a_module_that_follows_train_mode():
    """The traced F.batch_norm call has eval mode baked in; prepare (which is followed by training) gets a
    BatchNorm module holding the same tensors instead, so training updates its statistics as the model's own
    BatchNorm would."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), FunctionalNormAct(6), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(5, 3, 8, 8)
    model(x)
    model.eval()
    prepared = eclsnn.prepare(model, levels=4, calibration=x)
    bn = prepared.get_submodule("1.bn")
    assert type(bn) is nn.BatchNorm2d and not any(n.target is F.batch_norm for n in prepared.graph.nodes)
    assert torch.equal(bn.running_mean, model[1].running_mean)  # calibration ran in eval mode
    assert torch.equal(prepared(x), eclsnn.prepare(model, levels=4, calibration=x)(x))
    prepared.train()
    prepared(x)
    assert not torch.equal(bn.running_mean, model[1].running_mean) and int(bn.num_batches_tracked) == 1
    assert sorted(k for k in prepared.state_dict() if k.startswith("1.")) == [
        "1.act.threshold_raw", "1.bn.bias", "1.bn.num_batches_tracked", "1.bn.running_mean", "1.bn.running_var",
        "1.bn.weight"]
