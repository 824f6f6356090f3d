"""Parameter export (npz/json): the file alone is enough to re-run the SNN (a numpy simulation from the
exported arrays matches eclsnn's simulator), and nothing in it needs unpickling."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from eclsnn import ConversionError, ThresholdClip, convert, simulate
from eclsnn.io.export import describe, export_json, export_npz


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), ThresholdClip(4, 1.0), nn.Linear(16, 12),
                         ThresholdClip(4, 1.5), nn.Linear(12, 3)).eval()


def _numpy_simulation(npz, x: np.ndarray, T: int) -> np.ndarray:
    """A hardware engineer's reading of the file: IF/dual neurons, reset by subtraction, v(0) = v_init·θ."""
    graph = json.loads(str(npz["graph"]))
    values, state, readout = {}, {}, []
    for t in range(T):
        for layer in graph["layers"]:
            name, op = layer["name"], layer["op"]
            src = values[layer["inputs"][0]] if layer["inputs"] else None
            if op == "input":
                values[name] = x
            elif op == "linear":
                values[name] = src @ npz[f"{name}.weight"].T + npz[f"{name}.bias"]
            elif op == "neuron":
                theta = npz[f"{name}.theta"]
                v, c = state.get(name, (np.full_like(src, layer["v_init"] * theta), np.zeros_like(src)))
                m = v + src
                s = (m >= theta).astype(np.float32)
                if layer["neuron"] == "dual":
                    s -= ((m < layer["theta_neg"] * theta) & (c > 0)).astype(np.float32)
                state[name] = (m - s * theta, c + s)
                values[name] = s * theta
            elif op == "output":
                readout.append(src)
    return np.cumsum(readout, 0) / np.arange(1, T + 1)[:, None, None]


@pytest.mark.parametrize("neuron", ["if", "dual"])
def test_npz_alone_reproduces_the_simulation(tmp_path, neuron):
    snn = convert(_mlp(), neuron=neuron)
    path = export_npz(snn, tmp_path / "snn.npz")
    npz = np.load(path)  # allow_pickle=False by default: nothing in the file needs it
    x = torch.randn(32, 6)
    ours = simulate(snn, x, 8).numpy()
    theirs = _numpy_simulation(npz, x.numpy(), 8)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_conv_layers_carry_geometry_and_per_channel_thresholds(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
                          ThresholdClip(per_channel=True, num_channels=4, init_threshold=1.0), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).eval()
    graph, arrays = describe(convert(model, theta_neg=-0.5))
    conv = next(layer for layer in graph["layers"] if layer["op"] == "conv2d")
    assert conv["stride"] == [2, 2] and conv["padding"] == [1, 1] and conv["kernel_size"] == [3, 3]
    neuron = next(layer for layer in graph["layers"] if layer["op"] == "neuron")
    assert neuron["neuron"] == "dual" and neuron["theta_neg"] == -0.5 and neuron["v_init"] == 0.5 and neuron["per_channel"]
    assert arrays[f"{neuron['name']}.theta"].shape == (4,)
    assert not any(layer["op"] == "affine" for layer in graph["layers"])  # BN folded into the conv
    data = json.loads(export_json(convert(model), tmp_path / "snn.json").read_text())
    assert data["format"]["name"] == "eclsnn-snn-params"
    assert data["arrays"][f"{conv['name']}.weight"]["shape"] == [4, 2, 3, 3]


def test_export_refuses_an_ann():
    with pytest.raises(ConversionError):
        describe(_mlp())
