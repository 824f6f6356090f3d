"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official archives or their extracted folders.

Both official versions are read: the "python" version (pickled dicts) and the "binary" version
(fixed-size records). The pickles are opened with `SafeUnpickler`, which can rebuild the official layout
of a uint8 array from exactly its bytes and nothing else, so a tampered file can neither run code nor
declare memory its bytes do not hold. Archives are read member by member with
`tarfile` without extracting anything to disk; only regular files with the expected names are read.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eclsnn import limits
from eclsnn.errors import DataError
from .download import download_file
from .info import DATASETS, ImageTensors
from .paths import ENV_VAR, download_root, format_places, search_roots

URL = "https://www.cs.toronto.edu/~kriz/"
_PIXELS = 3 * 32 * 32


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------
#
# The official python-version files are Python 2 pickles of a dict whose "data" is a uint8 array [N, 3072],
# pickled the way numpy pickles any array: ``_reconstruct(ndarray, (0,), b"b")`` makes an empty array, and
# BUILD hands it ``(1, (N, 3072), dtype, False, <N*3072 raw bytes>)``, where the dtype is ``dtype("u1", 0,
# 1)`` BUILT with ``(3, "|", None, None, None, -1, -1, 0)``. The unpickler below accepts exactly that
# construction and no other: its three globals are stand-ins, not numpy's, which check every argument
# and state and finally wrap the raw bytes (np.frombuffer, no copy). An array is never made from a shape
# alone, with caller-chosen strides or buffers, or with another dtype, so its size is the size of the bytes
# the file really holds.

_BAD = "; it is not a genuine CIFAR batch file (it may be malicious): delete it and fetch the official archive again"


class _NdarrayStandIn:
    """What ``numpy.ndarray`` resolves to: a marker that only `_reconstruct` accepts. It is an instance,
    not a type, so NEWOBJ refuses it, and calling it is refused."""

    def __call__(self, *args: object) -> object:
        raise DataError(f"refusing numpy.ndarray{_short(args)}: a CIFAR file never calls it{_BAD}")


_NDARRAY = _NdarrayStandIn()


def _short(args: object) -> str:
    text = repr(args)
    return text if len(text) < 80 else text[:77] + "..."


def _is_text(value: object, expected: str) -> bool:
    return value in (expected, expected.encode())


class _Uint8Dtype:
    """``numpy.dtype("u1")`` as numpy pickles it; BUILD must give numpy's own state for it."""

    __slots__ = ("built",)

    def __init__(self) -> None:
        self.built = False

    def __setstate__(self, state: object) -> None:
        ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and _is_text(state[1], "|")
              and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0))
        if self.built or not ok:
            raise DataError(f"refusing a uint8 dtype with state {_short(state)}{_BAD}")
        self.built = True


def _dtype(obj: object = None, align: object = False, copy: object = True) -> _Uint8Dtype:
    if not (_is_text(obj, "u1") and align in (0, False) and copy in (1, True)
            and type(align) in (int, bool) and type(copy) in (int, bool)):
        raise DataError(f"refusing numpy.dtype{_short((obj, align, copy))}: CIFAR pixels are uint8 ('u1'){_BAD}")
    return _Uint8Dtype()


class _Uint8Rows:
    """The array `_reconstruct` starts; BUILD must give it shape (N, 3072), the uint8 dtype, C order and
    exactly N * 3072 bytes. ``rows`` is then those bytes as a read-only array."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if self.rows is not None or not isinstance(state, tuple) or len(state) != 5:
            raise DataError(f"refusing an array state {_short(state)}{_BAD}")
        version, shape, dtype, fortran, raw = state
        if not (version == 1 and isinstance(shape, tuple) and len(shape) == 2
                and all(type(d) is int for d in shape) and shape[0] >= 0 and shape[1] == _PIXELS):
            raise DataError(f"refusing an array of shape {_short(shape)}: CIFAR data is [N, {_PIXELS}]{_BAD}")
        if not (isinstance(dtype, _Uint8Dtype) and dtype.built):
            raise DataError(f"refusing an array of dtype {_short(dtype)}: CIFAR pixels are uint8{_BAD}")
        if fortran not in (0, False) or type(fortran) not in (int, bool):
            raise DataError(f"refusing an array in Fortran order: CIFAR data is stored row by row{_BAD}")
        if type(raw) is not bytes or len(raw) != shape[0] * _PIXELS:
            size = len(raw) if isinstance(raw, (bytes, bytearray, str)) else type(raw).__name__
            raise DataError(f"refusing an array of shape {shape} built from {size} bytes of data "
                            f"(it needs {shape[0] * _PIXELS}){_BAD}")
        self.rows = np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _reconstruct(cls: object = None, shape: object = None, typecode: object = None) -> _Uint8Rows:
    if cls is not _NDARRAY or shape != (0,) or not _is_text(typecode, "b"):
        raise DataError(f"refusing numpy's _reconstruct{_short((shape, typecode))}: a CIFAR file only "
                        f"starts empty arrays with it, whose data follows{_BAD}")
    return _Uint8Rows()


# Everything the official CIFAR pickles reference: ndarray.__reduce__ emits these three globals.
# Dicts, lists, ints and byte strings need no global at all.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only stand-ins for the numpy globals CIFAR files need (see above); anything
    else is a DataError."""

    def find_class(self, module: str, name: str) -> object:
        resolved = _ALLOWED_GLOBALS.get((module, name))
        if resolved is None:
            raise DataError(
                f"refusing to unpickle {module}.{name}: a CIFAR batch file only contains numpy arrays, "
                "so this file is not a genuine CIFAR file (it may be malicious). Delete it and fetch the "
                "official archive again (or use the binary version, which needs no pickle)"
            )
        return resolved


def safe_unpickle(raw: bytes, where: str) -> object:
    """Unpickle CIFAR python-version bytes with `SafeUnpickler` (``encoding="bytes"`` like the originals).
    Arrays come back as numpy arrays; nothing else numpy's can be built."""
    try:
        return _unwrap(SafeUnpickler(io.BytesIO(raw), encoding="bytes").load(), where)
    except DataError as err:
        if str(err).startswith(where):
            raise
        raise DataError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure inside pickle means a damaged file
        raise DataError(f"{where} is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
                        "delete it and fetch the official archive again") from err


def _unwrap(value: object, where: str) -> object:
    """The unpickled top level with each finished stand-in array replaced by its numpy array."""
    def one(item: object) -> object:
        if isinstance(item, _Uint8Rows):
            if item.rows is None:
                raise DataError(f"{where}: an array is started but never given its data{_BAD}")
            return item.rows
        if isinstance(item, (_Uint8Dtype, _NdarrayStandIn)):
            raise DataError(f"{where}: a bare numpy dtype or ndarray where data belongs{_BAD}")
        return item

    if isinstance(value, dict):
        return {key: one(item) for key, item in value.items()}
    return one(value)


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


def _check_size(where: object, size: int) -> None:
    """A batch file is read whole: refuse one beyond the load limit before reading it."""
    if size > limits.max_load_bytes():
        raise DataError(f"{where} has {size} bytes, {limits.load_limit_hint(size, 'the data set')}")


class _FolderSource:
    """Members read from an extracted folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, member: str) -> bytes:
        path = self.folder / member
        if not path.is_file():
            raise DataError(f"{path} is missing; the folder {self.folder} is incomplete. "
                            "Extract the official archive again (or pass --download)")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(path, size)
            return f.read(size)  # (what was checked, even if the file grows meanwhile)

    def __enter__(self) -> _FolderSource:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (a GNU long name, pax attributes), which tarfile reads whole
    into memory, may declare at most ``MAX_ARCHIVE_HEADER_BYTES``."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > limits.MAX_ARCHIVE_HEADER_BYTES:
            raise DataError(f"{tarfile_.name}: an extended tar header declares {self.size} bytes, "
                            f"{limits.load_limit_hint(self.size, 'the archive')}"
                            if self.size > limits.max_load_bytes() else
                            f"{tarfile_.name}: an extended tar header declares {self.size} bytes, more than the "
                            f"{limits.MAX_ARCHIVE_HEADER_BYTES} of any genuine archive; it is not the official "
                            "archive. Delete it and fetch it again")
        return super()._proc_member(tarfile_)


class _TarSource:
    """Members read straight from a .tar.gz; only regular files with the exact expected name. The archive's
    entries are listed once, at most ``MAX_ARCHIVE_MEMBERS`` of them (tarfile keeps each in memory)."""

    def __init__(self, archive: Path, folder: str) -> None:
        self.archive, self.folder = archive, folder
        try:
            self.tar = tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo)
            self.members: dict[str, tarfile.TarInfo] = {}
            while (info := self.tar.next()) is not None:
                if len(self.members) >= limits.MAX_ARCHIVE_MEMBERS:
                    raise DataError(f"{archive} has more than {limits.MAX_ARCHIVE_MEMBERS} members; the official "
                                    "archive has fewer than ten. Delete it and fetch it again")
                self.members.setdefault(info.name, info)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{archive} is not a readable tar archive ({err}); "
                            "delete it and fetch it again (or pass --download)") from err

    def read(self, member: str) -> bytes:
        name = f"{self.folder}/{member}"
        info = self.members.get(name)
        if info is None:
            raise DataError(f"{self.archive} has no member {name}; it is not the official archive "
                            "or it is incomplete. Delete it and fetch it again")
        if not info.isreg():  # links could point anywhere; the official archives hold plain files
            raise DataError(f"{self.archive}: member {name} is not a regular file; refusing to read it")
        _check_size(f"{self.archive}:{name}", info.size)
        try:
            handle = self.tar.extractfile(info)
            assert handle is not None
            return handle.read(info.size)
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


def parse_python_batch(raw: bytes, label_key: str, where: str,
                       num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A python-version batch -> (uint8 images [N, 3, 32, 32], int64 labels [N]).

    ``data`` is the uint8 array [N, 3072] of the official files (or the same N * 3072 bytes as a byte
    string), ``label_key`` a list of N ints in ``[0, num_classes)`` (default: eclsnn's bound on classes).
    """
    batch = safe_unpickle(raw, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where} does not hold a dict; it is not a CIFAR batch file")
    data = _dict_get(batch, "data", where)
    if type(data) is bytes and len(data) % _PIXELS == 0:
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, _PIXELS)
    if not isinstance(data, np.ndarray):
        raise DataError(f"{where}: 'data' must be a uint8 array [N, {_PIXELS}] (or N * {_PIXELS} bytes); "
                        "it is not a CIFAR batch file, or it is damaged")
    labels = _dict_get(batch, label_key, where)
    bound = limits.MAX_NUM_CLASSES if num_classes is None else num_classes
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(f"{where}: {label_key!r} must be a list of {len(data)} labels, one per image; "
                        "it is not a CIFAR batch file, or it is damaged")
    if not all(type(y) is int and 0 <= y < bound for y in labels):
        raise DataError(f"{where}: {label_key!r} must hold integers in 0..{bound - 1}; it is not a CIFAR "
                        "batch file of this data set, or it is damaged")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: already CHW.
    return data.reshape(-1, 3, 32, 32).copy(), np.asarray(labels, dtype=np.int64).reshape(-1)


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
            x, y = parse_python_batch(raw, layout.label_key, name, num_classes)
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
