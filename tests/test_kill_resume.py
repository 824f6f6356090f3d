"""Kill and resume: `eclsnn train` is SIGKILLed at seeded random moments, resumed with --resume each
time, and must end bit-identical (weights and deterministic metrics) to an uninterrupted run; at every
kill, whatever checkpoint is on disk loads."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eclsnn.io.checkpoint import find_checkpoint, load_checkpoint

ARGS = ["--epochs", "6", "--max-train-samples", "1536", "--batch-size", "128", "--set", "data.val_fraction=0.02",
        "--set", "train.eval_test=false", "--set", "train.progress=false", "--set", "data.augment=true", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def _train_cmd(output: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "eclsnn", "train", *ARGS, "--output", str(output), "--run-name", "r",
            *(["--resume"] if resume else [])]


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k in DETERMINISTIC}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last").state_dict


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(_train_cmd(out, False), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return out / "r"


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 600) -> bool:
    """Read the child's output until a line contains ``text``; False if it exited first."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if text in line:
            return True
        if time.monotonic() > deadline:
            break
    return False


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, tmp_path):
    """Four kills at seeded random moments: one while starting up, then in each resumed process a random
    delay after its first epoch summary line, scaled by how long that took — so kills land in training
    steps, validation and checkpoint writes whatever the machine's speed."""
    out = tmp_path / "killed"
    run = out / "r"
    rng = random.Random(20261129)
    checked: list[int] = []
    kills = 0
    for attempt in range(5):
        started = time.monotonic()
        proc = subprocess.Popen(_train_cmd(out, resume=attempt > 0), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if attempt == 4:  # the last resume runs to the end
            output, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, output
            break
        if attempt == 0:
            time.sleep(rng.uniform(1.0, 3.0))  # while starting up or in the first epoch
        elif _wait_for(proc, "epoch "):
            # a random point of the next epoch: the delay scales with this machine's speed
            time.sleep(rng.uniform(0.0, 0.5) * (time.monotonic() - started))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=600)
        for name in ("last", "best"):  # whatever is on disk is complete and readable
            ckpt = find_checkpoint(run / "checkpoints" / name)
            if ckpt is not None:
                checked.append(load_checkpoint(ckpt).meta["epoch"])
    assert kills >= 2, "the child finished before the kills; the test proved little"
    assert checked, "no checkpoint was on disk at any kill"
    assert _metrics(run) == _metrics(reference)
    ref_w, got_w = _weights(reference), _weights(run)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
