"""The config loader: shipped configs load, mistakes give a ConfigError that names the key."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eclsnn.config import (
    SECTIONS,
    Config,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
    parse_overrides,
)
from eclsnn.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (supported): tomli, the package tomllib came from
    tomllib = pytest.importorskip("tomli")

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
ALL_KEYS = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


#: the configs run on this project's machines, and what each names as the source of its numbers
RUN_HERE = {"fmnist-cnn.toml": "README", "fmnist-resnet20.toml": "benchmarks/depth.py",
            "fmnist-resnet20-t2.toml": "benchmarks/depth.py", "fmnist-resnet18.toml": "benchmarks/depth.py"}


def test_the_five_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"fmnist-cnn.toml", "cifar10-resnet18.toml", "cifar10-vgg16.toml", "cifar100-vgg16.toml",
            "imagenet-resnet34.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_spells_out_every_key(path):
    if '"torchvision:' in path.read_text():  # the name is checked against torchvision's registry
        import vision_libs

        if not vision_libs.vision_libs_available() and not os.environ.get("ECLSNN_REQUIRE_ZOO"):
            pytest.skip("torchvision is not installed (make test installs it)")
        vision_libs.import_vision_libs()
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = tomllib.loads(path.read_text())
    spelled = {f"{s}.{k}" for s, table in raw.items() for k in table}
    assert spelled == ALL_KEYS, f"missing: {ALL_KEYS - spelled}"
    text = path.read_text()
    if path.name in RUN_HERE:  # configs that have been run here name where their numbers are
        assert RUN_HERE[path.name] in text
    else:
        assert "NO ONE HAS RUN THIS CONFIG HERE" in text
        assert "reproduces" not in text.lower()


def test_demo_config_is_the_default():
    assert load_config(CONFIGS[[p.name for p in CONFIGS].index("fmnist-cnn.toml")]) == load_config()


def test_cifar10_resnet18_states_the_paper_target():
    text = (CONFIGS[0].parent / "cifar10-resnet18.toml").read_text()
    assert "94.75" in text and "T = 2" in text


def test_defaults_and_sentinels():
    cfg = load_config()
    assert cfg.data.dataset == "fashion-mnist" and cfg.model.arch == "cnn-fmnist"
    assert cfg.train.batch_size == 128 and cfg.data.data_dir is None
    cfg = load_config(None, {"model.levels": 0, "data.data_dir": "", "train.max_train_samples": 0})
    assert cfg.model.levels is None and cfg.data.data_dir is None and cfg.train.max_train_samples is None


def test_unknown_key_names_key_file_and_nearest(tmp_path):
    path = write(tmp_path, "[train]\nepoch = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.epoch" in msg and str(path) in msg and "train.epochs" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"\[trian\].*'train'"):
        load_config(write(tmp_path, "[trian]\nepochs = 3\n"))


def test_top_level_key_is_an_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        load_config(write(tmp_path, "epochs = 3\n"))


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ('[train]\nepochs = "3"\n', "train.epochs", "integer"),
        ("[train]\nepochs = 3.0\n", "train.epochs", "integer"),
        ("[train]\nlr = true\n", "train.lr", "number"),
        ("[train]\namp = 1\n", "train.amp", "true or false"),
        ("[data]\naugment = 0.5\n", "data.augment", "true or false"),
        ("[model]\narch = 3\n", "model.arch", "string"),
        ("[evaluate]\ntime_steps = [1, 2]\n", "evaluate.time_steps", "integer"),
        ("[train]\nbatch_size = true\n", "train.batch_size", "integer"),
    ],
)
def test_ill_typed_values(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value) and expected in str(err.value)


def test_int_is_fine_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nlr = 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"train.epochs": 0}, "train.epochs"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.lr": 0.0}, "train.lr"),
        ({"train.lr": -0.1}, "train.lr"),
        ({"data.val_fraction": 1.0}, "data.val_fraction"),
        ({"data.val_fraction": -0.1}, "data.val_fraction"),
        ({"convert.neuron": "lif"}, "convert.neuron"),
        ({"convert.maxpool": "ignore"}, "convert.maxpool"),
        ({"convert.threshold_rule": "mean"}, "convert.threshold_rule"),
        ({"model.activation": "gelu"}, "model.activation"),
        ({"evaluate.time_steps": 0}, "evaluate.time_steps"),
        ({"model.levels": -2}, "model.levels"),
        ({"data.dataset": "mnist"}, "data.dataset"),
        ({"train.device": "gpu"}, "train.device"),
        ({"train.lr": float("nan")}, "train.lr"),
        ({"train.run_name": "a/b"}, "train.run_name"),
    ],
)
def test_out_of_range_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_out_of_range_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "[evaluate]\ntime_steps = 0\n")
    with pytest.raises(ConfigError, match="time_steps") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config("/nonexistent/nope.toml")


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_section_that_is_not_a_table(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\]"):
        load_config(write(tmp_path, "train = 3\n"))


def test_overrides_apply_on_top_of_the_file_and_are_checked(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 5\nlr = 0.2\n")
    cfg = load_config(path, {"train.epochs": 2, "model.levels": 8})
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.2 and cfg.model.levels == 8
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, {"train.epochs": "2"})
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, {"train.epoch": 2})
    with pytest.raises(ConfigError, match="section.key"):
        load_config(path, {"epochs": 2})


def test_parse_overrides_reads_toml_values():
    over = parse_overrides(["train.epochs=2", "train.lr=0.05", "data.dataset=cifar10", "train.amp=false",
                            'train.run_name="x"'])
    assert over == {"train.epochs": 2, "train.lr": 0.05, "data.dataset": "cifar10", "train.amp": False,
                    "train.run_name": "x"}
    cfg = load_config(None, over)
    assert cfg.data.dataset == "cifar10" and cfg.train.amp is False
    with pytest.raises(ConfigError):
        parse_overrides(["train.epochs"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_round_trip_dict_and_toml(path, tmp_path):
    cfg = load_config(path)
    d = config_to_dict(cfg)
    assert config_to_dict(config_from_dict(json.loads(json.dumps(d)))) == d
    assert config_from_dict(d) == cfg
    toml_path = write(tmp_path, config_to_toml(cfg))
    assert load_config(toml_path) == cfg


def test_config_from_dict_checks_like_a_file():
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({"train": {"epochs": "x"}}, source="run/config.json")
    with pytest.raises(ConfigError, match="run/config.json"):
        config_from_dict({"train": {"epochz": 1}}, source="run/config.json")


toml_scalars = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(),
    st.text(max_size=8),
)


@settings(deadline=None, max_examples=150, derandomize=True)
@given(key=st.sampled_from(sorted(ALL_KEYS)), value=toml_scalars)
def test_any_value_either_loads_or_raises_config_error(key, value):
    try:
        cfg = load_config(None, {key: value})
    except ConfigError as exc:
        assert key.split(".")[1] in str(exc)
    else:
        assert config_from_dict(config_to_dict(cfg)) == cfg
