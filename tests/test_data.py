"""Tests of the data layer: finding and parsing the data sets, splits, and reproducible batching."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eclsnn.data.cifar as cifar_mod
import eclsnn.data.fashion_mnist as fmnist_mod
import eclsnn.data.imagefolder as imagefolder_mod
from eclsnn.data import (
    DATASETS,
    BatchLoader,
    DatasetInfo,
    ImageFolderDataset,
    ImageTensors,
    infer_info_from_tensors,
    load_dataset,
    normalize,
    split_train_val,
)
from eclsnn.data.cifar import safe_unpickle
from eclsnn.data.download import download_file
from eclsnn.data.imagefolder import find_decoder
from eclsnn.errors import DataError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_system_fmnist = pytest.mark.skipif(
    not (SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No user configuration leaks in: no $ECLSNN_DATA, an empty download cache."""
    monkeypatch.delenv("ECLSNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# ==================================================================================================
# Fashion-MNIST
# ==================================================================================================

def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array in LeCun's IDX format (optionally gzipped)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_tiny_fmnist(folder: Path, n: int, seed: int, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tiny IDX files for both splits; returns the test split's (images, labels)."""
    rng = np.random.default_rng(seed)
    out = None
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        out = (images, labels)
    return out


@needs_system_fmnist
def test_fmnist_real_default_search_finds_system_package():
    train = load_dataset("fashion-mnist", train=True)
    test = load_dataset("fashion-mnist", train=False)
    assert isinstance(train, ImageTensors) and train.info is DATASETS["fashion-mnist"]
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and len(test) == 10000
    assert train.labels.dtype == torch.int64 and train.labels.shape == (60000,)
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels, minlength=10), torch.full((10,), 1000))
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


@needs_system_fmnist
def test_fmnist_real_via_data_dir_torchvision_layout_and_env(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")
    reference = load_dataset("fashion-mnist", train=False, data_dir=SYSTEM_FMNIST)
    assert reference.images.shape == (10000, 1, 28, 28)

    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(SYSTEM_FMNIST / name)
    via_torchvision = load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "tv")
    assert torch.equal(via_torchvision.images, reference.images)
    assert torch.equal(via_torchvision.labels, reference.labels)

    # $ECLSNN_DATA with the <root>/fashion-mnist layout and uncompressed files.
    plain = tmp_path / "env" / "fashion-mnist"
    plain.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (plain / name).write_bytes(gzip.decompress((SYSTEM_FMNIST / f"{name}.gz").read_bytes()))
    monkeypatch.setenv("ECLSNN_DATA", str(tmp_path / "env"))
    via_env = load_dataset("fashion-mnist", train=False)
    assert torch.equal(via_env.images, reference.images)
    assert torch.equal(via_env.labels, reference.labels)


def test_fmnist_data_dir_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")
    expected, expected_labels = write_tiny_fmnist(tmp_path / "explicit", n=5, seed=1)
    write_tiny_fmnist(tmp_path / "env", n=7, seed=2)
    monkeypatch.setenv("ECLSNN_DATA", str(tmp_path / "env"))
    data = load_dataset("fashion-mnist", train=False, data_dir=tmp_path / "explicit")
    assert torch.equal(data.images[:, 0], torch.from_numpy(expected))
    assert torch.equal(data.labels, torch.from_numpy(expected_labels).long())
    assert len(load_dataset("fashion-mnist", train=False)) == 7  # without data_dir: the env folder


def test_fmnist_missing_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", train=True, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "ECLSNN_DATA" in message and "--download" in message
    assert str(tmp_path / "empty") in message and str(tmp_path / "no-system") in message


@pytest.mark.parametrize("damage", ["truncated", "bad-magic", "bad-gzip", "count-mismatch", "bad-label"])
def test_fmnist_corrupt_files_raise_data_error(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")
    folder = tmp_path / "d"
    write_tiny_fmnist(folder, n=4, seed=0)
    images = folder / "t10k-images-idx3-ubyte.gz"
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "truncated":
        images.write_bytes(gzip.compress(raw[:-10]))
    elif damage == "bad-magic":
        images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))
    elif damage == "bad-gzip":
        images.write_bytes(images.read_bytes()[:30])
    elif damage == "count-mismatch":
        write_idx(labels, np.zeros(3, dtype=np.uint8))
    elif damage == "bad-label":
        write_idx(labels, np.array([0, 1, 2, 10], dtype=np.uint8))
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", train=False, data_dir=folder)


def test_fmnist_download_path_with_local_url(tmp_path, monkeypatch):
    """The download code path end to end, from a file:// "host" (no network in tests)."""
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIR", tmp_path / "no-system")
    host = tmp_path / "host"
    images, labels = write_tiny_fmnist(host, n=3, seed=5)
    monkeypatch.setattr(fmnist_mod, "URL", host.as_uri() + "/")
    monkeypatch.setattr(fmnist_mod, "MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in host.iterdir()})
    target = tmp_path / "target"
    with pytest.raises(DataError):  # nothing is fetched unless asked
        load_dataset("fashion-mnist", train=False, data_dir=target)
    data = load_dataset("fashion-mnist", train=False, data_dir=target, download=True)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert (target / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert not any(p.name.endswith(".part") for p in (target / "fashion-mnist").iterdir())


def test_download_file_checks_md5_and_leaves_nothing_behind(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload" * 100)
    good = hashlib.md5(source.read_bytes()).hexdigest()
    out = download_file(source.as_uri(), tmp_path / "dl" / "file.bin", good)
    assert out.read_bytes() == source.read_bytes()
    with pytest.raises(DataError, match="MD5"):
        download_file(source.as_uri(), tmp_path / "dl" / "bad.bin", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["file.bin"]
    with pytest.raises(DataError, match="could not download"):
        download_file((tmp_path / "absent").as_uri(), tmp_path / "dl" / "absent.bin", None)


# ==================================================================================================
# CIFAR: tiny files in the official formats
# ==================================================================================================

def _p2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _p2_str(data: bytes) -> bytes:
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data


def _p2_value(value) -> bytes:
    if isinstance(value, np.ndarray):  # exactly what numpy under Python 2's cPickle wrote
        dtype = (b"cnumpy\ndtype\n" + _p2_str(b"u1") + _p2_int(0) + _p2_int(1) + b"\x87R"
                 + b"(" + _p2_int(3) + _p2_str(b"|") + b"NNN" + _p2_int(-1) + _p2_int(-1) + _p2_int(0) + b"tb")
        shape = b"(" + b"".join(_p2_int(d) for d in value.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _p2_int(0) + b"\x85"
                + _p2_str(b"b") + b"\x87R" + b"(" + _p2_int(1) + shape + dtype + b"\x89"
                + _p2_str(value.astype(np.uint8).tobytes()) + b"tb")
    if isinstance(value, list):
        return b"](" + b"".join(_p2_value(v) for v in value) + b"e"
    if isinstance(value, bytes):
        return _p2_str(value)
    return _p2_int(int(value))


def python2_pickle(mapping: dict[bytes, object]) -> bytes:
    """A protocol-2 pickle with Python 2 byte strings, like the official CIFAR python-version files."""
    items = b"".join(_p2_str(k) + _p2_value(v) for k, v in mapping.items())
    return b"\x80\x02}(" + items + b"u."


def _random_batch(rng, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, num_classes, size=n)


def make_cifar_members(name: str, kind: str, seed: int = 0):
    """(folder, {member: bytes}, expected train (rows, labels), expected test (rows, labels))."""
    rng = np.random.default_rng(seed)
    layout = {lay.kind: lay for lay in cifar_mod.LAYOUTS[name]}[kind]
    num_classes = DATASETS[name].num_classes
    members: dict[str, bytes] = {}
    expected = {}
    for split, names in (("train", layout.train_members), ("test", layout.test_members)):
        rows_all, labels_all = [], []
        for i, member in enumerate(names):
            rows, labels = _random_batch(rng, n=2 + i % 2, num_classes=num_classes)
            rows_all.append(rows)
            labels_all.append(labels)
            if kind == "binary":
                header = labels[:, None].astype(np.uint8)
                if name == "cifar100":  # coarse label first, then the fine label we want
                    header = np.concatenate([rng.integers(0, 20, size=(len(labels), 1)).astype(np.uint8), header], 1)
                members[member] = np.concatenate([header, rows], axis=1).tobytes()
            elif name == "cifar10":
                members[member] = python2_pickle({
                    b"batch_label": b"training batch %d of 5" % (i + 1), b"labels": labels.tolist(),
                    b"data": rows, b"filenames": [b"img_%d.png" % j for j in range(len(rows))]})
            else:
                members[member] = python2_pickle({
                    b"filenames": [b"x.png"] * len(rows), b"batch_label": split.encode(),
                    b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": rows})
        expected[split] = (np.concatenate(rows_all), np.concatenate(labels_all))
    if kind == "python" and name == "cifar10":
        members["batches.meta"] = python2_pickle({b"num_cases_per_batch": 10000,
                                                  b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    elif kind == "python":
        members["meta"] = python2_pickle({b"fine_label_names": [b"apple"] * 100,
                                          b"coarse_label_names": [b"fruit"] * 20})
    else:
        members["batches.meta.txt" if name == "cifar10" else "fine_label_names.txt"] = b"airplane\n"
    return layout, members, expected["train"], expected["test"]


def write_members(layout, members: dict[str, bytes], root: Path, packaging: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if packaging == "folder":
        for member, data in members.items():
            (root / layout.folder).mkdir(exist_ok=True)
            (root / layout.folder / member).write_bytes(data)
        return root / layout.folder
    with tarfile.open(root / layout.archive, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(f"{layout.folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root / layout.archive


@pytest.mark.parametrize("packaging", ["folder", "archive"])
@pytest.mark.parametrize("kind", ["python", "binary"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, name, kind, packaging):
    layout, members, (train_rows, train_labels), (test_rows, test_labels) = make_cifar_members(name, kind)
    write_members(layout, members, tmp_path, packaging)
    for train, rows, labels in ((True, train_rows, train_labels), (False, test_rows, test_labels)):
        data = load_dataset(name, train=train, data_dir=tmp_path)
        assert isinstance(data, ImageTensors) and data.info is DATASETS[name]
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(rows), 3, 32, 32)
        assert torch.equal(data.labels, torch.from_numpy(labels).long())
        # CHW: row = 1024 red values, then green, then blue, each plane row-major.
        assert int(data.images[1, 2, 5, 7]) == int(rows[1, 2 * 1024 + 5 * 32 + 7])
        assert torch.equal(data.images.reshape(len(rows), -1), torch.from_numpy(rows))


def test_cifar_found_in_named_subfolder_of_env(tmp_path, monkeypatch):
    layout, members, (rows, _), _ = make_cifar_members("cifar10", "binary")
    write_members(layout, members, tmp_path / "data" / "cifar10", "archive")
    monkeypatch.setenv("ECLSNN_DATA", str(tmp_path / "data"))
    assert len(load_dataset("CIFAR-10", train=True)) == len(rows)


def test_cifar_python3_pickle_with_str_keys_also_loads(tmp_path):
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = pickle.dumps({"data": rows, "labels": [3, 4]}, protocol=4)
    assert safe_unpickle(batch, "x")["labels"] == [3, 4]
    np.testing.assert_array_equal(safe_unpickle(batch, "x")["data"], rows)


def test_cifar_missing_says_how_to_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", train=True, data_dir=tmp_path)
    message = str(info.value)
    assert "cifar-100-python.tar.gz" in message and "--data-dir" in message and "--download" in message


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_RunsShell, _OpensFile])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    evil = pickle.dumps({"data": payload(marker), "labels": []}, protocol=protocol)
    (folder / "data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match=r"refusing to unpickle \w+\.(system|open)"):
        load_dataset("cifar10", train=True, data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_archive_link_members_are_refused(tmp_path):
    layout, members, _, _ = make_cifar_members("cifar10", "binary")
    with tarfile.open(tmp_path / layout.archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{layout.folder}/data_batch_1.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset("cifar10", train=True, data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncated-record", "missing-member", "bad-label", "not-a-tar", "cut-archive"])
def test_cifar_damaged_inputs_raise_data_error(tmp_path, damage):
    layout, members, _, _ = make_cifar_members("cifar10", "binary")
    if damage == "truncated-record":
        members["data_batch_3.bin"] = members["data_batch_3.bin"][:-1]
    elif damage == "missing-member":
        del members["data_batch_5.bin"]
    elif damage == "bad-label":
        members["data_batch_2.bin"] = b"\x0b" + members["data_batch_2.bin"][1:]
    path = write_members(layout, members, tmp_path, "archive")
    if damage == "not-a-tar":
        path.write_bytes(b"this is not an archive")
    elif damage == "cut-archive":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError):
        load_dataset("cifar10", train=True, data_dir=tmp_path)


def test_cifar_download_path_with_local_url(tmp_path, monkeypatch):
    layout, members, (rows, _), _ = make_cifar_members("cifar10", "binary")
    write_members(layout, members, tmp_path / "host", "archive")
    monkeypatch.setattr(cifar_mod, "URL", (tmp_path / "host").as_uri() + "/")
    monkeypatch.setitem(cifar_mod.LAYOUTS, "cifar10",
                        (dataclasses.replace(layout, md5=None),) + cifar_mod.LAYOUTS["cifar10"][1:])
    data = load_dataset("cifar10", train=True, download=True)  # no data_dir: into the cache
    assert len(data) == len(rows)
    assert (tmp_path / "xdg-cache" / "eclsnn" / layout.archive).is_file()


# ==================================================================================================
# ImageNet-style folders
# ==================================================================================================

def write_image_tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """train/ and val/ with two classes; val images are solid colours saved as lossless PNG."""
    from PIL import Image

    colours = {"n01": (200, 10, 30), "n02": (5, 120, 250)}
    for split in ("train", "val"):
        for k, (wnid, colour) in enumerate(colours.items()):
            (root / split / wnid).mkdir(parents=True)
            for i, size in enumerate([(40, 30), (30, 50)]):
                if split == "train":
                    pixels = np.random.default_rng(i + 10 * k).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / split / wnid / f"img{i}.JPEG")
                else:
                    Image.new("RGB", size, colour).save(root / split / wnid / f"img{i}.png")
    return colours


def test_imagenet_folder_without_decoder_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "val" / "n01").mkdir(parents=True)
    for module in ("torchvision", "torchvision.io", "PIL", "PIL.Image"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(DataError, match=r"pip install eclsnn\[vision\]"):
        load_dataset("imagenet", train=False, data_dir=tmp_path)


def test_imagenet_folder_missing_explains_layout(tmp_path):
    with pytest.raises(DataError, match="image-net.org"):
        load_dataset("imagenet", train=True, data_dir=tmp_path)


@pytest.mark.parametrize("decoder", [
    pytest.param("torchvision", marks=pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None or find_decoder() is not imagefolder_mod._decode_torchvision,
        reason="torchvision is not installed, or its image operators do not load with this torch; the Pillow case runs")),
    "pillow",  # (Pillow comes with matplotlib, a test dependency; write_image_tree needs it too)
])
def test_imagenet_folder_dataset_and_loader(tmp_path, monkeypatch, decoder):
    if decoder == "pillow":  # where torchvision is installed it would be chosen: hide it
        for module in ("torchvision", "torchvision.io"):
            monkeypatch.setitem(sys.modules, module, None)
    expected_decoder = imagefolder_mod._decode_torchvision if decoder == "torchvision" else imagefolder_mod._decode_pil
    assert find_decoder() is expected_decoder
    colours = write_image_tree(tmp_path)
    val = load_dataset("imagenet", train=False, data_dir=tmp_path)
    assert val._decode is expected_decoder
    assert isinstance(val, ImageFolderDataset) and len(val) == 4
    assert val.classes == ["n01", "n02"] and val.info.num_classes == 2
    assert val.labels.tolist() == [0, 0, 1, 1]
    image, label = val[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and label == 1
    # Resizing and cropping a solid colour gives the same solid colour.
    assert torch.equal(image, torch.tensor(colours["n02"], dtype=torch.uint8)[:, None, None].expand(3, 224, 224))

    train = load_dataset("imagenet", train=True, data_dir=tmp_path)
    train.num_workers = 0
    loader = BatchLoader(train, batch_size=3, shuffle=True, augment=True, seed=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    x, y = batches[0]
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = list(BatchLoader(train, batch_size=3, shuffle=True, augment=True, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    train.num_workers = 2  # per-sample seeds: the same crops whichever process decodes them
    in_workers = list(BatchLoader(train, batch_size=3, shuffle=True, augment=True, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, in_workers))
    eval_x, _ = next(iter(BatchLoader(val, batch_size=4)))
    expected = normalize(torch.stack([val[i][0] for i in range(4)]), val.info)
    assert torch.allclose(eval_x, expected)


def test_importing_data_does_not_import_image_libraries():
    code = "import sys, eclsnn.data; print('torchvision' in sys.modules or 'PIL' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ==================================================================================================
# Names, infos, splits
# ==================================================================================================

def test_dataset_registry():
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "imagenet"}
    assert [DATASETS[k].image_size for k in DATASETS] == [28, 32, 32, 224]
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["fashion-mnist"].channels == 1
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist-but-wrong", train=True)
    with pytest.raises(DataError):
        DatasetInfo("x", 10, 3, 32, (0.5,), (0.5, 0.5, 0.5), 4, True)


def test_infer_info_from_tensors():
    images = torch.full((4, 2, 5, 5), 51, dtype=torch.uint8)
    info = infer_info_from_tensors(images, torch.tensor([0, 2, 1, 2]))
    assert info.num_classes == 3 and info.channels == 2 and info.image_size == 5
    assert info.mean == pytest.approx((0.2, 0.2)) and not info.hflip and info.crop_padding == 0


def test_split_train_val():
    train, val = split_train_val(1000, 0.1, seed=7)
    assert len(val) == 100 and len(train) == 900
    assert train.dtype == torch.int64 and val.dtype == torch.int64
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    again_train, again_val = split_train_val(1000, 0.1, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_train_val(1000, 0.1, seed=8)[1])
    assert len(split_train_val(10, 0.0, seed=0)[1]) == 0
    assert len(split_train_val(10, 0.01, seed=0)[1]) == 1
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError):
            split_train_val(10, bad, seed=0)


# ==================================================================================================
# BatchLoader
# ==================================================================================================

def tensors(n: int, channels: int = 3, side: int = 8, info: DatasetInfo | None = None, seed: int = 0) -> ImageTensors:
    """Random images whose label is their own index, so batches reveal which samples they hold."""
    info = info or DATASETS["cifar10"]
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8)
    return ImageTensors(images=images, labels=torch.arange(n), info=info)


def collect(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_normalises_without_augmentation_in_order():
    data = tensors(10)
    loader = BatchLoader(data, batch_size=4)
    batches = collect(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    mean = torch.tensor(data.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.info.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (data.images[:4].float() / 255 - mean) / std, atol=1e-6)


def test_loader_drop_last_and_len():
    data = tensors(10)
    loader = BatchLoader(data, batch_size=4, drop_last=True)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [4, 4]
    assert len(BatchLoader(data, batch_size=4, world_size=3, rank=2)) == 1  # ceil(10/3)=4 per rank
    with pytest.raises(DataError, match="no full batch"):
        BatchLoader(data, batch_size=11, drop_last=True)


def test_loader_empty_and_bad_arguments():
    data = tensors(5)
    with pytest.raises(DataError, match="empty"):
        BatchLoader(data, indices=torch.tensor([], dtype=torch.int64))
    with pytest.raises(DataError, match="empty"):
        BatchLoader(ImageTensors(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                                 DATASETS["cifar10"]))
    with pytest.raises(DataError):
        BatchLoader(data, indices=torch.tensor([0, 5]))
    with pytest.raises(DataError):
        BatchLoader(data, rank=2, world_size=2)


def test_loader_order_depends_only_on_seed_and_epoch():
    data = tensors(50)
    def order(seed: int, epoch: int) -> torch.Tensor:
        loader = BatchLoader(data, batch_size=8, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])
    assert torch.equal(order(1, 0), order(1, 0))
    assert torch.equal(order(1, 0).sort().values, torch.arange(50))
    assert not torch.equal(order(1, 0), order(1, 1))
    assert not torch.equal(order(1, 0), order(2, 0))


def test_loader_indices_subset_and_progress_bar():
    data = tensors(20)
    subset = torch.tensor([3, 5, 7, 11])
    ys = torch.cat([y for _, y in BatchLoader(data, indices=subset, batch_size=3, shuffle=True, progress="val")])
    assert sorted(ys.tolist()) == [3, 5, 7, 11]


def test_loader_ddp_shards_union_equals_single_process_batch():
    data = tensors(96)
    world, per_rank = 4, 3
    single = collect(BatchLoader(data, batch_size=world * per_rank, shuffle=True, augment=False, seed=5))
    ranks = [collect(BatchLoader(data, batch_size=per_rank, shuffle=True, seed=5, rank=r, world_size=world))
             for r in range(world)]
    assert all(len(r) == len(single) == 8 for r in ranks)
    for k, (x_single, y_single) in enumerate(single):
        y_union = torch.cat([ranks[r][k][1] for r in range(world)])
        x_union = torch.cat([ranks[r][k][0] for r in range(world)])
        order = y_union.argsort()
        assert torch.equal(y_union[order], y_single.sort().values)
        assert torch.equal(x_union[order], x_single[y_single.argsort()])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 4), per_rank=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_loader_ddp_sharding_property(n, world, per_rank, seed):
    data = tensors(n, channels=1, side=2, info=DATASETS["fashion-mnist"])
    single = [y for _, y in BatchLoader(data, batch_size=world * per_rank, shuffle=True, seed=seed)]
    ranks = [[y for _, y in BatchLoader(data, batch_size=per_rank, shuffle=True, seed=seed, rank=r, world_size=world)]
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1                      # every rank takes as many steps
    assert set(torch.cat([torch.cat(r) for r in ranks]).tolist()) == set(range(n))  # nothing is lost
    for k in range(n // (world * per_rank)):                       # every full batch matches exactly
        assert torch.equal(torch.cat([r[k] for r in ranks]).sort().values, single[k].sort().values)


def test_augmentation_is_a_padded_crop_and_reproducible():
    info = dataclasses.replace(DATASETS["cifar10"], hflip=False)
    data = tensors(32, info=info)
    plain = collect(BatchLoader(data, batch_size=16))
    aug = collect(BatchLoader(data, batch_size=16, augment=True, seed=4))
    assert collect(BatchLoader(data, batch_size=16, augment=True, seed=4))[0][0].equal(aug[0][0])
    assert not collect(BatchLoader(data, batch_size=16, augment=True, seed=9))[0][0].equal(aug[0][0])
    x = torch.cat([b[0] for b in aug])
    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32
    assert not torch.equal(x, torch.cat([b[0] for b in plain]))
    # Every augmented image is one window of the zero-padded original (pad 4 -> 9 x 9 positions).
    raw = torch.round((x * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)) * 255)
    padded = torch.nn.functional.pad(data.images.float(), (4, 4, 4, 4))
    for i in range(32):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(raw[i], w) for w in windows)


def test_augmentation_flips_about_half_and_changes_with_epoch():
    info = dataclasses.replace(DATASETS["cifar10"], crop_padding=0)
    data = tensors(200, info=info)
    loader = BatchLoader(data, batch_size=200, augment=True, seed=1)
    x = next(iter(loader))[0]
    plain = normalize(data.images, info)
    same = (x == plain).flatten(1).all(1)
    flipped = (x == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 60 < int(flipped.sum()) < 140
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x)


def test_augmentation_on_fashion_mnist_info_keeps_shape():
    data = tensors(8, channels=1, side=28, info=DATASETS["fashion-mnist"])
    x, y = next(iter(BatchLoader(data, batch_size=8, augment=True)))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)


def test_image_tensors_validation():
    with pytest.raises(DataError):
        ImageTensors(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), DATASETS["cifar10"])
    with pytest.raises(DataError):
        ImageTensors(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                     DATASETS["cifar10"])
    with pytest.raises(DataError):
        ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                     DATASETS["cifar10"])
