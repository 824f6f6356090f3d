"""Hostile data files (issue #14, items 3, 5 and 7): CIFAR pickles that build arrays their bytes do not hold,
IDX files whose header or gzip stream lies, PNG/JPEG files declaring giant images, sizes read from data, and
a torchvision that breaks at import. Every one ends in a DataError naming the limit (at the command line: one
line, exit 2), checked before anything large is allocated.

The decompression bombs are opened in one subprocess whose address space is limited to its size after the
imports + 512 MiB (RLIMIT_AS in the pytest process would break torch's threads); it reports each case's
outcome and its peak resident memory."""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import eclsnn.data.fashion_mnist as fmnist_mod
from eclsnn.cli import main
from eclsnn.data import DATASETS, infer_info_from_tensors, load_dataset
from eclsnn.data.cifar import parse_python_batch
from eclsnn.errors import DataError

SRC = Path(__file__).resolve().parents[1] / "src"
HEADROOM = 512 * 2**20


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ECLSNN_DATA", raising=False)
    monkeypatch.delenv("ECLSNN_MAX_LOAD_BYTES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")


# ---- protocol-2 pickles written by hand, opcode by opcode (what a hostile file can say) ---------------

def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v) if not 0 <= v < 256 else b"K" + bytes([v])


def _str(b: bytes) -> bytes:
    return b"T" + struct.pack("<i", len(b)) + b


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _dtype(code: bytes = b"u1", state: bytes | None = None) -> bytes:
    state = state if state is not None else _tuple(_int(3), _str(b"|"), b"NNN", _int(-1), _int(-1), _int(0))
    return _global("numpy", "dtype") + _tuple(_str(code), _int(0), _int(1)) + b"R" + state + b"b"


def _reconstruct(shape: tuple[int, ...], dtype: bytes) -> bytes:
    """numpy.core.multiarray._reconstruct(ndarray, shape, dtype): an array of any size, unfilled."""
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + _tuple(*map(_int, shape)) + dtype + b"\x87R")


def _array(shape: tuple[int, ...], raw: bytes, dtype: bytes | None = None, fortran: bool = False) -> bytes:
    """An array the way numpy pickles one (as in the official files): _reconstruct, then BUILD its state."""
    state = _tuple(_int(1), _tuple(*map(_int, shape)), dtype or _dtype(), b"\x88" if fortran else b"\x89", _str(raw))
    return _reconstruct((0,), _str(b"b")) + state + b"b"


def _ndarray_call(shape: tuple[int, ...], dtype: bytes, buffer: bytes, strides: tuple[int, ...]) -> bytes:
    """numpy.ndarray(shape, dtype, buffer, offset=0, strides): a view of any size on a few bytes."""
    return (_global("numpy", "ndarray") + _tuple(_tuple(*map(_int, shape)), dtype, _str(buffer), _int(0),
                                                 _tuple(*map(_int, strides))) + b"R")


def _list(values) -> bytes:
    return b"](" + b"".join(_int(v) for v in values) + b"e"


def batch(data: bytes, labels: bytes) -> bytes:
    return b"\x80\x02}(" + _str(b"data") + data + _str(b"labels") + labels + b"u."


ROW = bytes(range(256)) * 12  # 3072 bytes: one image

PICKLES = {
    # 257 bytes declaring 100 000 unfilled images (307 MB; 10^6 would be 3 GB) and as many labels
    "unfilled-100000": batch(_reconstruct((100_000, 3072), _dtype()), _reconstruct((100_000,), _dtype(b"i8"))),
    # numpy.ndarray called with strides 0: 100 000 images read from one byte
    "zero-strides": batch(_ndarray_call((100_000, 3072), _dtype(), b"\x00", (0, 0)),
                          _ndarray_call((100_000,), _dtype(b"i8"), b"\x00" * 8, (0,))),
    # a dtype whose state claims another element size
    "dtype-state": batch(_array((2, 3072), ROW * 2, dtype=_dtype(state=_tuple(
        _int(3), _str(b"|"), b"NNN", _int(3072), _int(1), _int(0)))), _list([1, 2])),
    "dtype-void": batch(_array((2, 3), ROW[:6 * 1024], dtype=_dtype(b"V1024")), _list([1, 2])),
    "dtype-int64": batch(_array((2, 384), ROW * 2, dtype=_dtype(b"<i8")), _list([1, 2])),
    "fortran-order": batch(_array((2, 3072), ROW * 2, fortran=True), _list([1, 2])),
    "raw-too-short": batch(_array((4, 3072), ROW), _list([1, 2, 3, 4])),
    "labels-an-array": batch(_array((2, 3072), ROW * 2), _array((2,), b"\x01" * 16, dtype=_dtype(b"<i8"))),
    "labels-too-few": batch(_array((2, 3072), ROW * 2), _list([1])),
    "labels-out-of-range": batch(_array((2, 3072), ROW * 2), _list([1, 2**31 - 1])),
    "labels-negative": batch(_array((2, 3072), ROW * 2), _list([1, -1])),
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_a_cifar_pickle_that_builds_anything_but_the_real_layout_is_refused(case):
    with pytest.raises(DataError, match="CIFAR"):
        parse_python_batch(PICKLES[case], "labels", "data_batch_1")


def test_the_real_layout_and_data_as_bytes_load():
    real = batch(_array((2, 3072), ROW * 2), _list([3, 9]))
    images, labels = parse_python_batch(real, "labels", "data_batch_1")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 9]
    assert images.reshape(2, -1).tobytes() == ROW * 2
    as_bytes = batch(_str(ROW * 2), _list([3, 9]))
    images2, labels2 = parse_python_batch(as_bytes, "labels", "data_batch_1")
    assert np.array_equal(images, images2) and labels2.tolist() == [3, 9]


def test_a_cifar_batch_larger_than_the_load_limit_is_refused_naming_it(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
        (folder / name).write_bytes((b"\x01" + ROW) * 2)
    assert len(load_dataset("cifar10", train=True, data_dir=tmp_path)) == 10
    monkeypatch.setenv("ECLSNN_MAX_LOAD_BYTES", "4000")
    with pytest.raises(DataError, match="data_batch_1.bin.*4000.*ECLSNN_MAX_LOAD_BYTES"):
        load_dataset("cifar10", train=True, data_dir=tmp_path)


def _tar_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    """One ustar header block, written by hand so that it may lie about its size."""
    block = bytearray(512)
    block[0:len(name)] = name.encode()
    block[100:108] = b"0000644\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[156:157] = kind
    block[257:263] = b"ustar\0"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def test_a_cifar_archive_with_many_members_is_refused_before_reading_them_all(tmp_path):
    records = (b"\x01" + ROW) * 2
    padded = records + bytes(-len(records) % 512)
    body = b"".join(_tar_header(f"junk/{i}", 0) for i in range(200))
    body += _tar_header("cifar-10-batches-bin/test_batch.bin", len(records)) + padded + bytes(1024)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(body))
    with pytest.raises(DataError, match="more than 64 members"):
        load_dataset("cifar10", train=False, data_dir=tmp_path)


# ---- IDX (Fashion-MNIST) ---------------------------------------------------------------------------------

def idx_bytes(dims: tuple[int, ...], body: bytes = b"") -> bytes:
    return struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body


def write_split(folder: Path, images: bytes, labels: bytes, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pack = gzip.compress if compress else (lambda b: b)
    suffix = ".gz" if compress else ""
    (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(pack(images))
    (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(pack(labels))
    return folder


IDX_CASES = {
    "5x5-images": ((3, 5, 5), 3 * 25, "28 x 28"),
    "0x0-images": ((3, 0, 0), 0, "28 x 28"),
    "no-images": ((0, 28, 28), 0, "no images"),
    "product-wraps-to-0": ((2**31, 2**31, 4), 0, "ECLSNN_MAX_LOAD_BYTES"),  # 2^64 bytes: 0 in int64
    "product-overflows": ((2**32 - 1,) * 3, 0, "ECLSNN_MAX_LOAD_BYTES"),
}


@pytest.mark.parametrize("case", sorted(IDX_CASES))
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_idx_images_of_the_wrong_size_or_absurd_dimensions_are_one_data_error(tmp_path, case, compress):
    dims, nbytes, match = IDX_CASES[case]
    labels = idx_bytes((dims[0] if dims[0] < 2**20 else 3,), b"\x01" * (dims[0] if dims[0] < 2**20 else 3))
    write_split(tmp_path / "d", idx_bytes(dims, b"\x07" * nbytes), labels, compress)
    with pytest.raises(DataError, match=match):
        load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "d")


def test_an_idx_file_beyond_the_load_limit_is_refused_naming_it(tmp_path, monkeypatch):
    write_split(tmp_path / "d", idx_bytes((5, 28, 28), b"\x01" * 3920), idx_bytes((5,), b"\x01" * 5))
    assert len(load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "d")) == 5
    monkeypatch.setenv("ECLSNN_MAX_LOAD_BYTES", "1000")
    with pytest.raises(DataError, match="t10k-images.*1000.*ECLSNN_MAX_LOAD_BYTES"):
        load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "d")


def test_an_idx_gzip_with_more_data_than_its_header_declares_is_refused(tmp_path):
    images = gzip.compress(idx_bytes((2, 28, 28), b"\x01" * 1568)) + gzip.compress(b"\x00" * 100_000)
    write_split(tmp_path / "d", b"", idx_bytes((2,), b"\x01\x02"))
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    with pytest.raises(DataError, match="more data than its header declares"):
        load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "d")


@pytest.mark.parametrize("case", ["5x5", "product-overflows", "bad-magic", "count-mismatch"])
def test_bad_idx_files_at_the_command_line_give_one_line_and_exit_2(tmp_path, capsys, case):
    images = {"5x5": idx_bytes((3, 5, 5), b"\x01" * 75), "product-overflows": idx_bytes((2**32 - 1,) * 3),
              "bad-magic": b"\x00\x00\x0d\x03" + idx_bytes((3, 28, 28), b"\x01" * 2352)[4:],
              "count-mismatch": idx_bytes((2, 28, 28), b"\x01" * 1568)}[case]
    labels = idx_bytes((3,), b"\x01\x02\x03")
    for prefix in ("train", "t10k"):
        folder = write_split(tmp_path / "d", images, labels)
        for kind in ("images-idx3", "labels-idx1"):
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes((folder / f"t10k-{kind}-ubyte.gz").read_bytes())
    argv = ["train", "--data-dir", str(tmp_path / "d"), "--epochs", "1", "--output", str(tmp_path / "runs"),
            "--set", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eclsnn: error:") and err.strip().count("\n") == 0 and "Traceback" not in err, err


# ---- images --------------------------------------------------------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A valid 1 x 1 PNG whose header (IHDR, CRC fixed) claims width x height pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    at = raw.index(b"IHDR")
    raw[at + 4:at + 12] = struct.pack(">II", width, height)
    raw[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(raw[at:at + 17])))
    return bytes(raw)


def jpeg_declaring(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    raw = bytearray(buffer.getvalue())
    at = raw.index(b"\xff\xc0")
    raw[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def image_tree(root: Path, name: str, data: bytes) -> Path:
    for split in ("train", "val"):
        (root / split / "n01").mkdir(parents=True, exist_ok=True)
        (root / split / "n01" / name).write_bytes(data)
    return root


def hide_torchvision(monkeypatch):
    for module in ("torchvision", "torchvision.io"):
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_an_image_declaring_billions_of_pixels_is_refused_naming_pillows_limit(tmp_path, monkeypatch, kind):
    pytest.importorskip("PIL")
    hide_torchvision(monkeypatch)
    data = png_declaring(60_000, 60_000) if kind == "png" else jpeg_declaring(60_000, 60_000)
    assert len(data) < 1000  # a 10.8 GB image in under a kilobyte
    dataset = load_dataset("imagenet", train=False, data_dir=image_tree(tmp_path, f"x.{kind}", data))
    with pytest.raises(DataError, match=r"x\.\w+: .*3600000000 pixels.*MAX_IMAGE_PIXELS.*ECLSNN_MAX_IMAGE_PIXELS"):
        dataset.decode(0)


def test_the_image_size_is_checked_before_torchvision_decodes(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    import types

    calls = []
    fake = types.ModuleType("torchvision")
    fake.io = types.ModuleType("torchvision.io")
    fake.io.ImageReadMode = types.SimpleNamespace(RGB="RGB")
    fake.io.read_file = lambda path: calls.append(("read_file", path)) or torch.zeros(1, dtype=torch.uint8)
    fake.io.decode_image = lambda data, mode: calls.append(("decode_image",)) or torch.zeros(3, 2, 2, dtype=torch.uint8)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.io", fake.io)
    root = image_tree(tmp_path, "x.png", png_declaring(60_000, 60_000))
    dataset = load_dataset("imagenet", train=False, data_dir=root)
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS"):
        dataset.decode(0)
    assert calls == []  # torchvision never saw the file


def test_the_pixel_limit_is_raised_by_an_environment_variable(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from PIL import Image

    hide_torchvision(monkeypatch)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    dataset = load_dataset("imagenet", train=False, data_dir=image_tree(tmp_path, "x.png", buffer.getvalue()))
    assert dataset.decode(0).shape == (3, 4, 4)
    monkeypatch.setenv("ECLSNN_MAX_IMAGE_PIXELS", "2")  # Pillow refuses more than twice it: 16 > 4
    with pytest.raises(DataError, match="16 pixels.*ECLSNN_MAX_IMAGE_PIXELS"):
        dataset.decode(0)


def test_a_torchvision_that_fails_at_import_falls_back_to_pillow_with_one_warning(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    fake = tmp_path / "fake-site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (fake / "io.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "fake-site"))
    for module in ("torchvision", "torchvision.io"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    import eclsnn.data.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "_BROKEN_IMPORTS", set(), raising=False)
    root = image_tree(tmp_path / "imgs", "x.png", png_declaring(1, 1))
    with pytest.warns(UserWarning, match=r"torchvision.*RuntimeError.*nms.*Pillow") as record:
        val = load_dataset("imagenet", train=False, data_dir=root)
        train = load_dataset("imagenet", train=True, data_dir=root)
    assert len(record) == 1
    assert val._decode is imagefolder._decode_pil and train._decode is imagefolder._decode_pil
    assert val[0][0].shape == (3, 224, 224)


# ---- sizes read from data -------------------------------------------------------------------------------

def test_a_label_of_2_to_the_40_does_not_become_the_number_of_classes():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="100000 classes"):
        infer_info_from_tensors(images, torch.tensor([0, 2**40]))
    with pytest.raises(DataError, match="negative"):
        infer_info_from_tensors(images, torch.tensor([0, -1]))
    assert infer_info_from_tensors(images, torch.tensor([0, 4])).num_classes == 5


def test_an_image_folder_with_more_classes_than_the_limit_is_refused(tmp_path, monkeypatch):
    import eclsnn.limits as limits

    monkeypatch.setattr(limits, "MAX_NUM_CLASSES", 3)
    hide_torchvision(monkeypatch)
    for k in range(4):
        (tmp_path / "val" / f"n{k}").mkdir(parents=True)
    with pytest.raises(DataError, match="4 class folders.*at most 3"):
        load_dataset("imagenet", train=False, data_dir=tmp_path)


# ---- memory: the bombs in a subprocess limited to its size after the imports + 512 MiB ------------------

def _gzip_bomb(path: Path, header: bytes, gigabytes: float) -> None:
    block = gzip.compress(b"\x00" * 2**26, compresslevel=9)  # 64 MiB of zeros in ~65 kB; members concatenate
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        for _ in range(int(gigabytes * 2**30 / 2**26)):
            f.write(block)


RUNNER = textwrap.dedent("""
    import json, os, resource, sys, warnings
    import torch
    torch.set_num_threads(1)
    from eclsnn.data import load_dataset
    from eclsnn.errors import EclsnnError
    import PIL.Image  # imported before the limit, like every library the readers use
    cases = json.loads(sys.argv[1])
    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    base = vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + %d, resource.RLIM_INFINITY))
    results = {}
    for name, (dataset, folder) in cases.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dataset == "nir":
                    from eclsnn.io.nir import read_nir
                    read_nir(folder)
                else:
                    data = load_dataset(dataset, train=False, data_dir=folder)
                    if dataset == "imagenet":
                        data[0]  # decoded, resized and cropped for evaluation
            results[name] = "loaded"
        except EclsnnError as err:
            results[name] = type(err).__name__ + ": " + str(err)
        except BaseException as err:
            results[name] = type(err).__name__ + ": " + str(err)[:200]
    results["_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["_baseline_vm_mib"] = base / 2**20
    print(json.dumps(results))
""" % HEADROOM)


def _nir_with_a_huge_string(path: Path) -> Path | None:
    """A NIR file of a small network, its first edge's string descriptor (4-byte length first) edited."""
    try:
        import h5py
        import nir
    except ImportError:
        return None
    import eclsnn

    model = torch.nn.Sequential(torch.nn.Linear(4, 5), eclsnn.ThresholdClip(levels=4), torch.nn.Linear(5, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what NIR cannot say about the neurons: irrelevant here
        nir.write(path, eclsnn.to_nir(eclsnn.convert(model), torch.zeros(1, 4), neurons="if"))
    with h5py.File(path, "r") as f:
        offset = f["node/edges"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", 2**32 - 65535))
    return path


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("bombs")
    cases = {}
    # IDX: a legitimate header (10 000 images) followed by 6.6 GB of zeros, 6.5 MB compressed
    folder = write_split(root / "idx-gzip-bomb", b"", idx_bytes((10_000,), b"\x01" * 10_000))
    _gzip_bomb(folder / "t10k-images-idx3-ubyte.gz", idx_bytes((10_000, 28, 28)), 6.6)
    cases["idx-gzip-bomb"] = ("fashion-mnist", str(folder))
    # IDX: a header declaring 3.2 GB (within the default load limit) in a 60 byte file
    folder = write_split(root / "idx-declares-3GB", idx_bytes((4_000_000, 28, 28)), idx_bytes((4_000_000,)))
    cases["idx-declares-3GB"] = ("fashion-mnist", str(folder))
    # CIFAR: 257 bytes declaring 10^6 unfilled images (3 GB)
    folder = root / "cifar-unfilled" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(batch(_reconstruct((1_000_000, 3072), _dtype()),
                                              _reconstruct((1_000_000,), _dtype(b"i8"))))
    cases["cifar-unfilled-3GB"] = ("cifar10", str(folder.parent))
    folder = root / "cifar-strides" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(batch(_ndarray_call((1_000_000, 3072), _dtype(), b"\x00", (0, 0)),
                                              _ndarray_call((1_000_000,), _dtype(b"i8"), b"\x00" * 8, (0,))))
    cases["cifar-zero-strides-3GB"] = ("cifar10", str(folder.parent))
    # CIFAR archive: 66 bytes whose GNU long-name header declares an 8 GiB name (tarfile reads it whole)
    folder = root / "cifar-longname"
    folder.mkdir()
    (folder / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(_tar_header("././@LongLink", 8 * 2**30 - 1, b"L")))
    cases["cifar-tar-longname-8GB"] = ("cifar10", str(folder))
    # PNG: 69 bytes declaring 32 000 x 32 000 pixels (3 GB decoded); JPEG likewise
    for kind, data in (("png", png_declaring(32_000, 32_000)), ("jpeg", jpeg_declaring(32_000, 32_000))):
        cases[f"{kind}-3GB"] = ("imagenet", str(image_tree(root / kind, f"x.{kind}", data)))
    # PNG: a real 1 x 10 000 image (10 000 pixels), resized to 256 x 2 560 000 before its centre crop (7.8 GB
    # as floats)
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 10_000)).save(buffer, format="PNG")
    cases["png-1x10000-resized"] = ("imagenet", str(image_tree(root / "thin", "x.png", buffer.getvalue())))
    # NIR: a variable-length string of the graph's edges whose length field says 2^32 - 65535 bytes
    nir_path = _nir_with_a_huge_string(root / "huge-string.nir")
    if nir_path is not None:
        cases["nir-string-4GB"] = ("nir", str(nir_path))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1",
           "HOME": str(root), "XDG_CACHE_HOME": str(root / "cache")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"hostile data files: peak RSS {results['_peak_rss_mib']:.0f} MiB "
          f"(address space after imports {results['_baseline_vm_mib']:.0f} MiB + 512 MiB allowed)")
    return results


@pytest.mark.parametrize("case,match", [
    ("idx-gzip-bomb", "more data than its header declares"),
    ("idx-declares-3GB", "truncated"),
    ("cifar-unfilled-3GB", "CIFAR"),
    ("cifar-zero-strides-3GB", "CIFAR"),
    ("cifar-tar-longname-8GB", "ECLSNN_MAX_LOAD_BYTES"),
    ("png-3GB", "MAX_IMAGE_PIXELS"),
    ("jpeg-3GB", "MAX_IMAGE_PIXELS"),
    ("png-1x10000-resized", "aspect ratio"),
    ("nir-string-4GB", "declares a string"),
])
def test_decompression_bombs_fail_within_512_mib(bomb_results, case, match):
    if case not in bomb_results:
        pytest.skip("nir or h5py is not installed")
    outcome = bomb_results[case]
    expected = "ConversionError" if case.startswith("nir") else "DataError"
    assert outcome.startswith(expected) and match in outcome, outcome
