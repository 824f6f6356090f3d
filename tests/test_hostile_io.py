"""Hostile files at the io boundary (issue #14, items 3-6): checkpoints, SNN folders, NIR graphs and
configs that declare absurd sizes, hold values of the wrong type or dtype, nest without end, or lead
checkpoint recovery out of the run folder. Every one ends in an eclsnn error (at the command line: one
line, exit 2), checked before anything large is allocated or read.

The hostile files are small copies of tests/fixtures/main-0.1.0 edited in tmp_path; the "multi-GB" files
are sparse (truncate), and guards make a test fail instead of reading or allocating them."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import eclsnn
from eclsnn.cli import main
from eclsnn.config import load_config, parse_override
from eclsnn.errors import CheckpointError, ConfigError, ConversionError
from eclsnn.io.nir import read_nir
from eclsnn.io.checkpoint import find_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from eclsnn.io.snn_folder import load_ann, load_snn
from eclsnn.recipes.settings import layered_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "main-0.1.0"
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


# ---- helpers -----------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A copy of the fixture's checkpoint, at RUN/checkpoints/last."""
    dest = tmp_path / "run" / "checkpoints" / "last"
    shutil.copytree(FIXTURE / "run" / "checkpoints" / "last", dest)
    return dest


@pytest.fixture
def snn_folder(tmp_path, ckpt) -> Path:
    """A copy of the fixture's SNN folder, pointing at the copied checkpoint."""
    folder = tmp_path / "snn"
    shutil.copytree(FIXTURE / "snn", folder)
    spec = json.loads((folder / "snn.json").read_text())
    spec["checkpoint"] = str(ckpt)
    (folder / "snn.json").write_text(json.dumps(spec))
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    path.write_text(json.dumps(data))


def edit_weights(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def set_field(dotted: str, value):
    def edit(d):
        *parents, key = dotted.split(".")
        for p in parents:
            d = d[p]
        d[key] = value
    return edit


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("eclsnn: error:"), err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


def small_nir(neuron: str = "if", form: str = "exact"):
    pytest.importorskip("nir")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), eclsnn.ThresholdClip(levels=4), nn.Linear(5, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eclsnn.to_nir(eclsnn.convert(model, neuron=neuron), torch.zeros(1, 4), neurons=form)


def no_huge_reads(monkeypatch, limit: int = 2**30) -> None:
    """Make reading a whole file larger than ``limit`` fail the test instead of filling the memory."""
    read_bytes = Path.read_bytes

    def guarded(self):
        if self.stat().st_size > limit:
            pytest.fail(f"{self} ({self.stat().st_size} bytes) was read whole")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", guarded)


# ---- item 3: bounded memory ----------------------------------------------------------------------------

def test_a_sparse_multi_gigabyte_safetensors_is_refused_before_it_is_read(ckpt, monkeypatch):
    size = 5 * 2**30
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    path = ckpt / "model.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + size)  # sparse: no disk space, no memory
    no_huge_reads(monkeypatch)
    with pytest.raises(CheckpointError, match="ECLSNN_MAX_LOAD_BYTES"):
        load_checkpoint(ckpt)


def test_a_safetensors_declaring_more_than_the_file_holds_is_refused_unread(ckpt, monkeypatch):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    path = ckpt / "model.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(2**31)  # sparse 2 GiB, far less than declared
    no_huge_reads(monkeypatch)
    with pytest.raises(CheckpointError, match="declares"):
        load_checkpoint(ckpt)


def test_the_load_limit_is_an_environment_variable(ckpt, monkeypatch):
    monkeypatch.setenv("ECLSNN_MAX_LOAD_BYTES", "100000")  # the fixture's weights are 1.8 MB
    with pytest.raises(CheckpointError, match="more than the 100000 bytes.*ECLSNN_MAX_LOAD_BYTES"):
        load_checkpoint(ckpt)
    monkeypatch.setenv("ECLSNN_MAX_LOAD_BYTES", str(2**30))
    assert load_checkpoint(ckpt).meta["epoch"] == 1


@pytest.mark.parametrize("field", ["model.num_classes", "dataset.num_classes", "model.in_channels"])
def test_sizes_in_meta_json_are_bounded_before_the_model_is_built(ckpt, monkeypatch, field):
    edit_json(ckpt / "meta.json", set_field(field, 2**40))
    monkeypatch.setattr("eclsnn.models.create", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(CheckpointError, match=rf"meta.json.*{field.split('.')[-1]}.*at most"):
        load_ann(ckpt)


@pytest.mark.parametrize("key", ["evaluate.time_steps", "train.snn_time_steps"])
def test_absurd_time_steps_in_a_checkpoint_config_are_a_config_error(ckpt, key):
    config = json.loads((ckpt / "meta.json").read_text())["config"]
    set_field(key, 10**12)(config)
    with pytest.raises(ConfigError, match=rf"{key} must be .*at most 65536"):
        layered_config(None, None, config)


def test_a_nir_file_declaring_huge_weights_is_refused_before_it_is_read(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    import nir

    path = tmp_path / "huge.nir"
    nir.write(path, small_nir())
    with h5py.File(path, "r+") as f:
        del f["node/nodes/0/weight"]
        f.create_dataset("node/nodes/0/weight", shape=(2**20, 2**20), dtype="f4", chunks=(64, 64))  # 4 TiB, unstored
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(nir, "read", lambda *a, **k: pytest.fail("nir.read read the file"))
    with pytest.raises(ConversionError, match="ECLSNN_MAX_LOAD_BYTES"):
        read_nir(path)


def test_a_nir_graph_declaring_huge_weights_is_refused_before_allocating():
    graph = small_nir()
    graph.nodes["2"].weight = np.broadcast_to(np.float32(0.5), (2**24, 2**24))  # a 1 PiB view of one number
    with pytest.raises(ConversionError, match="ECLSNN_MAX_LOAD_BYTES"):
        eclsnn.from_nir(graph)


# ---- item 4: values and dtypes -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32])
def test_weights_stored_as_integers_or_booleans_are_refused(ckpt, dtype):
    edit_weights(ckpt / "model.safetensors", lambda s: s.update({"features.0.weight": s["features.0.weight"].to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"features.0.weight.*{str(dtype).removeprefix('torch.')}"):
        load_ann(ckpt)


def test_weights_stored_in_another_float_precision_still_load(ckpt):
    edit_weights(ckpt / "model.safetensors",
                 lambda s: s.update({"features.0.weight": s["features.0.weight"].to(torch.float16)}))
    model, _ = load_ann(ckpt)
    assert model.features[0].weight.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "fused-cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_lambda_in_a_checkpoint_is_refused_on_every_backend(ckpt, value, backend):
    edit_weights(ckpt / "model.safetensors", lambda s: s["features.6.threshold_raw"].fill_(value))
    try:
        with eclsnn.use_backend(backend):
            eclsnn.simulate(eclsnn.convert(nn.Sequential(nn.Linear(2, 2), eclsnn.ThresholdClip())), torch.ones(1, 2), 1)
    except eclsnn.BackendError:
        pytest.skip(f"backend {backend} cannot run here")
    with eclsnn.use_backend(backend), pytest.raises(CheckpointError, match=r"λ of 'features.6'.*not finite"):
        load_ann(ckpt)


@pytest.mark.parametrize("value", [1e-3, 5e-4, 0.0, -0.25])
def test_a_lambda_at_or_below_the_training_floor_warns(ckpt, value):
    edit_weights(ckpt / "model.safetensors", lambda s: s["features.6.threshold_raw"].fill_(value))
    with pytest.warns(UserWarning, match="'features.6'.*floor") as record:
        model, _ = load_ann(ckpt)
    assert {type(w.message).__name__ for w in record} == {"ThresholdWarning"}
    assert model.features[6].threshold.item() == pytest.approx(1e-3)


def test_per_channel_lambdas_at_the_floor_are_counted_not_blamed_on_the_layer(tmp_path):
    from eclsnn.io.checkpoint import _check_thresholds

    model = nn.Sequential(nn.Conv2d(1, 4, 3), eclsnn.ThresholdClip(levels=4, per_channel=True, num_channels=4))
    with torch.no_grad():
        model[1].threshold_raw.copy_(torch.tensor([2.0, 1e-3, 3.0, 0.0]).view_as(model[1].threshold_raw))
    with pytest.warns(UserWarning, match=r"of 2 of the 4 channels of '1'.*those channels pass") as record:
        _check_thresholds(model, tmp_path)
    assert len(record) == 1


def test_a_lambda_above_the_floor_does_not_warn(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ann(ckpt)


@pytest.mark.parametrize("field,value", [
    ("v_init", 1e30), ("v_init", "abc"), ("theta_neg", "abc"), ("theta_neg", float("-inf")),
    ("theta_neg", -1e30), ("per_channel", "abc"),
])
def test_from_nir_refuses_absurd_neuron_metadata(field, value):
    graph = small_nir(neuron="dual", form="if")
    for node in graph.nodes.values():
        if type(node).__name__ == "IF":
            node.metadata["eclsnn"][field] = value
    with pytest.raises(ConversionError, match=field):
        eclsnn.from_nir(graph)


@pytest.mark.parametrize("theta", [-2.0, 0.0])
def test_from_nir_refuses_a_non_positive_theta_naming_the_node(theta):
    graph = small_nir(form="if")
    graph.nodes["1"].v_threshold = np.full_like(graph.nodes["1"].v_threshold, theta)
    with pytest.raises(ConversionError, match=r"node '1'.*θ"):
        eclsnn.from_nir(graph)


def test_from_nir_warns_when_theta_sits_at_the_training_floor():
    graph = small_nir(form="if")
    graph.nodes["1"].v_threshold = np.full_like(graph.nodes["1"].v_threshold, 1e-3)
    with pytest.warns(UserWarning, match="'1'.*floor") as record:
        eclsnn.from_nir(graph)
    assert {type(w.message).__name__ for w in record} == {"ThresholdWarning"}


def _thetas_edit(value):
    return lambda s: s.update({k: torch.full_like(v, value) for k, v in list(s.items())[:1]})


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"), "not a valid safetensors"),
    (lambda p: edit_weights(p, _thetas_edit(-1.0)), "θ"),
    (lambda p: edit_weights(p, _thetas_edit(float("nan"))), "θ"),
    (lambda p: edit_weights(p, lambda s: s.update({k: v.to(torch.int32) for k, v in s.items()})), "int32"),
], ids=["corrupt", "negative", "nan", "int32"])
def test_a_bad_thresholds_file_of_an_snn_folder_is_a_checkpoint_error(snn_folder, edit, match):
    edit(snn_folder / "thresholds.safetensors")
    with pytest.raises(CheckpointError, match=rf"thresholds.safetensors.*{match}"):
        load_snn(snn_folder)


# ---- item 5: malformed settings and files ----------------------------------------------------------

@pytest.mark.parametrize("seed", [2**32, 2**64, 2**64 + 1])
def test_a_seed_beyond_2_to_the_32_is_a_config_error(seed):
    with pytest.raises(ConfigError, match=r"train.seed must be .*2\^32"):
        load_config(None, {"train.seed": seed})


def test_deeply_nested_toml_is_one_config_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(f"[train]\nepochs = {deep()}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_override(f"train.epochs={deep()}")


@pytest.mark.parametrize("name", ["meta.json", "optimizer.json", "extra.json"])
def test_deeply_nested_json_in_a_checkpoint_is_a_checkpoint_error(ckpt, name):
    (ckpt / name).write_text(deep())
    with pytest.raises(CheckpointError, match=rf"{name}.*nested too deeply"):
        c = load_checkpoint(ckpt)
        c.load_optimizer_state()
        c.load_extra_state()


@pytest.mark.parametrize("field,value", [
    ("model", "cnn-fmnist"), ("model.arch", 5), ("model.num_classes", "10"), ("model.num_classes", 0),
    ("dataset", 5), ("epoch", "one"), ("epoch", -1), ("seed", "x"), ("seed", 2**64), ("config", [1, 2]),
])
def test_meta_json_fields_of_the_wrong_type_are_refused_naming_file_and_field(ckpt, field, value):
    edit_json(ckpt / "meta.json", set_field(field, value))
    with pytest.raises(CheckpointError, match=rf"meta.json.*'{field}'"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("edit,field", [
    (lambda spec: [spec], "a JSON object"), (set_field("checkpoint", 5), "checkpoint"), (set_field("convert", 5), "convert"),
    (set_field("convert", ["if"]), "convert"),
    (set_field("convert.neuron", []), "convert.neuron"), (set_field("convert.maxpool", {"a": 1}), "convert.maxpool"),
    (set_field("convert.threshold_rule", [1]), "convert.threshold_rule"),
    (set_field("convert.v_init", "abc"), "convert.v_init"), (set_field("convert.percentile", [99]), "convert.percentile"),
])
def test_snn_json_fields_of_the_wrong_type_are_refused_naming_file_and_field(snn_folder, edit, field):
    edit_json(snn_folder / "snn.json", edit)
    with pytest.raises(CheckpointError, match=rf"snn.json.*{field}"):
        load_snn(snn_folder)


def _restore(ckpt_path: Path):
    from eclsnn.config import TrainConfig
    from eclsnn.models import create
    from eclsnn.training.resume import restore
    from eclsnn.training.schedule import build_optimizer, build_scheduler

    c = load_checkpoint(ckpt_path)
    kwargs = dict(c.meta["model"])
    model = create(kwargs.pop("arch"), **kwargs)
    t = TrainConfig()
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, 10, t)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return restore(c, [], t, model, optimizer, scheduler, scaler, 10, torch.device("cpu"))


def test_the_unedited_checkpoint_restores(ckpt):
    assert _restore(ckpt).start_epoch == 2


@pytest.mark.parametrize("name,edit", [
    ("optimizer.json", set_field("state", {"__tuple__": 5})),
    ("optimizer.json", set_field("state", {"__dict__": [[1]]})),
    ("optimizer.json", set_field("param_groups", 5)),
    ("optimizer.json", set_field("param_groups", [{"params": "x"}])),
    ("scheduler.json", lambda d: [d]),
    ("extra.json", set_field("history", 5)),
    ("extra.json", set_field("best_epoch", "one")),
    ("rng.json", set_field("python", 5)),
    ("rng.json", set_field("numpy", {"__ndarray__": {"dtype": "nonsense", "shape": [1], "data": [1]}})),
], ids=["tuple", "dict", "param_groups", "params", "scheduler", "history", "best_epoch", "python-rng", "ndarray"])
def test_malformed_state_files_are_a_checkpoint_error_naming_the_file(ckpt, name, edit):
    edit_json(ckpt / name, edit)
    with pytest.raises(CheckpointError, match=name):
        _restore(ckpt)


@pytest.mark.parametrize("name", ["forward", "training", "graph", "code", "_modules", "state_dict", "class",
                                  "0.forward", "1abc"])
def test_from_nir_accepts_module_names_that_collide_with_python_or_torch(name):
    graph = small_nir()
    x = torch.randn(3, 4)
    expected = eclsnn.simulate(eclsnn.from_nir(graph), x, 4)
    graph.nodes["0"].metadata["eclsnn"]["module"] = name
    assert torch.equal(eclsnn.simulate(eclsnn.from_nir(graph), x, 4), expected)


def test_from_nir_with_deeply_nested_settings_reads_the_graph():
    graph = small_nir()
    graph.metadata["eclsnn"]["settings"] = deep()
    assert eclsnn.from_nir(graph).settings["source"] == "nir"


def test_from_nir_turns_any_other_failure_into_a_conversion_error():
    graph = small_nir()
    graph.nodes["2"].weight = np.full((3, 5), "w")  # strings where numbers belong
    with pytest.raises(ConversionError, match="NIR import"):
        eclsnn.from_nir(graph)


@pytest.mark.parametrize("case", ["seed", "deep-toml", "meta-model", "meta-deep", "thresholds", "snn-json"])
def test_hostile_inputs_at_the_command_line_give_one_line_and_exit_2(case, tmp_path, ckpt, snn_folder, capsys):
    run = ckpt.parent.parent
    out = str(tmp_path / "out")
    if case == "seed":
        argv = ["train", "--seed", str(2**64), "--output", out]
    elif case == "deep-toml":
        (tmp_path / "deep.toml").write_text(f"[train]\nepochs = {deep()}\n")
        argv = ["train", "--config", str(tmp_path / "deep.toml"), "--output", out]
    elif case == "meta-model":
        edit_json(ckpt / "meta.json", set_field("model", "cnn-fmnist"))
        argv = ["evaluate", str(run), "--json", str(tmp_path / "e.json")]
    elif case == "meta-deep":
        (ckpt / "meta.json").write_text(deep())
        argv = ["convert", str(run), "-o", str(tmp_path / "snn2")]
    elif case == "thresholds":
        (snn_folder / "thresholds.safetensors").write_bytes(b"\x00" * 64)
        argv = ["evaluate", str(snn_folder), "--json", str(tmp_path / "e.json")]
    else:
        edit_json(snn_folder / "snn.json", set_field("convert", 5))
        argv = ["export", str(snn_folder), "-o", str(tmp_path / "x.npz")]
    assert main(argv) == 2
    one_error_line(capsys)


# ---- item 6: read-only commands change nothing; recovery stays in the run folder ------------------------

def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_reading_a_checkpoint_changes_nothing_in_the_run_folder(ckpt):
    """A writer died between its two renames: only .old-last-<pid> is left (and a .tmp of it)."""
    run = ckpt.parent.parent
    aside = ckpt.parent / f".old-last-{DEAD_PID}"
    os.replace(ckpt, aside)
    (ckpt.parent / f".tmp-last-{DEAD_PID}").mkdir()
    before = _listing(run)
    assert resolve_checkpoint(run) == aside
    model, c = load_ann(run)
    assert c.path == aside and c.meta["epoch"] == 1
    assert _listing(run) == before


def test_the_writer_recovers_the_aside_copy(ckpt):
    aside = ckpt.parent / f".old-last-{DEAD_PID}"
    os.replace(ckpt, aside)
    assert find_checkpoint(ckpt) == ckpt  # training (the writer, holding the run's lock) puts it back
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last"]


def test_recovery_never_follows_a_link_out_of_the_run_folder(tmp_path, ckpt):
    outside = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, outside)
    edit_json(outside / "meta.json", set_field("epoch", 99))
    shutil.rmtree(ckpt)
    link = ckpt.parent / f".old-last-{DEAD_PID}"
    link.symlink_to(outside, target_is_directory=True)
    run = ckpt.parent.parent

    with pytest.raises(CheckpointError, match="no eclsnn checkpoint"):
        load_ann(run)  # evaluate, convert, export: read only
    assert link.is_symlink() and not ckpt.exists()
    assert find_checkpoint(ckpt) is None  # train --resume: nothing to resume, the link is not taken
    assert not ckpt.exists()

    from eclsnn.models import create

    model = create("cnn-fmnist", num_classes=10)
    save_checkpoint(ckpt, model, {"model": {"arch": "cnn-fmnist", "num_classes": 10}, "epoch": 1})
    assert not link.exists() and not link.is_symlink()  # the writer removed the link, not what it points to
    assert json.loads((outside / "meta.json").read_text())["epoch"] == 99
    assert load_checkpoint(run).path == ckpt
