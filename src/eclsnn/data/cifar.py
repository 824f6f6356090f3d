"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official archives or their extracted folders.

Both official versions are read: the "python" version (pickled dicts) and the "binary" version
(fixed-size records). The pickles are opened with `SafeUnpickler`, which can rebuild numpy arrays
and nothing else, so a tampered file cannot run code. Archives are read member by member with
`tarfile` without extracting anything to disk; only regular files with the expected names are read.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eclsnn.errors import DataError
from .download import download_file
from .info import DATASETS, ImageTensors
from .paths import ENV_VAR, download_root, format_places, search_roots

URL = "https://www.cs.toronto.edu/~kriz/"
_PIXELS = 3 * 32 * 32


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------

def _numpy_reconstruct() -> Callable:
    try:  # numpy >= 2 moved the module; importing the old name there only emits a deprecation warning
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Everything the official CIFAR pickles reference: ndarray.__reduce__ emits these three globals.
# Dicts, lists, ints and byte strings need no global at all.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals CIFAR files need; anything else is a DataError."""

    def find_class(self, module: str, name: str) -> object:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(
                f"refusing to unpickle {module}.{name}: a CIFAR batch file only contains numpy arrays, "
                "so this file is not a genuine CIFAR file (it may be malicious). Delete it and fetch the "
                "official archive again (or use the binary version, which needs no pickle)"
            )
        return resolve()


def safe_unpickle(raw: bytes, where: str) -> object:
    """Unpickle CIFAR python-version bytes with `SafeUnpickler` (``encoding="bytes"`` like the originals)."""
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside pickle means a damaged file
        raise DataError(f"{where} is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
                        "delete it and fetch the official archive again") from err


# --------------------------------------------------------------------------------------------------
# The four official layouts
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CifarLayout:
    """One official distribution: folder name inside the archive, archive name, member names, format."""

    folder: str
    archive: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    kind: str                 # "python" or "binary"
    label_key: str = ""       # python version: dict key of the labels
    header: int = 0           # binary version: bytes before the pixels of each record
    label_offset: int = 0     # binary version: which header byte is the label we use
    md5: str | None = None    # of the archive, where we download it


_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

LAYOUTS: dict[str, tuple[CifarLayout, ...]] = {
    # Binary first: it needs no unpickling at all, and it is what --download fetches.
    "cifar10": (
        CifarLayout("cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                    tuple(b + ".bin" for b in _CIFAR10_BATCHES), ("test_batch.bin",),
                    kind="binary", header=1, label_offset=0, md5="c32a1d4ab5d03f1284b67883e8d87530"),
        CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                    _CIFAR10_BATCHES, ("test_batch",), kind="python", label_key="labels"),
    ),
    "cifar100": (
        # Records are <coarse label><fine label><pixels>; we use the 100 fine classes.
        CifarLayout("cifar-100-binary", "cifar-100-binary.tar.gz", ("train.bin",), ("test.bin",),
                    kind="binary", header=2, label_offset=1, md5="03b5dce01913d631647c71ecec9e9cb8"),
        CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
                    kind="python", label_key="fine_labels"),
    ),
}


class _FolderSource:
    """Members read from an extracted folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, member: str) -> bytes:
        path = self.folder / member
        if not path.is_file():
            raise DataError(f"{path} is missing; the folder {self.folder} is incomplete. "
                            "Extract the official archive again (or pass --download)")
        return path.read_bytes()

    def __enter__(self) -> _FolderSource:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _TarSource:
    """Members read straight from a .tar.gz; only regular files with the exact expected name."""

    def __init__(self, archive: Path, folder: str) -> None:
        self.archive, self.folder = archive, folder
        try:
            self.tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{archive} is not a readable tar archive ({err}); "
                            "delete it and fetch it again (or pass --download)") from err

    def read(self, member: str) -> bytes:
        name = f"{self.folder}/{member}"
        try:
            info = self.tar.getmember(name)
        except KeyError:
            raise DataError(f"{self.archive} has no member {name}; it is not the official archive "
                            "or it is incomplete. Delete it and fetch it again") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{self.archive} is damaged ({err}); delete it and fetch it again") from err
        if not info.isreg():  # links could point anywhere; the official archives hold plain files
            raise DataError(f"{self.archive}: member {name} is not a regular file; refusing to read it")
        try:
            handle = self.tar.extractfile(info)
            assert handle is not None
            return handle.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{self.archive} is damaged ({err}); delete it and fetch it again") from err

    def __enter__(self) -> _TarSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tar.close()


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

def _dict_get(batch: dict, key: str, where: str) -> object:
    """Key lookup that accepts the byte-string keys of the Python 2 originals and str keys alike."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{where} has no {key!r} entry; it is not a CIFAR batch file")


def parse_python_batch(raw: bytes, label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A python-version batch -> (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    batch = safe_unpickle(raw, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where} does not hold a dict; it is not a CIFAR batch file")
    data = _dict_get(batch, "data", where)
    labels = np.asarray(_dict_get(batch, label_key, where))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{where}: 'data' must be a uint8 array [N, {_PIXELS}]; the file is damaged")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected {len(data)} integer labels; the file is damaged")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: already CHW.
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def parse_binary_batch(raw: bytes, header: int, label_offset: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary-version batch (fixed records: `header` label bytes + 3072 pixels) -> (images, labels)."""
    record = header + _PIXELS
    if len(raw) == 0 or len(raw) % record:
        raise DataError(f"{where} has {len(raw)} bytes, not a whole number of {record}-byte records; "
                        "it is truncated or not a CIFAR file. Delete it and fetch it again")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_offset].astype(np.int64)
    images = rows[:, header:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _read_split(source: _FolderSource | _TarSource, layout: CifarLayout, train: bool, where: Path,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for member in layout.train_members if train else layout.test_members:
        raw = source.read(member)
        name = f"{where}:{member}"
        if layout.kind == "python":
            x, y = parse_python_batch(raw, layout.label_key, name)
        else:
            x, y = parse_binary_batch(raw, layout.header, layout.label_offset, name)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{name} has labels outside 0..{num_classes - 1}; "
                            "it belongs to another data set or is damaged")
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# --------------------------------------------------------------------------------------------------
# Finding, downloading, loading
# --------------------------------------------------------------------------------------------------

def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold the archive or the extracted folder: each root and root/<name>."""
    dirs: list[Path] = []
    for root in search_roots(data_dir):
        dirs += [root, root / name]
    return dirs


def find_source(name: str, data_dir: str | os.PathLike | None) -> tuple[CifarLayout, Path] | None:
    """First (layout, path) found: an extracted folder is preferred to an archive in the same place."""
    for folder in candidate_dirs(name, data_dir):
        for layout in LAYOUTS[name]:
            if (folder / layout.folder).is_dir():
                return layout, folder / layout.folder
            if (folder / layout.archive).is_file():
                return layout, folder / layout.archive
    return None


def _missing_message(name: str, data_dir: str | os.PathLike | None) -> str:
    names = ", ".join(f"{layout.archive} or {layout.folder}/" for layout in LAYOUTS[name])
    return (
        f"{name} not found: looked for {names} in:\n{format_places(candidate_dirs(name, data_dir))}\n"
        f"Fix it with one of:\n"
        f"  - download an archive from {URL}cifar.html into a folder and pass --data-dir DIR "
        f"(or set {ENV_VAR}=DIR)\n"
        f"  - pass --download (or download=True) to fetch the binary version automatically"
    )


def load_cifar(name: str, train: bool, data_dir: str | os.PathLike | None = None,
               download_missing: bool = False) -> ImageTensors:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as uint8 images [N, 3, 32, 32] and int64 labels."""
    info = DATASETS[name]
    found = find_source(name, data_dir)
    if found is None and download_missing:
        layout = LAYOUTS[name][0]  # the binary version: safest to read
        download_file(URL + layout.archive, download_root(data_dir) / layout.archive, layout.md5)
        found = find_source(name, data_dir)
    if found is None:
        raise DataError(_missing_message(name, data_dir))
    layout, path = found
    source = _FolderSource(path) if path.is_dir() else _TarSource(path, layout.folder)
    with source:
        images, labels = _read_split(source, layout, train, path, info.num_classes)
    return ImageTensors(images=images, labels=labels, info=info)
