"""Two `train` processes on one run folder (issue #14, item 6, in part): the second is refused with the
holder's pid; the lock is the OS's, so it goes with a killed holder and kill-and-resume keeps working."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from eclsnn.cli import main
from eclsnn.training.run_files import lock_file, run_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run folders are locked with flock (POSIX)")

TRAIN = ["--epochs", "1", "--max-train-samples", "64", "--batch-size", "32", "--set", "train.progress=false",
         "--set", "evaluate.max_samples=32"]


def test_a_second_train_on_a_locked_run_folder_exits_2_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    with run_lock(run):
        code = main(["train", "--output", str(tmp_path / "runs"), "--run-name", "r", *TRAIN])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"is being written by another eclsnn train (pid {os.getpid()})" in err
    assert not run.exists()  # it stopped before writing anything


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    run = tmp_path / "r"
    code = f"""
        import os, sys, time
        from pathlib import Path
        from eclsnn.training.run_files import run_lock
        with run_lock(Path({str(run)!r})):
            print("locked", flush=True)
            time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"pid {proc.pid}"):
            with run_lock(run):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with run_lock(run):  # free again at once
            assert lock_file(run).read_text().strip() == str(os.getpid())
    finally:
        proc.kill()
        proc.wait()
