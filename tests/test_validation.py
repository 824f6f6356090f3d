"""Parameters and buffers are validated at the conversion boundary (issue #14, item 4): non-finite or
negative BatchNorm statistics and non-finite buffers are refused with the layer's name; `levels` beyond
what the arithmetic can represent is refused instead of wrapping around."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eclsnn
from eclsnn.core.functional import threshold_clip
from eclsnn.errors import ConfigError, ConversionError


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), eclsnn.ThresholdClip(levels=4),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.parametrize("buffer,value,why", [
    ("running_var", float("nan"), "not finite"),
    ("running_mean", float("inf"), "not finite"),
    ("running_var", -1.0, "negative variance"),
])
def test_bad_batchnorm_statistics_are_refused_by_name(buffer, value, why):
    model = _bn_net()
    getattr(model[1], buffer)[2] = value
    with pytest.raises(ConversionError, match=f"1.{buffer}.*{why}"):
        eclsnn.convert(model)


def test_good_batchnorm_statistics_convert():
    model = _bn_net()
    snn = eclsnn.convert(model)
    out = eclsnn.simulate(snn, torch.randn(2, 1, 8, 8), 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("levels", [2**24 + 1, 2**63, 2**64 + 1])
def test_levels_beyond_the_arithmetic_are_refused(levels):
    with pytest.raises(ConfigError, match="levels"):
        eclsnn.ThresholdClip(levels=levels)
    with pytest.raises(ConfigError, match="levels"):
        threshold_clip(torch.randn(4, 3), 1.0, levels=levels)


def test_the_largest_levels_still_work_on_every_backend():
    z = torch.rand(64, 3) * 2
    outs = [threshold_clip(z, torch.tensor(1.0), levels=2**24) for _ in range(1)]
    with eclsnn.use_backend("reference"):
        ref = threshold_clip(z, torch.tensor(1.0), levels=2**24)
    assert torch.equal(outs[0], ref)
    assert torch.allclose(ref, z.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("node,field,value", [("2", "weight", float("nan")), ("0", "bias", float("inf"))])
def test_from_nir_refuses_non_finite_weights_and_biases(node, field, value):
    pytest.importorskip("nir")
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), eclsnn.ThresholdClip(levels=4), nn.Linear(5, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = eclsnn.to_nir(eclsnn.convert(model, neuron="if"), torch.zeros(1, 4))
    assert eclsnn.from_nir(graph) is not None  # the unmodified graph imports
    getattr(graph.nodes[node], field).flat[0] = value
    with pytest.raises(ConversionError, match=f"'{node}.{field}' holds NaN or infinite values"):
        eclsnn.from_nir(graph)
