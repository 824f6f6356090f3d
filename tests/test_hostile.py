"""Hostile inputs: every bad value a user can hand convert/simulate/evaluate, the config loader or the
CLI ends in an eclsnn error (or exit status 2 with one line) — never a traceback from inside torch,
never a hang. Property tests, derandomized (tests/conftest.py), the CLI called in-process."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from eclsnn import (
    ConfigError,
    ConversionError,
    DualThresholdIFNeuron,
    EclsnnError,
    IFNeuron,
    SimulationError,
    ThresholdClip,
    convert,
    evaluate,
    simulate,
)
from eclsnn.cli import main
from eclsnn.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: eclsnn depends on tomli there
    tomllib = pytest.importorskip("tomli")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), ThresholdClip(levels=4, init_threshold=1.0),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()


SNN = convert(_net())
GOOD_X = torch.randn(2, 1, 8, 8)

bad_steps = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3),
    st.lists(st.integers(1, 3), max_size=2),
)


@settings(max_examples=60)
@given(bad_steps)
def test_simulate_refuses_bad_time_steps(T):
    with pytest.raises(SimulationError, match="time_steps"):
        simulate(SNN, GOOD_X, T)


@settings(max_examples=40)
@given(st.lists(st.integers(0, GOOD_X.numel() - 1), min_size=1, max_size=4), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_simulate_refuses_non_finite_inputs(positions, value):
    x = GOOD_X.clone()
    x.view(-1)[positions] = value
    with pytest.raises(SimulationError, match="NaN or infinite"):
        simulate(SNN, x, 2)


@settings(max_examples=30)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12))
def test_wrong_image_size_or_channels_is_a_clear_error(channels, h, w):
    x = torch.randn(2, channels, h, w)
    try:
        out = simulate(SNN, x, 2)
    except SimulationError as exc:
        assert "shape" in str(exc)
    else:  # only inputs the network really accepts may run
        assert channels == 1 and out.shape == (2, 2, 3)


@settings(max_examples=30)
@given(st.sampled_from(["conv", "linear", "bn"]), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_convert_refuses_non_finite_weights(where, value):
    model = _net()
    target = {"conv": model[0].weight, "linear": model[5].weight, "bn": model[1].weight}[where]
    with torch.no_grad():
        target.view(-1)[0] = value
    with pytest.raises(ConversionError, match="NaN or infinite"):
        convert(model)


@settings(max_examples=40)
@given(st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)))
def test_neurons_refuse_zero_negative_or_non_finite_thresholds(theta):
    for cls in (IFNeuron, DualThresholdIFNeuron):
        with pytest.raises(EclsnnError):
            cls(theta)


@settings(max_examples=20)
@given(st.floats(max_value=0.0, allow_nan=False))
def test_clip_refuses_non_positive_initial_threshold(lam):
    with pytest.raises(EclsnnError):
        ThresholdClip(init_threshold=lam)


def test_calibration_with_wrong_shape_or_nan_is_a_clear_error():
    relu_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    with pytest.raises(ConversionError, match="calibration data of shape"):
        convert(relu_net, calibration=torch.randn(4, 3, 8, 8))
    with pytest.raises(ConversionError, match="NaN"):
        convert(relu_net, calibration=torch.full((4, 1, 8, 8), math.nan))
    with pytest.raises(ConversionError, match="empty"):
        convert(relu_net, calibration=torch.zeros(0, 1, 8, 8))
    with pytest.raises(ConversionError, match="empty"):
        convert(relu_net, calibration=[])


@settings(max_examples=20)
@given(st.integers(0, 3))
def test_evaluate_refuses_empty_or_malformed_loaders(kind):
    loader = [[], [GOOD_X], [(GOOD_X,)], [GOOD_X[:0], torch.zeros(0, dtype=torch.long)]][kind]
    with pytest.raises(SimulationError):
        evaluate(SNN, loader, 2)


# ---- the config loader ------------------------------------------------------------------------------

toml_values = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.text(max_size=8), st.lists(st.integers(), max_size=2))
keys = st.sampled_from(["data.dataset", "data.val_fraction", "model.levels", "model.arch", "model.init_threshold",
                        "train.epochs", "train.lr", "train.batch_size", "train.seed", "convert.neuron",
                        "convert.v_init", "convert.theta_neg", "evaluate.time_steps", "train.nosuch", "nosuch.key"])


@settings(max_examples=200)
@given(st.dictionaries(keys, toml_values, max_size=4))
def test_config_loader_gives_a_config_or_a_config_error(overrides):
    try:
        cfg = load_config(None, overrides)
    except EclsnnError as exc:
        assert str(exc)
    else:
        assert cfg.train.epochs >= 1 and cfg.evaluate.time_steps >= 1 and cfg.train.lr > 0


def _toml_check(path, text: str) -> bool:
    """Load ``text`` (written to ``path``) with eclsnn; the TOML parser is the oracle: where it refuses
    the text, eclsnn must raise a ConfigError saying so; where it accepts it, eclsnn gives a Config or a
    ConfigError about the settings (not about the syntax). Returns whether the text was valid TOML."""
    path.write_text(text, encoding="utf-8")
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        with pytest.raises(ConfigError, match="is not valid TOML"):
            load_config(path)
        return False
    try:
        load_config(path)
    except ConfigError as exc:
        assert "not valid TOML" not in str(exc)
    return True


@settings(max_examples=40)
@given(st.text(alphabet="abc[]=\"' \n.#0123456789", max_size=40))
def test_malformed_toml_files_give_a_config_error(tmp_path_factory, text):
    _toml_check(tmp_path_factory.mktemp("cfg") / "c.toml", text)


@pytest.mark.parametrize("text,valid", [
    ("[train", False), ("train.epochs = ", False), ("[train]\nepochs = 2\nepochs = 3", False),
    ("[train]\nlr = 1e", False), ("= 1", False), ("[train]\n[train]", False), ("x = 'unterminated", False),
    ("[train]\nepochs = 02", False), ("a = [1, 2", False),
    ("", True), ("[train]\nepochs = 2", True), ("[nosuch]", True), ("[train]\nepochs = 'two'", True),
])
def test_toml_files_malformed_or_not_by_the_toml_parser(tmp_path, text, valid):
    assert _toml_check(tmp_path / "c.toml", text) is valid  # (and the oracle agrees which ones are malformed)


# ---- the CLI --------------------------------------------------------------------------------------------

POISON = {  # one argument that must make each command fail before any work starts
    "train": [["--config", "/nonexistent.toml"], ["--set", "train.epochs=0"], ["--set", "model.arch=nope"],
              ["--epochs", "abc"], ["--set", "train.nosuch=1"], ["--levels", "-2"]],
    "convert": [["/nonexistent"]],
    "evaluate": [["/nonexistent"]],
}
EXTRA = ["-T", "-3", "--neuron", "lif", "--max-samples", "0", "--set", "evaluate.time_steps=0", "--theta-neg", "2"]


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])  # capsys is read each time
@given(st.sampled_from(sorted(POISON)), st.data())
def test_cli_never_shows_a_traceback(capsys, command, data):
    poison = data.draw(st.sampled_from(POISON[command]))
    extra = data.draw(st.lists(st.sampled_from(EXTRA), max_size=3))
    argv = [command, *poison, *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and "error" in err


def test_cli_missing_data_files_say_how_to_get_them(tmp_path, monkeypatch, capsys):
    import eclsnn.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.delenv("ECLSNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", "--data-dir", str(empty), "--set", "train.progress=false", "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
