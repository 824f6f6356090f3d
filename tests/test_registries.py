"""The choices of configs and flags come from the registries that define them."""

from __future__ import annotations

import argparse

import pytest
from torch import nn

from eclsnn import config
from eclsnn.cli import build_parser
from eclsnn.conversion.converter import NEURONS
from eclsnn.data import DATASETS
from eclsnn.errors import ConfigError
from eclsnn.models import registry


@pytest.fixture
def tiny_model():
    name = "tiny-test-net"

    @registry.register(name, {"in_channels": 1, "image_size": 28})
    def build(num_classes=10, **kwargs):
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))

    yield name
    del registry._REGISTRY[name], registry.MODEL_DEFAULTS[name]


def test_a_registered_model_can_be_chosen_from_a_config(tiny_model):
    cfg = config.config_from_dict({"model": {"arch": tiny_model}})
    assert cfg.model.arch == tiny_model
    with pytest.raises(ConfigError, match=f"not one of .*{tiny_model}"):
        config.config_from_dict({"model": {"arch": "tiny-test-nett"}})


def _choices(parser: argparse.ArgumentParser, command: str, flag: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_flags_offer_the_registries_choices():
    parser = build_parser()
    assert _choices(parser, "train", "--dataset") == tuple(DATASETS) == config.DATASET_CHOICES
    assert _choices(parser, "convert", "--neuron") == tuple(NEURONS) == config.NEURON_CHOICES
    assert _choices(parser, "evaluate", "--split") == config.SPLIT_CHOICES
