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
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from eclsnn.errors import CheckpointError

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
FAULT_ENV = "ECLSNN_FAULT_CHECKPOINT"

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".npy", ".npz", ".joblib")
_UNPICKLE_MESSAGE = (
    "eclsnn never unpickles files (unpickling can run arbitrary code). If you trust the file, convert it "
    "yourself: `sd = torch.load(path, weights_only=True); safetensors.torch.save_file(sd, "
    "'model.safetensors')`, then load the weights into a model from eclsnn.models.create and save an "
    "eclsnn checkpoint with eclsnn.io.checkpoint.save_checkpoint"
)


# --------------------------------------------------------------------------------------------------
# small helpers


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The commit of the eclsnn source tree (``git rev-parse HEAD``), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and len(rev) >= 40 else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fault_spec() -> tuple[str, int, int] | None:
    """``(file, byte offset, n)`` from ``ECLSNN_FAULT_CHECKPOINT="<file>:<offset>[:<n>]"``: stop during
    the n-th write (default 1st) of that file by this process."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if len(parts) == 3:
            return parts[0], int(parts[1]), int(parts[2])
        if len(parts) == 2:
            return parts[0], int(parts[1]), 1
    except ValueError:
        pass
    return None


_fault_counts: dict[str, int] = {}


def _fault_hit(name: str, checkpoint: str) -> int | None:
    """The byte offset at which to stop if this write of `name` is the one selected for a fault."""
    spec = _fault_spec()
    if spec is None or spec[0] not in (name, f"{checkpoint}/{name}"):
        return None
    _fault_counts[spec[0]] = _fault_counts.get(spec[0], 0) + 1
    return spec[1] if _fault_counts[spec[0]] == spec[2] else None


def _write_bytes(path: Path, data: bytes, checkpoint: str) -> None:
    """Write and fsync one file; the fault-injection hook stops the process part-way if asked."""
    stop_at = _fault_hit(path.name, checkpoint)
    with open(path, "wb") as f:
        if stop_at is not None:
            f.write(data[:stop_at])
            f.flush()
            os.fsync(f.fileno())
            os._exit(137)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# nested state (optimizer, scheduler, RNG) <-> JSON structure + named tensors


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if torch.is_tensor(obj):
        name = path or "tensor"
        while name in tensors:  # e.g. keys "a.b" and {"a": {"b": ...}} in the same structure
            name += "'"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{path}.key{i}"), _encode(v, tensors, f"{path}.{k}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:  # numpy arrays and scalars (numpy's RNG state)
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(obj, np.ndarray) and obj.size <= 4096:  # small arrays (RNG keys) as JSON
        return {"__ndarray__": {"dtype": str(obj.dtype), "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at {path or 'top level'} in a checkpoint (only tensors, "
        "numbers, strings, lists, tuples and dicts; eclsnn does not pickle)"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError:
                raise CheckpointError(f"{where}: tensor {obj['__tensor__']!r} is missing; the checkpoint is corrupt") from None
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__dict__"]}
        if set(obj) == {"__ndarray__"}:
            import numpy as np

            spec = obj["__ndarray__"]
            return np.asarray(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"])
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    return obj


def _state_files(stem: str, state: Any) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    files = {f"{stem}.json": _json_bytes(structure)}
    if tensors:
        files[f"{stem}.safetensors"] = st_save(tensors)
    return files


# --------------------------------------------------------------------------------------------------
# RNG


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU (and every CUDA device in use), Python ``random``, numpy."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (states of devices that are not present are skipped)."""
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


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
    but a ``.old-<name>-<pid>`` folder of a dead writer exists, put it back (it is complete)."""
    if not parent.is_dir():
        return
    dest = parent / name
    for prefix in (".old-", ".tmp-"):
        for leftover in sorted(parent.glob(f"{prefix}{name}-*")):
            pid_text = leftover.name[len(prefix) + len(name) + 1:]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            try:
                if prefix == ".old-" and not dest.exists():
                    os.replace(leftover, dest)
                    _fsync_dir(parent)
                else:
                    shutil.rmtree(leftover)
            except OSError:
                pass  # read-only location: leave it, readers fall back below


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


def _refuse_pickle(path: Path) -> None:
    """Raise if `path` looks like a pickle or a torch.save zip archive (by name or by its first bytes)."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} looks like a pickle-based file ({path.suffix}). {_UNPICKLE_MESSAGE}")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    # A safetensors file starts with its header's length (8 bytes, little-endian), then the JSON header:
    # a length whose low byte is 0x80 must not be taken for a pickle's protocol marker.
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        kind = "a pickle" if head[:1] == b"\x80" else "a zip archive (the torch.save format)"
        raise CheckpointError(f"{path} is {kind}. {_UNPICKLE_MESSAGE}")


def _read_file(path: Path) -> bytes:
    _refuse_pickle(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data = _read_file(path)
    try:
        return st_load(data)
    except (SafetensorError, Exception) as exc:  # the Rust parser raises several types
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}); it is truncated or corrupt. "
            "Use another checkpoint (e.g. checkpoints/best or an earlier copy)."
        ) from None


def _read_json(path: Path) -> Any:
    data = _read_file(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is truncated or corrupt") from None


def _checkpoint_dir(folder: Path) -> Path | None:
    """`folder` itself if it is a checkpoint, after recovering a leftover aside copy if needed."""
    if not folder.exists():
        _cleanup_leftovers(folder.parent, folder.name)
    if (folder / META_FILE).is_file() or (folder / MODEL_FILE).is_file():
        return folder
    # The writer died between its two renames and the aside copy could not be put back (read-only).
    parent = folder.parent
    if parent.is_dir():
        for old in sorted(parent.glob(f".old-{folder.name}-*")):
            if (old / META_FILE).is_file():
                return old
    return None


def find_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint folder `folder` (recovered from an interrupted write if need be), or None if
    there is no checkpoint there. Used to decide whether a run can be resumed."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return None
    return _checkpoint_dir(folder)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder (its ``checkpoints/last``), a checkpoint folder, or a
    ``model.safetensors`` / ``meta.json`` file inside one."""
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
        return _decode(structure, tensors, str(json_path))

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
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{folder} has no {MODEL_FILE}; the checkpoint is incomplete — use another one")
    state_dict = _read_safetensors(model_path)
    return Checkpoint(path=folder, meta=meta, state_dict=state_dict)


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

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = []
    if missing:
        problems.append(f"missing in the checkpoint: {few(missing)}")
    if unexpected:
        problems.append(f"not in the model: {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {few(shapes)}")
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
    return model.eval()


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    keys = ("num_classes", "activation", "levels")
    return ", ".join(f"{k}={kwargs[k]!r}" for k in keys if k in kwargs)


def _materialise_lazy(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give lazily shaped parameters (per-channel λ before the first forward) the saved shape."""
    for name, param in list(model.named_parameters(recurse=True, remove_duplicate=False)):
        if isinstance(param, nn.parameter.UninitializedParameter) and name in state:
            with torch.no_grad():
                param.materialize(state[name].shape, dtype=state[name].dtype)
