"""Checkpoints: exact round trips, no unpickling ever, crash safety of the writer."""

from __future__ import annotations

import errno
import json
import os
import pickle
import pickletools
import random
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from eclsnn.io import checkpoint as ckpt_mod
from eclsnn.io.checkpoint import (
    FAULT_ENV,
    build_model,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from eclsnn.errors import CheckpointError
from eclsnn.models import create

MODEL_KW = {"arch": "cnn-fmnist", "num_classes": 10, "activation": "clip", "levels": 4, "init_threshold": 4.0,
            "per_channel": False, "in_channels": 1, "pool": "avg", "stem": None, "dropout": 0.0}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(MODEL_KW)
    return create(kw.pop("arch"), **kw)


def trained_state(seed: int = 0):
    """A model, optimizer and scheduler after two steps, so momentum buffers and LR state are non-trivial."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def save(dest: Path, seed: int = 0, epoch: int = 1) -> tuple[Path, torch.nn.Module]:
    model, opt, sched = trained_state(seed)
    save_checkpoint(dest, model, {"model": MODEL_KW, "epoch": epoch}, opt, sched, {"best": 0.5, "t": torch.arange(3)})
    return dest, model


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = trained_state()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    torch.rand(3)
    dest = save_checkpoint(tmp_path / "ck", model, {"model": MODEL_KW, "epoch": 3, "metrics": {"acc": 0.5}},
                           opt, sched, {"history": [{"epoch": 1}], "best_val_acc": 0.25, "v": torch.ones(2)})
    expected_next = (torch.rand(4), random.random(), np.random.rand())

    ck = load_checkpoint(dest)
    assert ck.meta["format"] == "eclsnn-checkpoint" and ck.meta["format_version"] == 1
    assert ck.meta["epoch"] == 3 and ck.meta["metrics"] == {"acc": 0.5}
    assert "git_revision" in ck.meta
    assert_same_weights(ck.state_dict, {k: v for k, v in model.state_dict().items()})

    model2, opt2, sched2 = trained_state(seed=1)
    rebuilt = build_model(ck)
    assert_same_weights(rebuilt.state_dict(), model.state_dict())
    opt2.load_state_dict(ck.load_optimizer_state())
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"])
    sched2.load_state_dict(ck.load_scheduler_state())
    assert sched2.state_dict() == sched.state_dict()
    extra = ck.load_extra_state()
    assert extra["history"] == [{"epoch": 1}] and extra["best_val_acc"] == 0.25
    assert torch.equal(extra["v"], torch.ones(2))

    torch.manual_seed(999)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(ck.load_rng_state())
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected_next[0]) and got[1] == expected_next[1] and got[2] == expected_next[2]


def test_rng_state_capture_restore():
    state = capture_rng_state()
    a = torch.rand(5)
    restore_rng_state(state)
    assert torch.equal(torch.rand(5), a)


def _parses_as_pickle(data: bytes) -> bool:
    """Whether ``data`` begins with a complete pickle (opcodes up to STOP), as read by pickletools --
    which disassembles without executing anything."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # an unknown opcode, a truncated argument, ...
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def test_no_pickle_files_written(tmp_path):
    dest, _ = save(tmp_path / "ck")
    for f in dest.iterdir():
        assert f.suffix in (".json", ".safetensors"), f
        data = f.read_bytes()
        # not a pickle nor a torch.save archive by content (a first byte of 0x80 alone proves nothing:
        # a safetensors file starts with the low byte of its header length)
        assert not _parses_as_pickle(data) and not zipfile.is_zipfile(f), f
        if f.suffix == ".json":
            json.loads(data)
        else:
            st_load(data)  # a complete safetensors file
        ckpt_mod._refuse_pickle(f)  # and the loader's content check lets it through


def test_resolve_accepts_run_folder_checkpoint_folder_and_weights_file(tmp_path):
    run = tmp_path / "run"
    dest, _ = save(run / "checkpoints" / "last")
    assert resolve_checkpoint(run) == dest
    assert resolve_checkpoint(dest) == dest
    assert resolve_checkpoint(dest / "model.safetensors") == dest
    assert resolve_checkpoint(run / "checkpoints") == dest


def test_overwrite_replaces_the_checkpoint(tmp_path):
    dest, _ = save(tmp_path / "ck", seed=0, epoch=1)
    _, model = save(dest, seed=1, epoch=2)
    ck = load_checkpoint(dest)
    assert ck.meta["epoch"] == 2
    assert_same_weights(ck.state_dict, model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no tmp or aside folder left


# ---- refusing to unpickle ------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_file_is_refused_and_not_executed(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Payload(str(target))))
    assert evil.read_bytes()[:1] == b"\x80"
    for path in (evil, tmp_path):
        with pytest.raises(CheckpointError, match="never unpickles") as err:
            load_checkpoint(path)
        assert "weights_only=True" in str(err.value) and "safetensors" in str(err.value)
    assert not target.exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    target = tmp_path / "pwned"
    dest, _ = save(tmp_path / "ck")
    (dest / "model.safetensors").write_bytes(pickle.dumps(_Payload(str(target))))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a pickle\. eclsnn never unpickles"):
        load_checkpoint(dest)
    (dest / "model.safetensors").unlink()
    (dest / "evil.pkl").write_bytes(pickle.dumps(_Payload(str(target))))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(dest)
    assert not target.exists()


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path, saved_checkpoint):
    # the first byte of a safetensors file is the low byte of its header length; 0x80 is also a pickle's
    # protocol marker (a real run's optimizer state hit this: its header was 1,152 = 0x480 bytes)
    path = tmp_path / "state.safetensors"
    for pad in range(300):
        save_file({"w": torch.arange(3.0)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80" and not _parses_as_pickle(path.read_bytes())
    assert torch.equal(ckpt_mod._read_safetensors(path)["w"], torch.arange(3.0))
    # and a whole checkpoint whose weights file starts with 0x80 loads through the public API
    dest, model = Path(shutil.copytree(saved_checkpoint[0], tmp_path / "ck")), saved_checkpoint[1]
    weights = dest / "model.safetensors"
    sd = st_load(weights.read_bytes())
    for pad in range(300):
        save_file(sd, str(weights), metadata={"pad": "x" * pad})
        if weights.read_bytes()[:1] == b"\x80":
            break
    assert weights.read_bytes()[:1] == b"\x80"
    assert_same_weights(load_checkpoint(dest).state_dict, model.state_dict())


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """One checkpoint for the tests below, which copy it before changing files."""
    return save(tmp_path_factory.mktemp("saved") / "ck")


@pytest.mark.parametrize("kind", ["pickle-2", "pickle-3", "pickle-4", "pickle-5", "torch.save-legacy", "torch.save"])
def test_pickle_content_is_refused_whatever_the_file_name(tmp_path, kind, saved_checkpoint):
    """Real pickles (every protocol that starts with the PROTO opcode) and real torch.save files (the
    legacy pickle format and the zip archive) in place of a checkpoint's model.safetensors: refused by
    content, as what they are, and never executed."""
    target = tmp_path / "pwned"
    dest = Path(shutil.copytree(saved_checkpoint[0], tmp_path / "ck"))
    path = dest / "model.safetensors"
    payload = {"w": torch.ones(2), "p": _Payload(str(target))}
    if kind.startswith("pickle"):
        path.write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "torch.save")
    is_zip = kind == "torch.save"
    assert zipfile.is_zipfile(path) if is_zip else _parses_as_pickle(path.read_bytes())  # (what it claims to be)
    with pytest.raises(CheckpointError, match="never unpickles") as err:
        load_checkpoint(dest)
    assert ("is a zip archive (the torch.save format)" if is_zip else "is a pickle") in str(err.value)
    assert not target.exists()


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "weights.bin.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    assert path.read_bytes()[:2] == b"PK"
    with pytest.raises(CheckpointError, match="torch.save"):
        resolve_checkpoint(path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(tmp_path / "model.pth")


def test_load_never_calls_torch_load(tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    dest, _ = save(tmp_path / "ck")
    ck = load_checkpoint(dest)
    ck.load_optimizer_state(), ck.load_scheduler_state(), ck.load_rng_state(), ck.load_extra_state()
    build_model(ck)


# ---- corrupt and foreign checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_safetensors_is_a_checkpoint_error(tmp_path, keep):
    dest, _ = save(tmp_path / "ck")
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(dest)


def test_corrupt_bytes_in_header(tmp_path):
    dest, _ = save(tmp_path / "ck")
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(dest)


def test_truncated_meta_json(tmp_path):
    dest, _ = save(tmp_path / "ck")
    meta = dest / "meta.json"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(dest)


def test_truncated_optimizer_state(tmp_path):
    dest, _ = save(tmp_path / "ck")
    f = dest / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    ck = load_checkpoint(dest)  # weights are fine
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        ck.load_optimizer_state()


def test_missing_meta_and_foreign_safetensors(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(folder)


def test_missing_path():
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("/nonexistent/run")


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no eclsnn checkpoint"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_for_another_architecture(tmp_path):
    dest, _ = save(tmp_path / "ck")
    meta = json.loads((dest / "meta.json").read_text())
    meta["model"] = {**MODEL_KW, "arch": "resnet20", "in_channels": 1}
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        build_model(load_checkpoint(dest))
    msg = str(err.value)
    assert "resnet20" in msg and ("missing" in msg or "not in the model" in msg)

    meta["model"] = {**MODEL_KW, "num_classes": 100}
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_model(load_checkpoint(dest))


def test_unknown_arch_in_meta(tmp_path):
    dest, _ = save(tmp_path / "ck")
    meta = json.loads((dest / "meta.json").read_text())
    meta["model"]["arch"] = "transformer-xxl"
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="transformer-xxl"):
        build_model(load_checkpoint(dest))


def test_newer_format_version_is_refused(tmp_path):
    dest, _ = save(tmp_path / "ck")
    meta = json.loads((dest / "meta.json").read_text())
    meta["format_version"] = 99
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(dest)


def test_unserialisable_meta_and_state(tmp_path):
    model = make_model()
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "a", model, {"x": object()})
    with pytest.raises(CheckpointError, match="pickle"):
        save_checkpoint(tmp_path / "b", model, {}, extra_state={"f": object()})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- crash safety --------------------------------------------------------------------------------

# The crash tests run the writer in a subprocess (the fault hook ends it with os._exit(137), like
# SIGKILL) on a tiny network, so that each costs little more than importing torch.
WRITER = textwrap.dedent(
    """
    import sys, torch
    from eclsnn.io.checkpoint import save_checkpoint
    torch.manual_seed(int(sys.argv[2]))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    for _ in range(int(sys.argv[3])):
        save_checkpoint(sys.argv[1], model, {"epoch": int(sys.argv[2])}, opt, extra_state={"x": torch.ones(3)})
    """
)


def run_writer(dest: Path, seed: int, fault: str | None, writes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-c", WRITER, str(dest), str(seed), str(writes)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "fault", ["model.safetensors:1000", "optimizer.safetensors:64", "meta.json:5", "@rename:0"],
)
def test_killed_writer_leaves_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    dest = tmp_path / "last"
    monkeypatch.setattr(sys, "argv", ["-", str(dest), "0", "1"])
    exec(WRITER, {})  # the first checkpoint: the same writer, in-process
    before = load_checkpoint(dest).state_dict
    proc = run_writer(dest, 1, fault)
    assert proc.returncode == 137, proc.stderr
    # whatever the moment of the kill, the checkpoint reads back complete: the old one
    ck = load_checkpoint(dest)
    assert ck.meta["epoch"] == 0
    assert_same_weights(ck.state_dict, before)
    assert ck.load_optimizer_state()["state"] and torch.equal(ck.load_extra_state()["x"], torch.ones(3))
    # reading changed nothing; the writer's recovery (as a resumed training runs it) puts the aside copy back
    assert find_checkpoint(dest) == dest and (dest / "meta.json").is_file()
    # and the next write succeeds and cleans up
    save(dest, seed=2, epoch=2)
    assert load_checkpoint(dest).meta["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_killed_first_write_leaves_nothing_half_written(tmp_path):
    dest = tmp_path / "last"
    proc = run_writer(dest, 1, "model.safetensors:500")
    assert proc.returncode == 137
    assert find_checkpoint(dest) is None
    with pytest.raises(CheckpointError):
        load_checkpoint(dest)


def test_fault_spec_can_pick_the_nth_write(tmp_path):
    dest = tmp_path / "last"
    proc = run_writer(dest, 1, "last/model.safetensors:10:2", writes=2)
    assert proc.returncode == 137
    assert load_checkpoint(dest).meta["epoch"] == 1  # the first write went through, the second died


def test_recovers_from_aside_folder_left_by_a_dead_writer(tmp_path):
    dest, model = save(tmp_path / "last", seed=0, epoch=4)
    dead_pid = 2**22 + 12345  # above the default pid_max; no such process
    os.replace(dest, tmp_path / f".old-last-{dead_pid}")
    (tmp_path / f".tmp-last-{dead_pid}").mkdir()
    (tmp_path / f".tmp-last-{dead_pid}" / "model.safetensors").write_bytes(b"\x00" * 10)
    before = sorted(p.name for p in tmp_path.iterdir())
    # a reader takes the complete aside copy where it is and changes nothing (issue #14, item 6)
    assert resolve_checkpoint(tmp_path.parent / tmp_path.name / "last") == tmp_path / f".old-last-{dead_pid}"
    assert load_checkpoint(dest).meta["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # the writer's recovery (save_checkpoint, or find_checkpoint when training resumes) puts it back
    assert find_checkpoint(dest) == dest
    assert load_checkpoint(dest).meta["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_stale_aside_beside_a_complete_checkpoint_is_removed_on_write(tmp_path):
    dest, _ = save(tmp_path / "last", seed=0, epoch=1)
    shutil.copytree(dest, tmp_path / ".old-last-4199999")
    save(dest, seed=1, epoch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(dest).meta["epoch"] == 2


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    dest, _ = save(tmp_path / "last", seed=0, epoch=1)
    before = load_checkpoint(dest).state_dict
    real_write = ckpt_mod._write_bytes

    def full_disk(path, data, checkpoint):
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, checkpoint)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full_disk)
    with pytest.raises(CheckpointError, match="disk is full"):
        save(dest, seed=1, epoch=2)
    ck = load_checkpoint(dest)
    assert ck.meta["epoch"] == 1
    assert_same_weights(ck.state_dict, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_failed_rename_restores_the_previous_checkpoint(tmp_path, monkeypatch):
    dest, _ = save(tmp_path / "last", seed=0, epoch=1)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    with pytest.raises(CheckpointError):
        save(dest, seed=1, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(dest).meta["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
