"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its IDX files, parsed with numpy.

The files are looked for in several common layouts so that copies made by other tools (torchvision's
``FashionMNIST/raw``, the Debian package ``dataset-fashion-mnist``) are used as they are.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from eclsnn import limits
from eclsnn.errors import DataError
from .download import download_file
from .info import DATASETS, ImageTensors
from .paths import ENV_VAR, download_root, format_places, search_roots

# Installed by `apt-get install dataset-fashion-mnist`. Read at call time, so tests can point it elsewhere.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Published MD5s of the official .gz files (the same ones torchvision checks).
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def split_files(train: bool) -> tuple[str, str]:
    """Base names (without .gz) of the image and label files of one split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Every folder searched, in order: each root itself, root/fashion-mnist, root/FashionMNIST/raw, system."""
    dirs: list[Path] = []
    for root in search_roots(data_dir):
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs.append(Path(SYSTEM_DIR))
    return dirs


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_split(data_dir: str | os.PathLike | None, train: bool) -> tuple[Path, Path] | None:
    """First folder holding both files of the split (compressed or not), or None."""
    image_stem, label_stem = split_files(train)
    for folder in candidate_dirs(data_dir):
        images, labels = _find_file(folder, image_stem), _find_file(folder, label_stem)
        if images is not None and labels is not None:
            return images, labels
    return None


_CHUNK = 1 << 24


def _read_exactly(stream: BinaryIO, count: int) -> bytearray:
    """Up to `count` bytes of `stream`, read in chunks: the memory taken follows the data that is really
    there, not the count a header asked for."""
    chunks, total = [], 0
    while total < count:
        chunk = stream.read(min(count - total, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    out, position = bytearray(total), 0
    chunks.reverse()
    while chunks:  # each chunk freed once copied
        chunk = chunks.pop()
        out[position:position + len(chunk)] = chunk
        position += len(chunk)
    return out


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with `ndim` dimensions (LeCun's MNIST format), gzipped or not
    (whatever its name says).

    Layout: two zero bytes, a type byte (0x08 = ubyte), the number of dimensions, then one big-endian
    uint32 per dimension, then the data. The header is checked before the data is read; the data is read
    up to the size the header declares (which must be within :func:`eclsnn.limits.max_load_bytes`) and
    not a byte further, so a gzip stream that inflates to more than that is refused unread.
    """
    fix = "delete it and fetch it again (e.g. with --download)"
    try:
        with open(path, "rb") as raw_file:
            compressed = raw_file.read(2) == _GZIP_MAGIC
            raw_file.seek(0)
            stream: BinaryIO = gzip.GzipFile(fileobj=raw_file, mode="rb") if compressed else raw_file
            return _parse_idx(stream, path, ndim, None if compressed else os.fstat(raw_file.fileno()).st_size, fix)
    except (OSError, EOFError, zlib.error) as err:
        damage = "a damaged gzip file" if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) else "unreadable"
        raise DataError(f"{path} is {damage} ({err}); {fix}") from err


def _parse_idx(stream: BinaryIO, path: Path, ndim: int, file_size: int | None, fix: str) -> np.ndarray:
    header_size = 4 + 4 * ndim
    header = _read_exactly(stream, header_size)
    if len(header) < header_size:
        raise DataError(f"{path} is too short to be an IDX file ({len(header)} bytes); {fix}")
    zero, type_code, dims = struct.unpack(">HBB", header[:4])
    if zero != 0 or type_code != _IDX_UBYTE or dims != ndim:
        raise DataError(
            f"{path} has IDX magic 0x{header[:4].hex()}, expected 0x000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions); it is not the expected file or it is corrupt; {fix}"
        )
    shape = struct.unpack(f">{ndim}I", header[4:])
    declared = math.prod(shape)  # Python integers: no overflow, however large the dimensions
    if declared > limits.max_load_bytes():
        raise DataError(f"{path} declares shape {shape}, {declared} bytes: "
                        f"{limits.load_limit_hint(declared, 'the data set')}")
    if file_size is not None and file_size != header_size + declared:
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {shape} "
                        f"({header_size + declared} bytes) but it has {file_size} bytes; {fix}")
    data = _read_exactly(stream, declared)
    if len(data) != declared:
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {shape} "
                        f"({declared} bytes of data) but it holds {len(data)}; {fix}")
    if stream.read(1):
        raise DataError(f"{path} holds more data than its header declares (shape {shape}); "
                        f"it is not the expected file or it is corrupt; {fix}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _missing_message(data_dir: str | os.PathLike | None, train: bool) -> str:
    image_stem, label_stem = split_files(train)
    return (
        f"Fashion-MNIST {'training' if train else 'test'} files ({image_stem}[.gz], {label_stem}[.gz]) "
        f"not found. Searched:\n{format_places(candidate_dirs(data_dir))}\n"
        "Fix it with one of:\n"
        "  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs them in "
        f"{SYSTEM_DIR})\n"
        f"  - put the four IDX files in a folder and pass --data-dir DIR (or set {ENV_VAR}=DIR)\n"
        "  - pass --download (or download=True) to fetch them from the official host"
    )


def download(data_dir: str | os.PathLike | None, train: bool) -> None:
    """Fetch the split's two .gz files into ``<root>/fashion-mnist/`` (a searched layout)."""
    folder = download_root(data_dir) / "fashion-mnist"
    for stem in split_files(train):
        name = stem + ".gz"
        if not (folder / name).is_file():
            download_file(URL + name, folder / name, MD5[name])


def load_fashion_mnist(
    train: bool, data_dir: str | os.PathLike | None = None, download_missing: bool = False
) -> ImageTensors:
    """Load one split as uint8 images [N, 1, 28, 28] and int64 labels [N]."""
    found = find_split(data_dir, train)
    if found is None and download_missing:
        download(data_dir, train)
        found = find_split(data_dir, train)
    if found is None:
        raise DataError(_missing_message(data_dir, train))
    image_path, label_path = found
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    info = DATASETS["fashion-mnist"]
    side = info.image_size
    if images.shape[1:] != (side, side):
        raise DataError(f"{image_path} holds images of {images.shape[1]} x {images.shape[2]} pixels; "
                        f"Fashion-MNIST images are {side} x {side}. It is not the expected file; delete it and "
                        "fetch it again (e.g. with --download)")
    if len(images) == 0:
        raise DataError(f"{image_path} holds no images; delete it and fetch it again (e.g. with --download)")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            "the two files belong to different splits or one is damaged"
        )
    if labels.size and int(labels.max()) >= info.num_classes:
        raise DataError(f"{label_path} has label {int(labels.max())}, Fashion-MNIST has {info.num_classes} classes")
    return ImageTensors(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels).to(torch.int64),
        info=info,
    )
