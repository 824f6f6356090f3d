"""A fuzz pass over every file reader (issue #14): IDX files, CIFAR batches (pickles, records, archives), image
folders, safetensors checkpoints, meta.json, snn.json, NIR graphs and files, TOML configs. Each example is a
valid file damaged by a few random edits (bytes flipped, set, cut, inserted; 32-bit fields set to extremes) or
a valid structure with one field replaced by a random value. Whatever it is, the reader must load it or raise
eclsnn's own error — never another exception — and must not take much memory: the process's peak resident
size may not grow by more than 512 MiB in one example.

Profiles: ``fuzz-ci`` (the default; derandomized, 2020 examples, ~10 s in all) and ``fuzz-long``
(``ECLSNN_FUZZ=long``: 50 times as many, random): ``ECLSNN_FUZZ=long pytest tests/test_fuzz_readers.py``.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import resource
import shutil
import struct
import tarfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eclsnn
from eclsnn.config import load_config
from eclsnn.data import load_dataset
from eclsnn.data.cifar import parse_binary_batch, parse_python_batch
from eclsnn.data.fashion_mnist import read_idx
from eclsnn.errors import EclsnnError
from eclsnn.io.nir import read_nir
from eclsnn.io.snn_folder import load_ann, load_snn

from test_hostile_data import ROW, _array, _list, batch, idx_bytes, image_tree, png_declaring

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "main-0.1.0"
LONG = os.environ.get("ECLSNN_FUZZ", "") == "long"
SCALE = 50 if LONG else 1

settings.register_profile("fuzz-ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz-long", settings.get_profile("fuzz-ci"), derandomize=False, database=None)
PROFILE = settings.get_profile("fuzz-long" if LONG else "fuzz-ci")


def fuzz(examples: int):
    """The profile, with ``examples`` examples in CI (SCALE times as many in the long run)."""
    return settings(PROFILE, max_examples=examples * SCALE)


GROWTH = 512 * 2**20


@contextmanager
def bounded_memory():
    """Fail if the peak resident size grows by more than 512 MiB inside the block."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert after - before <= GROWTH, f"peak memory grew by {(after - before) / 2**20:.0f} MiB"


def loads_or_eclsnn_error(read, *args, **kwargs):
    """Call the reader; only success or an EclsnnError may come out (with a message)."""
    with bounded_memory(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(*args, **kwargs)
        except EclsnnError as err:
            assert str(err)
            return None


# ---- damaging bytes ---------------------------------------------------------------------------------

EXTREMES = [0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1]
_edit = st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete", "u32be", "u32le", "u64le"]),
                  st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(EXTREMES),
                  st.binary(min_size=1, max_size=16))


def damage(base: bytes, edits) -> bytes:
    data = bytearray(base)
    for kind, where, byte, extreme, blob in edits:
        at = int(where * max(len(data), 1))
        if kind == "flip" and data:
            data[at] ^= 1 << (byte % 8)
        elif kind == "set" and data:
            data[at] = byte
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "delete":
            del data[at:at + 1 + byte % 16]
        elif kind == "u32be":
            data[at:at + 4] = struct.pack(">I", extreme)
        elif kind == "u32le":
            data[at:at + 4] = struct.pack("<I", extreme)
        else:
            data[at:at + 8] = struct.pack("<Q", extreme * 2**32 + extreme)
    return bytes(data)


def damaged(base: bytes, max_edits: int = 4):
    return st.lists(_edit, min_size=1, max_size=max_edits).map(lambda edits: damage(base, edits))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([2**31, 2**63, 2**64, -1, 0, 10**12, 1e308])
    | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def paths_of(value, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths_of(item, prefix + (i,))


def replaced(document, path, value):
    document = copy.deepcopy(document)
    if not path:
        return value
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def json_edits(document):
    """The document with one of its values (anywhere, the whole included) replaced by a random JSON value."""
    paths = list(paths_of(document))
    return st.tuples(st.sampled_from(paths), json_values).map(lambda pv: replaced(document, *pv))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- IDX ---------------------------------------------------------------------------------------------

IDX_IMAGES = idx_bytes((3, 28, 28), bytes(range(256)) * 9 + bytes(48))


@fuzz(300)
@given(st.booleans(), st.data())
def test_idx_files(work, compress, data):
    raw = data.draw(damaged(gzip.compress(IDX_IMAGES) if compress else IDX_IMAGES))
    path = work / "images-idx3-ubyte"
    path.write_bytes(raw)
    array = loads_or_eclsnn_error(read_idx, path, 3)
    assert array is None or (array.dtype == np.uint8 and array.ndim == 3)


@fuzz(120)
@given(st.data())
def test_idx_decompressed_streams(work, data):
    """Damage under the gzip layer: the header and data, then compressed intact."""
    path = work / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data.draw(damaged(IDX_IMAGES))))
    loads_or_eclsnn_error(read_idx, path, 3)


# ---- CIFAR ---------------------------------------------------------------------------------------------

PICKLE = batch(_array((2, 3072), ROW * 2), _list([3, 9]))


@fuzz(400)
@given(damaged(PICKLE))
def test_cifar_python_batches(raw):
    out = loads_or_eclsnn_error(parse_python_batch, raw, "labels", "data_batch_1", 10)
    if out is not None:
        images, labels = out
        assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels) and images.nbytes <= len(raw)


@fuzz(100)
@given(damaged((b"\x01" + ROW) * 2))
def test_cifar_binary_batches(raw):
    loads_or_eclsnn_error(parse_binary_batch, raw, 1, 0, "data_batch_1.bin")


def _cifar_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("test_batch.bin", "batches.meta.txt"):
            data = (b"\x01" + ROW) * 2 if name.endswith(".bin") else b"airplane\n"
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


ARCHIVE = _cifar_archive()


@fuzz(120)
@given(st.booleans(), st.data())
def test_cifar_archives(work, inner, data):
    """The .tar.gz damaged as it is, or its tar stream damaged and compressed again."""
    raw = gzip.compress(data.draw(damaged(gzip.decompress(ARCHIVE)))) if inner else data.draw(damaged(ARCHIVE))
    folder = work / "cifar"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "cifar-10-binary.tar.gz").write_bytes(raw)
    loads_or_eclsnn_error(load_dataset, "cifar10", train=False, data_dir=folder)


# ---- image folders --------------------------------------------------------------------------------------

def _image(kind: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


@fuzz(200)
@given(st.sampled_from(["PNG", "JPEG"]), st.data())
def test_image_files(work, monkeypatch_module, kind, data):
    pytest.importorskip("PIL")
    raw = data.draw(damaged(_image(kind)))
    folder = work / "images"
    shutil.rmtree(folder, ignore_errors=True)
    dataset = load_dataset("imagenet", train=False, data_dir=image_tree(folder, f"x.{kind.lower()}", raw))
    item = loads_or_eclsnn_error(dataset.__getitem__, 0)  # decoded, resized, cropped
    assert item is None or (item[0].dtype == torch.uint8 and item[0].shape == (3, 224, 224))


@fuzz(40)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_png_headers_declaring_any_size(work, monkeypatch_module, width, height):
    pytest.importorskip("PIL")
    folder = work / "declared"
    shutil.rmtree(folder, ignore_errors=True)
    dataset = load_dataset("imagenet", train=False, data_dir=image_tree(folder, "x.png", png_declaring(width, height)))
    loads_or_eclsnn_error(dataset.__getitem__, 0)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Image folders decode with Pillow here (the decoder torchvision would use is checked the same way), with
    Pillow's limit at 2^22 pixels: within its default one (179 million pixels, twice MAX_IMAGE_PIXELS) Pillow
    itself may take 1.7 GB for a 100-byte PNG of 1 x 128 774 508 pixels (found by the long run: one row
    pointer and one padded row per row), more than the 512 MiB these tests allow."""
    import sys

    patch = pytest.MonkeyPatch()
    for module in ("torchvision", "torchvision.io"):
        patch.setitem(sys.modules, module, None)
    patch.setenv("ECLSNN_MAX_IMAGE_PIXELS", str(2**22))
    yield patch
    patch.undo()


# ---- checkpoints and SNN folders ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(work) -> Path:
    dest = work / "run" / "checkpoints" / "last"
    shutil.copytree(FIXTURE / "run" / "checkpoints" / "last", dest)
    return dest


@pytest.fixture(scope="module")
def snn_folder(work, checkpoint) -> Path:
    folder = work / "snn"
    shutil.copytree(FIXTURE / "snn", folder)
    spec = json.loads((folder / "snn.json").read_text())
    spec["checkpoint"] = str(checkpoint)
    (folder / "snn.json").write_text(json.dumps(spec))
    return folder


@contextmanager
def replaced_file(path: Path, content: bytes):
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        yield
    finally:
        path.write_bytes(original)


MODEL = (FIXTURE / "run" / "checkpoints" / "last" / "model.safetensors").read_bytes()
META = json.loads((FIXTURE / "run" / "checkpoints" / "last" / "meta.json").read_text())
SNN_JSON = json.loads((FIXTURE / "snn" / "snn.json").read_text())


def _header_damage():
    """Damage inside the safetensors header (its first 8 + n bytes), where the sizes are."""
    end = 8 + int.from_bytes(MODEL[:8], "little")
    return st.lists(_edit.map(lambda e: (e[0], e[1] * end / len(MODEL), *e[2:])), min_size=1, max_size=3)


@fuzz(120)
@given(st.one_of(damaged(MODEL), _header_damage().map(lambda edits: damage(MODEL, edits))))
def test_safetensors_checkpoints(checkpoint, raw):
    with replaced_file(checkpoint / "model.safetensors", raw):
        loads_or_eclsnn_error(load_ann, checkpoint)


@fuzz(160)
@given(st.one_of(json_edits(META), damaged(json.dumps(META).encode(), 2).map(lambda b: b.decode("latin-1"))))
def test_meta_json(checkpoint, edited):
    text = edited if isinstance(edited, str) else json.dumps(edited)
    with replaced_file(checkpoint / "meta.json", text.encode("utf-8", "surrogatepass")):
        loads_or_eclsnn_error(load_ann, checkpoint)


@fuzz(80)
@given(json_edits(SNN_JSON))
def test_snn_json(snn_folder, checkpoint, edited):
    if isinstance(edited, dict) and edited.get("checkpoint") == SNN_JSON["checkpoint"]:
        edited["checkpoint"] = str(checkpoint)
    with replaced_file(snn_folder / "snn.json", json.dumps(edited).encode()):
        loads_or_eclsnn_error(load_snn, snn_folder)


# ---- NIR ----------------------------------------------------------------------------------------------------

def _small_graph():
    nir = pytest.importorskip("nir")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), eclsnn.ThresholdClip(levels=4), torch.nn.Linear(5, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nir, eclsnn.to_nir(eclsnn.convert(model, neuron="dual"), torch.zeros(1, 4), neurons="if")


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return array.astype(dtype)


arrays = st.one_of(
    st.builds(lambda shape, dtype, fill: _cast(np.full(shape, fill), dtype),
              st.lists(st.integers(0, 6), max_size=3).map(tuple), st.sampled_from(["f4", "f8", "i4", "u1", "?"]),
              st.floats(-1e6, 1e6) | st.sampled_from([np.nan, np.inf, 0.0])),
    json_values)


@fuzz(120)
@given(st.data())
def test_nir_graphs(data):
    nir, graph = _small_graph()
    node_name = data.draw(st.sampled_from(sorted(graph.nodes)))
    node = graph.nodes[node_name]
    fields = sorted(k for k in vars(node) if not k.startswith("_"))
    field = data.draw(st.sampled_from(fields))
    if field == "metadata":
        node.metadata = data.draw(json_edits(node.metadata))
    else:
        setattr(node, field, data.draw(arrays))
    loads_or_eclsnn_error(eclsnn.from_nir, graph)


@fuzz(60)
@given(st.data())
def test_nir_files(work, data):
    nir, graph = _small_graph()
    path = work / "graph.nir"
    nir.write(path, graph)
    path.write_bytes(data.draw(damaged(path.read_bytes())))
    loads_or_eclsnn_error(read_nir, path)


# ---- TOML configs -----------------------------------------------------------------------------------------

KEYS = {"data": ["dataset", "val_fraction", "data_dir", "batch_size"],
        "model": ["arch", "levels", "init_threshold", "num_classes", "activation"],
        "train": ["epochs", "lr", "batch_size", "seed", "snn_time_steps", "optimizer", "nosuch"],
        "convert": ["neuron", "v_init", "theta_neg", "percentile", "maxpool"],
        "evaluate": ["time_steps", "max_samples"], "nosuch": ["x"]}
toml_scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=8))
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == float("-inf")
                                             else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


@fuzz(200)
@given(st.data())
def test_toml_configs(work, data):
    lines = []
    for section in data.draw(st.lists(st.sampled_from(sorted(KEYS)), max_size=4, unique=True)):
        lines.append(f"[{section}]")
        chosen = data.draw(st.dictionaries(st.sampled_from(KEYS[section]), toml_values, max_size=3))
        lines += [f"{key} = {toml_value(value)}" for key, value in chosen.items()]
    path = work / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    loads_or_eclsnn_error(load_config, path)
