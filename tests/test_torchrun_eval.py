"""``eclsnn evaluate`` and ``eclsnn analyze`` under ``torchrun --nproc_per_node=2`` (gloo on the CPU): the
split is sharded without padding, so the correct counts at every t, the spike and operation counts
equal one process's exactly, float statistics agree to 1e-6 relative, and only rank 0 prints and writes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import needs_data

RUN = Path(__file__).with_name("fixtures") / "main-0.1.0" / "run"
SAMPLES = "301"  # odd: the two shards differ in size


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _eclsnn(args, procs: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "eclsnn"] \
        if procs > 1 else [sys.executable, "-m", "eclsnn"]
    proc = subprocess.run(launcher + args, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _floats_close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _floats_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _floats_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@needs_data
@pytest.mark.slow
def test_evaluate_and_analyze_shard_over_two_processes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    common = ["--max-samples", SAMPLES, "--no-progress"]
    one = _eclsnn(["evaluate", str(run), "-T", "4", "--json", str(tmp_path / "one.json"), *common], 1, tmp_path)
    two = _eclsnn(["evaluate", str(run), "-T", "4", "--json", str(tmp_path / "two.json"), *common], 2, tmp_path)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["num_samples"] == b["num_samples"] == int(SAMPLES)  # none twice, none left out
    assert b["snn_accuracy"] == a["snn_accuracy"] and b["ann_accuracy"] == a["ann_accuracy"]
    assert b["processes"] == 2 and two.stdout.count("results:") == 1  # rank 0 alone prints

    _eclsnn(["analyze", str(run), "-T", "3", "--split", "val", "--output", str(tmp_path / "a1"), *common], 1, tmp_path)
    two = _eclsnn(["analyze", str(run), "-T", "3", "--split", "val", "--output", str(tmp_path / "a2"), *common], 2, tmp_path)
    a, b = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("a1", "a2"))
    assert a["num_samples"] == b["num_samples"] == int(SAMPLES)
    for v in a["variants"]:
        va, vb = a["variants"][v], b["variants"][v]
        assert va["snn_accuracy"] == vb["snn_accuracy"]
        assert [s["snn_sops"] for s in va["synapses"]] == [s["snn_sops"] for s in vb["synapses"]]  # exact counts
        assert [n["firing_rate"] for n in va["neurons"]] == [n["firing_rate"] for n in vb["neurons"]]
        _floats_close(va["neurons"], vb["neurons"])  # float64 sums, another order: 1e-6
    assert two.stdout.count("written:") == 1
    assert sorted(p.name for p in (tmp_path / "a2").iterdir()) == ["analysis.json", "analysis.md", "analysis.png"]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # read-only commands wrote nothing there
