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
