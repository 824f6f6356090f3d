"""Run settings: typed dataclasses read from a TOML file, with dotted overrides from the command line.

A config file has the sections ``[data] [model] [train] [convert] [evaluate]``; every key is
optional and defaults to the Fashion-MNIST demo. Everything a run depends on lives here, so a
run folder's ``config.json`` (written by :func:`eclsnn.training.trainer.train`) is enough to repeat it.

TOML has no null, so the optional settings use a sentinel in files: ``""`` for an unset string
(``data_dir``, ``stem``, ``init_from``, ``run_name``) and ``0`` for an unset count
(``levels`` = plain clip, ``max_train_samples`` / ``max_samples`` = all). Both spellings (the
sentinel and ``None``) are accepted from Python.

Every check raises :class:`~eclsnn.errors.ConfigError` naming the key, the file and what to do;
unknown keys come with the nearest valid one.

Why one module of ~470 lines: each setting is declared once (its dataclass field with its comment) and
checked once (the section's validator), and a reader adding a setting edits both side by side; the TOML
reading and override parsing are short and exist for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from eclsnn._util import DEFAULT_INIT_THRESHOLD
from eclsnn.conversion.calibration import THRESHOLD_RULES
from eclsnn.conversion.converter import MAXPOOL_POLICIES, NEURONS
from eclsnn.data import DATASETS
from eclsnn.errors import ConfigError
from eclsnn.limits import MAX_SEED
from eclsnn.models import ACTIVATIONS, POOLS, list_models
from eclsnn.models.external import check_arch, is_external

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ConvertConfig",
    "EvalConfig",
    "Config",
    "SECTIONS",
    "load_config",
    "config_to_dict",
    "config_from_dict",
    "config_to_toml",
    "parse_override",
    "parse_overrides",
]

# Choices of the string settings (checked here so a typo fails before anything is loaded), read from the
# registries that define them; the command line's flags read them from here.
DATASET_CHOICES = tuple(DATASETS)
ACTIVATION_CHOICES = tuple(ACTIVATIONS)
POOL_CHOICES = tuple(POOLS)
NEURON_CHOICES = tuple(NEURONS)
MAXPOOL_CHOICES = tuple(MAXPOOL_POLICIES)
THRESHOLD_RULE_CHOICES = tuple(THRESHOLD_RULES)
SPLIT_CHOICES = ("test", "val", "train")


def arch_choices() -> tuple[str, ...]:
    """The model names a config may choose: the model registry's, read at the time of the check (a model
    added with ``eclsnn.models.register`` can be chosen)."""
    return tuple(list_models())


@dataclass
class DataConfig:
    """Which data set, where it lives, and how the validation split is carved from the training set."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: look in $ECLSNN_DATA and the system locations
    val_fraction: float = 0.1  # share of the training set held out (seeded) for model selection
    augment: bool = True  # random crop with padding (+ flips where they fit), on the device
    download: bool = False  # fetch from the data set's official host if not found


@dataclass
class ModelConfig:
    """Keyword arguments of :func:`eclsnn.models.create` (the number of classes comes from the data)."""

    arch: str = "cnn-fmnist"  # a zoo model, or "torchvision:NAME" / "timm:NAME" (docs/MODELS.md)
    activation: str = "clip"  # "clip": learnable threshold clipping function; "relu": plain ANN
    levels: int | None = 4  # quantisation levels L of the clip; 0/None: plain clamp(z, 0, λ)
    init_threshold: float = DEFAULT_INIT_THRESHOLD  # initial λ (chosen on the validation split; eclsnn._util)
    per_channel: bool = False  # one λ per channel instead of one per layer
    pool: str = "avg"  # "max" has no exact spiking form (docs/METHOD.md); conversion then needs a policy
    stem: str | None = None  # None: the model's default stem for the data set's image size ("small": see docs/MODELS.md)
    dropout: float = 0.0
    width: float = 1.0  # channel multiplier (models with a width option: vgg16)


@dataclass
class TrainConfig:
    """SGD with momentum, cosine schedule with linear warmup, optional label smoothing.

    ``batch_size`` is the global batch: under torchrun each of the N ranks gets ``batch_size / N``.
    Weight decay applies to conv/linear weights only; BatchNorm parameters and biases get none, and
    the thresholds λ get ``threshold_weight_decay`` in their own parameter group (decaying λ would
    pull the clip towards 0 and cost range).

    ``snn_epochs``: the last that many epochs train with the converted SNN in the loop at
    ``snn_time_steps`` (the ``[convert]`` neuron settings), on the same optimizer and schedule; see
    :mod:`eclsnn.training.spiking_loop`. The best checkpoint is then chosen among those epochs by the SNN's
    validation accuracy at ``snn_time_steps``.
    """

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    threshold_weight_decay: float = 0.0
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    snn_epochs: int = 0  # the last N epochs train with the converted SNN in the loop (eclsnn.training.spiking_loop)
    snn_time_steps: int = 2  # T of the SNN in those epochs
    snn_lr: float = 0.0  # > 0: those epochs restart the cosine schedule from this lr (0: one schedule throughout)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA if available, else CPU
    amp: bool = True  # mixed precision (bf16 where supported, else fp16 + GradScaler); CUDA only
    channels_last: bool = True  # NHWC layout for image models: faster convolutions on CUDA and on CPU (oneDNN)
    init_from: str | None = None  # checkpoint of a trained ReLU network to start from (via eclsnn.prepare)
    init_percentile: float = 99.9  # activation percentile that sets λ when starting from init_from
    init_calibration_batches: int = 8
    max_train_samples: int | None = None  # seeded subset of the training part (tests, quick looks)
    output: str = "runs"
    run_name: str | None = None  # None: "{arch}-{dataset}-{activation}-L{levels}-s{seed}"
    resume: bool = False  # continue run/checkpoints/last (bit-identical to an uninterrupted run)
    progress: bool = True
    eval_test: bool = True  # test accuracy once at the end (reported only; evaluate.max_samples caps it)


@dataclass
class ConvertConfig:
    """How the trained ANN becomes an SNN (see :func:`eclsnn.convert`)."""

    neuron: str = "dual"  # "dual" (dual-threshold IF neuron), "if", or "burst" (graded spikes)
    v_init: float = 0.5  # initial membrane potential as a fraction of θ (0.5: the paper's θ/2)
    theta_neg: float = 0.0  # negative threshold of the dual neuron, as a fraction of θ
    maxpool: str = "error"  # max pooling: "error" (exact modes only), "auto", "swap", "cummax", "avg" (docs/METHOD.md)
    threshold_rule: str = "max"  # how θ is set for layers without a learned λ (ReLU networks)
    percentile: float = 99.9  # used by threshold_rule = "percentile"
    calibration_batches: int = 8


@dataclass
class EvalConfig:
    """ANN and SNN accuracy at every t = 1..time_steps."""

    time_steps: int = 8
    batch_size: int = 256
    split: str = "test"
    max_samples: int | None = None  # None: the whole split


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


#: section name -> dataclass
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "convert": ConvertConfig,
    "evaluate": EvalConfig,
}

# Optional settings whose TOML spelling of "unset" is 0 rather than "".
_ZERO_MEANS_NONE = {("model", "levels"), ("train", "max_train_samples"), ("evaluate", "max_samples")}


# --------------------------------------------------------------------------------------------------
# type checking


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp: Any, optional: bool) -> str:
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
    if optional:
        name += " (or " + ("0" if tp is int else '""') + " for unset)"
    return name


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value))
    if kind is None:
        kind = {dict: "a table", list: "an array"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


def _coerce(section: str, key: str, value: Any, tp: Any, where: str) -> Any:
    """Check one value against the field's annotation; return it normalised (int -> float, sentinels -> None)."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {section}.{key} must be {_type_name(base, False)}, got nothing (None)")
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {section}.{key} must be a finite number, got {value!r}")
    elif base is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"{where}: {section}.{key} must be {_type_name(base, optional)}, got {_describe(value)}"
        )
    if optional:
        if base is str and value == "":
            return None
        if (section, key) in _ZERO_MEANS_NONE and value == 0:
            return None
    return value


def _nearest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if match:
        return f"; did you mean {match[0]!r}?"
    return f"; valid keys: {', '.join(options)}"


# --------------------------------------------------------------------------------------------------
# range checks


def _check_choice(where: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(choices)}{extra}")


def _check(where: str, key: str, ok: bool, requirement: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} must be {requirement}, got {value!r}")


#: The most time steps a config may ask for: a bound on time and memory (a checkpoint's stored config is
#: read as a file is, and T steps of a batch are simulated, and partly held, at once).
MAX_TIME_STEPS = 2**16
_TIME_STEPS = f">= 1 and at most {MAX_TIME_STEPS}"


def _validate(cfg: Config, where: str) -> None:
    d, m, t, c, e = cfg.data, cfg.model, cfg.train, cfg.convert, cfg.evaluate
    _check_choice(where, "data.dataset", d.dataset, DATASET_CHOICES)
    _check(where, "data.val_fraction", 0.0 <= d.val_fraction < 1.0, "in [0, 1)", d.val_fraction)

    if is_external(m.arch):  # "torchvision:NAME" / "timm:NAME": looked up in that library's registry
        try:
            check_arch(m.arch)
        except ConfigError as exc:
            raise ConfigError(f"{where}: model.arch: {exc}") from None
    else:
        _check_choice(where, "model.arch", m.arch, arch_choices())
    _check_choice(where, "model.activation", m.activation, ACTIVATION_CHOICES)
    _check(where, "model.levels", m.levels is None or m.levels >= 1, ">= 0 (0: plain clip)", m.levels)
    _check(where, "model.init_threshold", m.init_threshold > 0, "> 0", m.init_threshold)
    _check_choice(where, "model.pool", m.pool, POOL_CHOICES)
    _check(where, "model.dropout", 0.0 <= m.dropout < 1.0, "in [0, 1)", m.dropout)
    _check(where, "model.width", 0.0 < m.width <= 64.0, "in (0, 64]", m.width)

    _check(where, "train.epochs", t.epochs >= 1, ">= 1", t.epochs)
    _check(where, "train.batch_size", t.batch_size >= 1, ">= 1", t.batch_size)
    _check(where, "train.lr", t.lr > 0, "> 0", t.lr)
    _check(where, "train.momentum", 0.0 <= t.momentum < 1.0, "in [0, 1)", t.momentum)
    _check(where, "train.nesterov", not (t.nesterov and t.momentum == 0), "false when momentum = 0", t.nesterov)
    _check(where, "train.weight_decay", t.weight_decay >= 0, ">= 0", t.weight_decay)
    _check(where, "train.threshold_weight_decay", t.threshold_weight_decay >= 0, ">= 0", t.threshold_weight_decay)
    _check(where, "train.label_smoothing", 0.0 <= t.label_smoothing < 1.0, "in [0, 1)", t.label_smoothing)
    _check(where, "train.warmup_epochs", 0 <= t.warmup_epochs <= t.epochs, f"in [0, epochs = {t.epochs}]", t.warmup_epochs)
    _check(where, "train.snn_epochs", 0 <= t.snn_epochs <= t.epochs, f"in [0, epochs = {t.epochs}]", t.snn_epochs)
    _check(where, "train.snn_time_steps", 1 <= t.snn_time_steps <= MAX_TIME_STEPS, _TIME_STEPS, t.snn_time_steps)
    _check(where, "train.snn_lr", t.snn_lr >= 0, ">= 0 (0: continue the one schedule)", t.snn_lr)
    if t.snn_epochs and t.snn_lr:
        _check(where, "train.warmup_epochs", t.warmup_epochs <= t.epochs - t.snn_epochs,
               f"at most epochs - snn_epochs = {t.epochs - t.snn_epochs} (the warmup is part of the plain epochs)",
               t.warmup_epochs)
    if t.snn_epochs and m.activation != "clip":
        raise ConfigError(
            f"{where}: train.snn_epochs trains with the converted SNN in the loop, which takes its thresholds from "
            f"the learnable clip, so model.activation must be \"clip\", got {m.activation!r}"
        )
    _check(where, "train.seed", 0 <= t.seed <= MAX_SEED, "an integer in [0, 2^32 - 1]", t.seed)
    dev = t.device
    _check(
        where, "train.device",
        dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
        '"auto", "cpu", "cuda" or "cuda:N"', dev,
    )
    _check(where, "train.init_percentile", 0.0 < t.init_percentile <= 100.0, "in (0, 100]", t.init_percentile)
    _check(where, "train.init_calibration_batches", t.init_calibration_batches >= 1, ">= 1", t.init_calibration_batches)
    _check(where, "train.max_train_samples", t.max_train_samples is None or t.max_train_samples >= 1,
           ">= 1 (0: all)", t.max_train_samples)
    _check(where, "train.output", t.output != "", "a folder name", t.output)
    if t.run_name is not None:
        _check(where, "train.run_name", t.run_name not in (".", "..") and not any(c in t.run_name for c in "/\\\0"),
               "a plain folder name (no path separators)", t.run_name)
    if t.init_from is not None and m.activation != "clip":
        raise ConfigError(
            f"{where}: train.init_from starts a threshold-clip network from a trained ReLU network, "
            f"so model.activation must be \"clip\", got {m.activation!r}"
        )

    _check_choice(where, "convert.neuron", c.neuron, NEURON_CHOICES)
    _check(where, "convert.v_init", 0.0 <= c.v_init <= 1.0, "in [0, 1] (a fraction of θ)", c.v_init)
    _check(where, "convert.theta_neg", c.theta_neg < 1.0, "below 1 (a fraction of θ; e.g. 0, -0.5, -1)", c.theta_neg)
    _check_choice(where, "convert.maxpool", c.maxpool, MAXPOOL_CHOICES)
    _check_choice(where, "convert.threshold_rule", c.threshold_rule, THRESHOLD_RULE_CHOICES)
    _check(where, "convert.percentile", 0.0 < c.percentile <= 100.0, "in (0, 100]", c.percentile)
    _check(where, "convert.calibration_batches", c.calibration_batches >= 1, ">= 1", c.calibration_batches)

    _check(where, "evaluate.time_steps", 1 <= e.time_steps <= MAX_TIME_STEPS, _TIME_STEPS, e.time_steps)
    _check(where, "evaluate.batch_size", e.batch_size >= 1, ">= 1", e.batch_size)
    _check_choice(where, "evaluate.split", e.split, SPLIT_CHOICES)
    _check(where, "evaluate.max_samples", e.max_samples is None or e.max_samples >= 1, ">= 1 (0: all)", e.max_samples)


# --------------------------------------------------------------------------------------------------
# building


def _apply(values: dict[str, dict[str, Any]], where: str, base: Config | None = None) -> Config:
    """Build a Config from ``{section: {key: value}}`` on top of `base` (default: the defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of sections, got {_describe(values)}")
    sections = {}
    for name, cls in SECTIONS.items():
        current = getattr(base, name) if base is not None else cls()
        sections[name] = {f.name: getattr(current, f.name) for f in dataclasses.fields(cls)}
    for name, table in values.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}]{_nearest(name, list(SECTIONS))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table of settings, got {_describe(table)}")
        hints = _field_types(SECTIONS[name])
        for key, value in table.items():
            if key not in hints:
                raise ConfigError(
                    f"{where}: unknown key {name}.{key}{_nearest(f'{name}.{key}', [f'{name}.{k}' for k in hints])}"
                )
            sections[name][key] = _coerce(name, key, value, hints[key], where)
    cfg = Config(**{name: SECTIONS[name](**sections[name]) for name in SECTIONS})
    _validate(cfg, where)
    return cfg


def _split_overrides(overrides: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, sep, key = str(dotted).partition(".")
        if not sep or not key or "." in key:
            raise ConfigError(
                f"{where}: override {dotted!r} must be 'section.key', e.g. 'train.epochs'"
                + (_nearest(dotted, [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)])
                   if not sep else "")
            )
        nested.setdefault(section, {})[key] = value
    return nested


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config (or the defaults if `path` is None) and apply dotted `overrides`.

    ``load_config("configs/fmnist-cnn.toml", {"train.epochs": 2})``. Override values are checked like
    file values (an int where a float is expected is fine; a string where an int is expected is not —
    use :func:`parse_overrides` for ``key=value`` strings from a command line).
    """
    values: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} not found" + (" (it is a folder)" if p.is_dir() else "")
                + "; pass the path of a .toml file, e.g. configs/fmnist-cnn.toml"
            )
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}; fix the file (see configs/fmnist-cnn.toml)") from None
        except RecursionError:
            raise ConfigError(f"{p}: a value is nested too deeply to be a setting; fix the file "
                              "(see configs/fmnist-cnn.toml)") from None
    cfg = _apply(values, where)
    if overrides:
        cfg = _apply(_split_overrides(overrides, "override"), f"{where} (with overrides)" if path else "override", base=cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` with every key; unset optional values are ``None`` (JSON null).

    JSON-able as it is; for TOML use :func:`config_to_toml`, which writes the sentinels instead.
    """
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Config:
    """Inverse of :func:`config_to_dict` (missing keys take their defaults); checked like a file."""
    return _apply(d, source)


def _toml_value(section: str, key: str, value: Any, tp: Any) -> str:
    if value is None:
        base, _ = _unwrap_optional(tp)
        return "0" if base is int else '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, float):
        return repr(value)
    return str(value)


def config_to_toml(cfg: Config) -> str:
    """The config as TOML text with every key spelled out (unset values as their sentinels)."""
    lines = []
    for name, cls in SECTIONS.items():
        hints = _field_types(cls)
        lines.append(f"[{name}]")
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            lines.append(f"{f.name} = {_toml_value(name, f.name, getattr(section, f.name), hints[f.name])}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.05"`` -> ``("train.lr", 0.05)``; the value is read as a TOML value, and a bare
    word that is not valid TOML (``data.dataset=cifar10``) is taken as a string."""
    key, sep, raw = str(text).partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.epochs=2")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key}: the value is nested too deeply to be a setting") from None
    return key, value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Several ``section.key=value`` strings -> an overrides dict for :func:`load_config`."""
    return dict(parse_override(item) for item in items)
