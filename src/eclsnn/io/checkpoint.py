"""Crash-safe checkpoints made of safetensors and JSON — nothing is ever pickled or unpickled.

A checkpoint is a folder::

    model.safetensors          weights (and buffers) of the network
    meta.json                  everything needed to rebuild it: format marker and version, the keyword
                               arguments of eclsnn.models.create, the data set and its normalisation,
                               epoch, seed, git revision, the full run config, metrics
    optimizer.safetensors/json optimizer state: tensors in safetensors, structure in JSON
    scheduler.json             LR scheduler state
    rng.safetensors/json       random number generator states (torch CPU/CUDA, Python, numpy)
    extra.safetensors/json     anything else the trainer keeps (best accuracy, AMP scaler, ...)

**Atomic writes.** A checkpoint is written to ``.tmp-<name>-<pid>`` beside its destination, every file
and the folder are fsynced, then it is renamed into place. If the destination exists it is first
renamed to ``.old-<name>-<pid>``, the new folder renamed in, and the old one deleted; a crash at any
moment therefore leaves the old or the new checkpoint complete. :func:`resolve_checkpoint` puts a
leftover ``.old-*`` folder back when the destination is missing and removes leftovers of dead writers.

**Fault injection** (for the crash tests): ``ECLSNN_FAULT_CHECKPOINT="<file>:<bytes>"`` makes the
writer ``os._exit(137)`` (like SIGKILL) after writing that many bytes of that file (``<file>`` may be
``model.safetensors`` or ``last/model.safetensors`` to pick one checkpoint; an optional third field
``:<n>`` picks the n-th such write of the process); ``"@rename:0"`` stops it between moving the old
checkpoint aside and moving the new one in.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from eclsnn.errors import CheckpointError, ThresholdWarning
from eclsnn.io._files import FAULT_ENV, _fault_hit, _fsync_dir, _pid_alive, _write_bytes, git_revision
from eclsnn.limits import MAX_IMAGE_VALUES, MAX_IN_CHANNELS, MAX_NUM_CLASSES, MAX_SEED
from eclsnn.io.rng_state import capture_rng_state, restore_rng_state
from eclsnn.io.safetensors_io import (_PICKLE_SUFFIXES, _UNPICKLE_MESSAGE, _decode, _read_json, _read_safetensors,
                                      _refuse_pickle, _state_files)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "find_checkpoint",
    "build_model",
    "load_weights",
    "capture_rng_state",
    "restore_rng_state",
    "git_revision",
]

FORMAT = "eclsnn-checkpoint"
FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"

# --------------------------------------------------------------------------------------------------
# writing


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DistributedDataParallel
    out = {}
    for name, value in model.state_dict().items():
        if not torch.is_tensor(value):
            continue
        if isinstance(value, nn.parameter.UninitializedParameter) or isinstance(value, nn.parameter.UninitializedBuffer):
            raise CheckpointError(
                f"parameter {name} is not initialised yet (a lazy per-channel threshold); run one forward "
                "pass through the model before saving it"
            )
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _cleanup_leftovers(parent: Path, name: str) -> None:
    """Remove ``.tmp-<name>-<pid>`` folders of writers that are no longer running; if `name` is missing
    but a ``.old-<name>-<pid>`` folder of a dead writer exists, put it back (it is complete).

    Only writers call this (``save_checkpoint``, and ``find_checkpoint`` for a resumed training, which
    holds the run's lock): reading a checkpoint changes nothing. A leftover that is a symbolic link was
    not made by eclsnn's writer; the link itself is removed, never followed (it could lead out of the run
    folder)."""
    if not parent.is_dir():
        return
    dest = parent / name
    for prefix in (".old-", ".tmp-"):
        for leftover in sorted(parent.glob(f"{prefix}{name}-*")):
            pid_text = leftover.name[len(prefix) + len(name) + 1:]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            try:
                if leftover.is_symlink():
                    leftover.unlink()
                elif prefix == ".old-" and not dest.exists() and _is_plain_checkpoint(leftover):
                    os.replace(leftover, dest)
                    _fsync_dir(parent)
                else:
                    shutil.rmtree(leftover)
            except OSError:
                pass  # read-only location: leave it, readers fall back below


def _is_plain_checkpoint(folder: Path) -> bool:
    """A checkpoint folder that is no link and whose metadata is no link: what eclsnn's writer leaves."""
    meta = folder / META_FILE
    return not folder.is_symlink() and folder.is_dir() and not meta.is_symlink() and meta.is_file()


def save_checkpoint(
    dest: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at `dest` atomically (see the module docstring) and return `dest`.

    `meta` must be JSON-able; the format marker, version, git revision and library versions are added.
    The global RNG states are always saved (``rng.*``); `extra_state` may hold tensors and plain values.
    Raises :class:`CheckpointError` if the files cannot be written (e.g. a full disk); the previous
    checkpoint at `dest` is then left as it was.
    """
    from eclsnn._util import __version__

    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(parent, dest.name)

    full_meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "git_revision": git_revision(),
        "eclsnn_version": __version__,
        "torch_version": torch.__version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        meta_bytes = json.dumps(full_meta, indent=1, allow_nan=True).encode("utf-8") + b"\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None

    files: dict[str, bytes] = {MODEL_FILE: st_save(_model_state(model))}
    if optimizer is not None:
        files.update(_state_files("optimizer", optimizer.state_dict()))
    if scheduler is not None:
        files.update(_state_files("scheduler", scheduler.state_dict()))
    files.update(_state_files("rng", capture_rng_state()))
    if extra_state is not None:
        files.update(_state_files("extra", extra_state))
    files[META_FILE] = meta_bytes  # written last: a folder with meta.json had every other file written

    tmp = parent / f".tmp-{dest.name}-{os.getpid()}"
    aside = parent / f".old-{dest.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, data in files.items():
            _write_bytes(tmp / name, data, dest.name)
        _fsync_dir(tmp)
        if dest.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(dest, aside)
            _fsync_dir(parent)
            if _fault_hit("@rename", dest.name) is not None:
                os._exit(137)
            os.replace(tmp, dest)
            _fsync_dir(parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _fsync_dir(parent)
    except OSError as exc:
        # Undo what can be undone so that `dest` keeps the previous complete checkpoint.
        if not dest.exists() and aside.exists():
            try:
                os.replace(aside, dest)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write checkpoint {dest}{hint}: {exc}; the previous checkpoint there (if any) is intact. "
            "Free space or choose another output folder, then resume."
        ) from None
    return dest


# --------------------------------------------------------------------------------------------------
# reading




def _checkpoint_dir(folder: Path, recover: bool = False) -> Path | None:
    """`folder` itself if it is a checkpoint; else the complete aside copy a writer left when it died
    between its two renames (``.old-<name>-<pid>``, never a link). With `recover` (writers only) the
    aside copy is first renamed back into place."""
    if recover and not folder.exists():
        _cleanup_leftovers(folder.parent, folder.name)
    if (folder / META_FILE).is_file() or (folder / MODEL_FILE).is_file():
        return folder
    parent = folder.parent
    if parent.is_dir():
        for old in sorted(parent.glob(f".old-{folder.name}-*")):
            if _is_plain_checkpoint(old):
                return old
    return None


def find_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint folder `folder` (recovered from an interrupted write if need be), or None if
    there is no checkpoint there. Used by training, under the run's lock, to decide whether a run can be
    resumed; it may rename a dead writer's aside copy back into place (see :func:`_cleanup_leftovers`)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return None
    return _checkpoint_dir(folder, recover=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder (its ``checkpoints/last``), a checkpoint folder, or a
    ``model.safetensors`` / ``meta.json`` file inside one. Read only: where a writer died between its two
    renames, the complete aside copy it left is returned as it is (``.old-last-<pid>``), nothing is
    renamed or removed, and no link to another place is taken for one."""
    p = Path(path)
    if p.is_file():
        if p.name == MODEL_FILE or p.name == META_FILE:
            p = p.parent
        else:
            _refuse_pickle(p)
            raise CheckpointError(
                f"{p} is not an eclsnn checkpoint; pass a run folder, a checkpoint folder or its {MODEL_FILE}"
            )
    if not p.exists() and not p.parent.is_dir():
        raise CheckpointError(f"checkpoint {p} not found; pass a run folder, a checkpoint folder or its {MODEL_FILE}")
    found = _checkpoint_dir(p)
    if found is not None:
        return found
    for candidate in (p / "checkpoints" / "last", p / "last", p / "checkpoints" / "best", p / "best"):
        if candidate.parent.is_dir():
            found = _checkpoint_dir(candidate)
            if found is not None:
                return found
    if p.is_dir():
        for child in sorted(p.iterdir()):
            if child.is_file() and child.suffix.lower() in _PICKLE_SUFFIXES:
                raise CheckpointError(f"{p} holds {child.name}, a pickle-based file. {_UNPICKLE_MESSAGE}")
        raise CheckpointError(
            f"{p} holds no eclsnn checkpoint (no {META_FILE}, no checkpoints/last); pass a run folder, "
            f"a checkpoint folder or its {MODEL_FILE}"
        )
    raise CheckpointError(f"checkpoint {p} not found; pass a run folder, a checkpoint folder or its {MODEL_FILE}")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, metadata and model weights. Optimizer, scheduler, RNG and
    extra state are read on demand (they are only needed to resume)."""

    path: Path
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    def _load_state(self, stem: str) -> Any | None:
        json_path = self.path / f"{stem}.json"
        if not json_path.is_file():
            return None
        structure = _read_json(json_path)
        st_path = self.path / f"{stem}.safetensors"
        tensors = _read_safetensors(st_path) if st_path.is_file() else {}
        try:
            return _decode(structure, tensors, str(json_path))
        except RecursionError:
            raise CheckpointError(f"{json_path} is nested too deeply to be eclsnn's JSON; the file is corrupt") from None

    def load_optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer's ``state_dict()`` as saved, or None if none was saved."""
        return self._load_state("optimizer")

    def load_scheduler_state(self) -> dict[str, Any] | None:
        return self._load_state("scheduler")

    def load_rng_state(self) -> dict[str, Any] | None:
        """RNG states for :func:`restore_rng_state`."""
        return self._load_state("rng")

    def load_extra_state(self) -> dict[str, Any] | None:
        return self._load_state("extra")

    @property
    def arch(self) -> str | None:
        model = self.meta.get("model") or {}
        return model.get("arch", model.get("name"))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (see :func:`resolve_checkpoint` for what `path` may be). Never unpickles."""
    folder = resolve_checkpoint(path)
    for child in folder.iterdir():
        if child.is_file() and child.suffix.lower() in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{folder} holds {child.name}, a pickle-based file. {_UNPICKLE_MESSAGE}")
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{folder} has {MODEL_FILE} but no {META_FILE}, so the model cannot be rebuilt; it was not "
            "written by eclsnn or its write was interrupted — use another checkpoint"
        )
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not eclsnn checkpoint metadata (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}; this eclsnn reads up to {FORMAT_VERSION} — upgrade eclsnn"
        )
    _check_meta(meta, meta_path)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{folder} has no {MODEL_FILE}; the checkpoint is incomplete — use another one")
    state_dict = _read_safetensors(model_path)
    return Checkpoint(path=folder, meta=meta, state_dict=state_dict)


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields of ``meta.json`` that eclsnn reads, checked for type and size before anything is built
    from them: a number in the file must not decide how much memory the model takes."""

    def bad(field: str, want: str, value: Any) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointError(f"{path}: field '{field}' must be {want}, got {shown}; the file is corrupt or was "
                               "edited — use the checkpoint's own meta.json or another checkpoint")

    def integer(field: str, value: Any, low: int, high: int, why: str = "") -> None:
        if type(value) is not int or not low <= value <= high:
            raise bad(field, f"an integer, at least {low} and at most {high}{why}", value)

    def table(field: str, allow_null: bool = False) -> dict[str, Any]:
        value = meta.get(field)
        if value is None and (allow_null or field not in meta):
            return {}
        if not isinstance(value, dict):
            raise bad(field, "a JSON object" + (" or null" if allow_null else ""), value)
        return value

    bound = " (a bound on memory before the model is built)"
    model = table("model")
    for key in ("arch", "name"):
        if key in model and not isinstance(model[key], str):
            raise bad(f"model.{key}", "a model name (a string)", model[key])
    if "num_classes" in model:
        integer("model.num_classes", model["num_classes"], 1, MAX_NUM_CLASSES, bound)
    if "in_channels" in model:
        integer("model.in_channels", model["in_channels"], 1, MAX_IN_CHANNELS, bound)
    dataset = table("dataset")
    if "num_classes" in dataset:
        integer("dataset.num_classes", dataset["num_classes"], 1, MAX_NUM_CLASSES, bound)
    if dataset.get("channels") is not None:
        integer("dataset.channels", dataset["channels"], 1, MAX_IN_CHANNELS, bound)
    if dataset.get("image_size") is not None:
        channels = dataset.get("channels") or 1
        integer("dataset.image_size", dataset["image_size"], 1, math.isqrt(MAX_IMAGE_VALUES // channels),
                f" for {channels} channel(s): one image of at most {MAX_IMAGE_VALUES} values")
    if "epoch" in meta:
        integer("epoch", meta["epoch"], 0, 2**31 - 1)
    if "seed" in meta:
        integer("seed", meta["seed"], 0, MAX_SEED)
    table("config", allow_null=True)


def _diff_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict
        and not isinstance(own[k], nn.parameter.UninitializedParameter)
        and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]

    # load_state_dict casts silently: a float weight stored as int8 or bool would come back rounded
    dtypes = [
        f"{k}: checkpoint {str(state_dict[k].dtype).removeprefix('torch.')} vs model {str(own[k].dtype).removeprefix('torch.')}"
        for k in own
        if k in state_dict and torch.is_tensor(state_dict[k])
        and not (state_dict[k].dtype == own[k].dtype
                 or (state_dict[k].dtype.is_floating_point and own[k].dtype.is_floating_point))
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = []
    if missing:
        problems.append(f"missing in the checkpoint: {few(missing)}")
    if unexpected:
        problems.append(f"not in the model: {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {few(shapes)}")
    if dtypes:
        problems.append(f"dtype mismatch (weights are stored as floating point): {few(dtypes)}")
    return problems


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "the checkpoint") -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` with a readable :class:`CheckpointError`."""
    target = getattr(model, "module", model)
    problems = _diff_state(target, state_dict)
    if problems:
        raise CheckpointError(f"{what} does not fit this model: " + "; ".join(problems))
    try:
        target.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # pragma: no cover - caught by the diff above in practice
        raise CheckpointError(f"{what} does not fit this model: {exc}") from None
    return model


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the network of a checkpoint: ``eclsnn.models.create(**meta["model"])`` with its weights.

    ``meta["model"]`` holds the keyword arguments of ``create`` with the model name under ``"arch"``.
    The model is returned in eval mode on the CPU.
    """
    from eclsnn.models import create

    kwargs = dict(ckpt.meta.get("model") or {})
    arch = kwargs.pop("arch", None) or kwargs.pop("name", None)
    if not arch:
        raise CheckpointError(f"{ckpt.path / META_FILE} does not say which model it holds (no model.arch)")
    try:
        model = create(arch, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an unknown arch or keyword from a foreign or newer file
        raise CheckpointError(
            f"cannot rebuild the {arch!r} model of {ckpt.path} with {kwargs}: {exc}"
        ) from None
    state = ckpt.state_dict
    problems = _diff_state(model, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt.path} is for a {arch!r} model ({_describe_kwargs(kwargs)}) but its weights "
            "do not fit that model: " + "; ".join(problems)
            + ". The checkpoint is corrupt or its meta.json was edited; use the checkpoint's own meta.json."
        )
    _materialise_lazy(model, state)
    load_weights(model, state, what=f"checkpoint {ckpt.path}")
    _check_thresholds(model, ckpt.path)
    return model.eval()


def _check_thresholds(model: nn.Module, path: Path) -> None:
    """Refuse a clip threshold λ that is not finite; warn where λ sits at or below the floor
    ``LAMBDA_MIN`` that the clip uses instead (training can push the raw parameter there, since the
    straight-through gradient still reaches it: the network then passes at most the floor per step)."""
    from eclsnn.core.clip import ThresholdClip
    from eclsnn.core.functional import LAMBDA_MIN

    for name, mod in model.named_modules():
        if not isinstance(mod, ThresholdClip) or isinstance(mod.threshold_raw, nn.parameter.UninitializedParameter):
            continue
        raw = mod.threshold_raw.detach()
        if not torch.isfinite(raw).all():
            raise CheckpointError(f"checkpoint {path}: the clip threshold λ of {name!r} is not finite "
                                  f"({_few_values(raw[~torch.isfinite(raw)])}); the checkpoint is corrupt — use another one")
        floor = torch.tensor(LAMBDA_MIN, dtype=raw.dtype)
        low = raw <= floor
        if low.any():
            where, what = (f"of {name!r}", "that layer passes") if raw.numel() == 1 or low.all() else (
                f"of {int(low.sum())} of the {raw.numel()} channels of {name!r}",
                "those channels pass (channels that never fired on the calibration data start there)")
            warnings.warn(f"checkpoint {path}: the clip threshold λ {where} is {_few_values(raw[low])}, at or "
                          f"below the floor {LAMBDA_MIN} that the clip and its spiking neurons use instead; "
                          f"{what} almost nothing", ThresholdWarning, stacklevel=3)


def _few_values(t: torch.Tensor) -> str:
    values = [f"{v:.4g}" for v in t.flatten()[:4].tolist()]
    return ", ".join(values) + (f" and {t.numel() - 4} more" if t.numel() > 4 else "")


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    keys = ("num_classes", "activation", "levels")
    return ", ".join(f"{k}={kwargs[k]!r}" for k in keys if k in kwargs)


def _materialise_lazy(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give lazily shaped parameters (per-channel λ before the first forward) the saved shape."""
    for name, param in list(model.named_parameters(recurse=True, remove_duplicate=False)):
        if isinstance(param, nn.parameter.UninitializedParameter) and name in state:
            with torch.no_grad():
                param.materialize(state[name].shape, dtype=state[name].dtype)
