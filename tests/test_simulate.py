"""simulate() and evaluate(): a trained ThresholdClip network converts with no accuracy loss at T = L."""

import pytest
import torch
from torch import nn

from eclsnn import SimulationError, SpikingNetwork, ThresholdClip, convert, evaluate, evaluate_ann, simulate

LEVELS = 4


def _teacher_data(n: int, seed: int):
    """A 6-class task from a fixed random non-linear teacher plus 5 % label noise (not perfectly solvable;
    the network below reaches about 83 %)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 6, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, 16, generator=g)
    y = (x @ w + 0.5 * torch.sin(2 * x[:, :6])).argmax(1)
    flip = torch.rand(n, generator=g) < 0.05
    y[flip] = torch.randint(0, 6, (int(flip.sum()),), generator=g)
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    xtr, ytr = _teacher_data(4096, 0)
    xte, yte = _teacher_data(2048, 1)
    layers = []
    width = 16
    for _ in range(3):  # three spiking layers
        layers += [nn.Linear(width, 64), nn.BatchNorm1d(64), ThresholdClip(levels=LEVELS, init_threshold=2.0)]
        width = 64
    model = nn.Sequential(*layers, nn.Linear(64, 6))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), xte, yte


def test_snn_matches_ann_at_T_equals_L_and_dual_threshold_is_closer(trained):
    model, x, y = trained
    with torch.no_grad():
        ann = model(x)
    ann_acc = (ann.argmax(1) == y).float().mean().item()
    assert 0.6 < ann_acc < 0.97, "the task should be learnable but not solved perfectly"
    errors = {}
    for neuron in ("if", "dual"):
        out = simulate(convert(model, neuron=neuron), x, LEVELS)
        acc = (out[-1].argmax(1) == y).float().mean().item()
        assert abs(acc - ann_acc) <= 0.01, (neuron, acc, ann_acc)
        errors[neuron] = (out[-1] - ann).abs().mean().item()
    assert errors["dual"] < errors["if"], errors


def test_theta_half_start_beats_zero_start(trained):
    model, x, _ = trained
    with torch.no_grad():
        ann = model(x)
    err = {v: (simulate(convert(model, neuron="if", v_init=v), x, LEVELS)[-1] - ann).abs().mean().item() for v in (0.0, 0.5)}
    assert err[0.5] < err[0.0], err


def test_evaluate_gives_accuracy_at_every_t_from_one_run(trained):
    model, x, y = trained
    snn = convert(model)
    loader = list(zip(x.split(500), y.split(500)))
    accs = evaluate(snn, loader, 8)
    assert list(accs) == list(range(1, 9))
    out = simulate(snn, x, 8)
    for t in (1, 4, 8):
        assert accs[t] == pytest.approx((out[t - 1].argmax(1) == y).float().mean().item())
    assert evaluate_ann(model, loader) == pytest.approx((model(x).argmax(1) == y).float().mean().item())


def test_first_layer_current_is_computed_once(trained):
    model, x, _ = trained
    snn = convert(model)
    first = snn.graph_module.get_submodule("0")
    calls = []
    first.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    simulate(snn, x[:10], 8)
    assert calls == [10]


@pytest.mark.parametrize("T", [0, -1, 2.0, True, "4", None])
def test_bad_time_steps(trained, T):
    snn = convert(trained[0])
    with pytest.raises(SimulationError, match="time_steps"):
        simulate(snn, trained[1][:4], T)


@pytest.mark.parametrize("x", [torch.full((2, 16), float("nan")), torch.ones(2, 16, dtype=torch.long), torch.zeros(0, 16), "images"])
def test_bad_inputs(trained, x):
    with pytest.raises(SimulationError):
        simulate(convert(trained[0]), x, 2)


def test_wrong_input_size_is_a_clear_error(trained):
    with pytest.raises(SimulationError, match="shape"):
        simulate(convert(trained[0]), torch.randn(2, 15), 2)


def test_simulating_an_ann_is_refused(trained):
    with pytest.raises(SimulationError, match="convert"):
        simulate(trained[0], trained[1][:2], 2)


def test_empty_loader(trained):
    with pytest.raises(SimulationError, match="no samples"):
        evaluate(convert(trained[0]), [], 2)


def test_view_after_a_conv_works_in_the_channels_last_simulator():
    """x.view(x.size(0), -1) after a conv: the simulator's channels-last maps cannot be viewed, so it
    reshapes (same values as the contiguous layout)."""

    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), ThresholdClip(4, 1.0), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            x = self.act(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    x = torch.randn(5, 1, 6, 6)
    snn = convert(ViewNet().eval())
    assert snn.channels_last
    contiguous = SpikingNetwork(snn.graph_module, channels_last=False)
    assert torch.equal(simulate(snn, x, 4), simulate(contiguous, x, 4))
