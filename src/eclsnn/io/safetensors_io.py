"""Reading and writing the files of a checkpoint: safetensors (never a pickle: a pickled file is refused
with what to do instead) and JSON, and nested state (optimizer, scheduler, RNG) split into a JSON
structure plus named tensors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from eclsnn.errors import CheckpointError
from eclsnn.limits import MAX_JSON_BYTES, load_limit_hint, max_load_bytes

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".npy", ".npz", ".joblib")
_UNPICKLE_MESSAGE = (
    "eclsnn never unpickles files (unpickling can run arbitrary code). If you trust the file, convert it "
    "yourself: `sd = torch.load(path, weights_only=True); safetensors.torch.save_file(sd, "
    "'model.safetensors')`, then load the weights into a model from eclsnn.models.create and save an "
    "eclsnn checkpoint with eclsnn.io.checkpoint.save_checkpoint"
)




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


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str, path: str = "") -> Any:
    """Inverse of :func:`_encode`; a structure it could not have written is a CheckpointError naming the
    file (``where``) and the field."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: field {path or '(top level)'!r} {why}; the checkpoint is corrupt — use another one")

    def at(key) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(obj, dict):
        if "__tensor__" in obj and len(obj) == 1:
            name = obj["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise bad(f"names tensor {name!r}, which is missing")
            return tensors[name]
        if "__tuple__" in obj and len(obj) == 1:
            if not isinstance(obj["__tuple__"], list):
                raise bad("must hold a list (a tuple)")
            return tuple(_decode(v, tensors, where, at(i)) for i, v in enumerate(obj["__tuple__"]))
        if "__dict__" in obj and len(obj) == 1:
            pairs = obj["__dict__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise bad("must hold a list of [key, value] pairs")
            out = {}
            for i, (k, v) in enumerate(pairs):
                key = _decode(k, tensors, where, at(f"key{i}"))
                try:
                    hash(key)
                except TypeError:
                    raise bad(f"has a key of type {type(key).__name__}") from None
                out[key] = _decode(v, tensors, where, at(key))
            return out
        if "__ndarray__" in obj and len(obj) == 1:
            return _decode_ndarray(obj["__ndarray__"], bad)
        return {k: _decode(v, tensors, where, at(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, where, at(i)) for i, v in enumerate(obj)]
    return obj


def _decode_ndarray(spec: Any, bad) -> Any:
    """A small numpy array (an RNG key) from ``{"dtype", "shape", "data"}``; numbers only."""
    import numpy as np

    if not isinstance(spec, dict) or not {"dtype", "shape", "data"} <= set(spec):
        raise bad("must hold an array's dtype, shape and data")
    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:
        raise bad(f"has the unknown array dtype {spec['dtype']!r}") from None
    shape, data = spec["shape"], spec["data"]
    if dtype.kind not in "biuf" or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) \
            or not isinstance(data, list) or math.prod(shape) != len(data):
        raise bad("does not hold a numeric array whose data fits its shape")
    try:
        return np.asarray(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad(f"holds values that are not {dtype}: {exc}") from None


def _state_files(stem: str, state: Any) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    files = {f"{stem}.json": _json_bytes(structure)}
    if tensors:
        files[f"{stem}.safetensors"] = st_save(tensors)
    return files


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


def _open_checked(path: Path):
    """``path`` opened for reading after refusing a pickle, or a CheckpointError."""
    _refuse_pickle(path)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({why}); it is truncated or corrupt. "
        "Use another checkpoint (e.g. checkpoints/best or an earlier copy)."
    )


def _safetensors_extent(path: Path, f, size: int) -> int:
    """The bytes the file's header declares (header and data), checked against the file's size and
    :func:`~eclsnn.limits.max_load_bytes` before the data is read."""
    head = f.read(8)
    if len(head) < 8:
        raise _corrupt(path, f"{size} bytes, shorter than a header")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, MAX_JSON_BYTES):
        raise _corrupt(path, f"its header declares {n} bytes of header, the file has {size}")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"the header is not JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    declared = 8 + n + end
    if declared > size:
        raise _corrupt(path, f"its header declares {declared} bytes, the file has {size}")
    if declared != size:
        raise _corrupt(path, f"{size - declared} bytes after the {declared} its header declares")
    if declared > max_load_bytes():
        raise CheckpointError(f"{path} declares {declared} bytes of tensors, {load_limit_hint(declared)}")
    return declared


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read only after its header's sizes were checked against the
    file and the load limit (a sparse multi-GB file is refused without being read)."""
    with _open_checked(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            extent = _safetensors_extent(path, f, size)
            f.seek(0)
            data = f.read(extent)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        return st_load(data)
    except (SafetensorError, Exception) as exc:  # the Rust parser raises several types
        raise _corrupt(path, str(exc)) from None


def _read_json(path: Path) -> Any:
    with _open_checked(path) as f:
        try:
            data = f.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is larger than the {MAX_JSON_BYTES} bytes of a checkpoint's JSON file; it is "
                              "not eclsnn's (eclsnn keeps arrays in safetensors files)")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be eclsnn's JSON; the file is corrupt") from None
