"""Kill and resume: `eclsnn train` is SIGKILLed at seeded random moments and once in the middle of a
checkpoint write, resumed with --resume each time, and must end bit-identical (weights and
deterministic metrics) to an uninterrupted run; at every kill, whatever checkpoint is on disk loads and
the last checkpoint never goes back behind an epoch the child already reported.

Each kill is SIGSTOP first: with the child frozen, the test reads what phase it is in from the outside
(its output so far and the checkpoint folder), then SIGKILLs it, so the recorded phase is the phase of
the kill."""

import json
import os
import random
import re
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
# The trainer's per-epoch summary line ("epoch 3/6  train loss 0.7… acc …  val loss …"), printed after the
# epoch's checkpoints are written — not "resuming … after epoch 2" nor the "training …" start-up line.
SUMMARY = re.compile(r"^epoch (\d+)/(\d+)  train loss \S+ acc \S+  val loss ")


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


def _summaries(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(SUMMARY.match, lines) if m]


def _wait_for_summary(proc: subprocess.Popen, lines: list[str], timeout: float = 600) -> bool:
    """Read the child's output (into `lines`) until an epoch summary line; False if it exited first."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if SUMMARY.match(line):
            return True
        if time.monotonic() > deadline:
            break
    return False


def _write_under_way(ckpts: Path, pid: int, had_last: bool) -> list[str]:
    """What in checkpoints/ shows a checkpoint write of process `pid` under way: its temporary or
    moved-aside folder (``.tmp-<name>-<pid>``, ``.old-<name>-<pid>``), a best/last folder without
    meta.json (written last), or last gone though it was there."""
    try:
        names = set(os.listdir(ckpts))
    except FileNotFoundError:
        return []
    found = sorted(n for n in names if n.startswith((".tmp-", ".old-")) and n.endswith(f"-{pid}"))
    found += [f"{n} without meta.json" for n in ("best", "last") if n in names and not (ckpts / n / "meta.json").is_file()]
    if had_last and "last" not in names:
        found.append("last missing")
    return found


def _freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP the child and wait until it is stopped (so nothing it does races the look that follows)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 5
    while stat.exists() and time.monotonic() < deadline:
        if stat.read_text().rsplit(")", 1)[1].split()[0] in "TtZX":
            return
        time.sleep(0.0002)
    if not stat.exists():
        time.sleep(0.05)


def _kill_in_a_checkpoint_write(proc: subprocess.Popen, ckpts: Path, timeout: float = 600) -> list[str]:
    """Poll checkpoints/ until a write of this child is under way, freeze the child, and if the write is
    still under way return the evidence (the child stays frozen); [] if the child finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _write_under_way(ckpts, proc.pid, had_last=True):
            _freeze(proc)
            evidence = _write_under_way(ckpts, proc.pid, had_last=True)
            if evidence:
                return evidence
            proc.send_signal(signal.SIGCONT)  # the write ended between the look and the stop: next one
        time.sleep(0.0005)
    return []


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, tmp_path):
    """Kills at four moments: seeded random ones while starting up and at a random point of the epoch
    after a resumed process's first summary line (the delay scaled by how long that took, whatever the
    machine's speed), and one in the middle of a checkpoint write (found by watching checkpoints/). The
    phase of each kill is recorded from the outside and must cover checkpoint writes and more."""
    out = tmp_path / "killed"
    run = out / "r"
    ckpts = run / "checkpoints"
    rng = random.Random(20261129)
    checked: list[int] = []
    phases: list[tuple[str, str]] = []
    last_epoch = 0  # the epoch of checkpoints/last after the previous kill (0: none yet)
    for attempt in range(5):
        started = time.monotonic()
        proc = subprocess.Popen(_train_cmd(out, resume=attempt > 0), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        if attempt == 4:  # the last resume runs to the end
            output, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, output
            break
        evidence: list[str] = []
        if attempt == 0:
            time.sleep(rng.uniform(1.0, 3.0))  # while starting up or in the first epoch
        elif _wait_for_summary(proc, lines):
            if attempt == 1:
                evidence = _kill_in_a_checkpoint_write(proc, ckpts)
            else:  # a random point of the next epoch: the delay scales with this machine's speed
                time.sleep(rng.uniform(0.0, 0.5) * (time.monotonic() - started))
        if proc.poll() is None:
            if not evidence:
                _freeze(proc)
                evidence = _write_under_way(ckpts, proc.pid, had_last=last_epoch > 0 or bool(_summaries(lines)))
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=600)
            lines += rest.splitlines()  # everything the child printed before it was stopped
            done = _summaries(lines)
            if evidence:
                phases.append(("checkpoint write", ", ".join(evidence)))
            elif done or any(line.startswith("training ") for line in lines):
                phases.append(("epoch", f"training or validation of epoch {(done or [last_epoch])[-1] + 1}"))
            else:
                phases.append(("start-up", f"last line: {lines[-1] if lines else '(none)'}"))
        else:
            lines += proc.communicate(timeout=600)[0].splitlines()
            done = _summaries(lines)
        for name in ("last", "best"):  # whatever is on disk is complete and readable
            ckpt = find_checkpoint(ckpts / name)
            if ckpt is not None:
                checked.append(load_checkpoint(ckpt).meta["epoch"])
        # never behind a checkpoint that was complete before: the previous kill's, or an epoch whose
        # summary line (printed after its checkpoints) the child got out
        must_have = max([last_epoch, *done])
        if must_have:
            last = find_checkpoint(ckpts / "last")
            assert last is not None, f"checkpoints/last of epoch {must_have} is gone after kill {phases[-1]}"
            last_epoch = load_checkpoint(last).meta["epoch"]
            assert last_epoch >= must_have, (last_epoch, must_have, phases[-1])
    print("kills:", phases)
    assert len(phases) >= 3, f"the child finished before the kills; the test proved little: {phases}"
    assert "checkpoint write" in {p for p, _ in phases}, phases
    assert len({p for p, _ in phases}) >= 2, f"every kill landed in the same phase: {phases}"
    assert checked, "no checkpoint was on disk at any kill"
    assert _metrics(run) == _metrics(reference)
    ref_w, got_w = _weights(reference), _weights(run)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
