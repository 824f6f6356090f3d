"""File-system helpers of the checkpoint writer: fsync of folders, whether a writer process is alive,
the git revision a checkpoint records, and the fault injection of the crash tests
(``ECLSNN_FAULT_CHECKPOINT``, see :mod:`eclsnn.io.checkpoint`)."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path



FAULT_ENV = "ECLSNN_FAULT_CHECKPOINT"


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The commit of the eclsnn source tree (``git rev-parse HEAD``), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and len(rev) >= 40 else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fault_spec() -> tuple[str, int, int] | None:
    """``(file, byte offset, n)`` from ``ECLSNN_FAULT_CHECKPOINT="<file>:<offset>[:<n>]"``: stop during
    the n-th write (default 1st) of that file by this process."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if len(parts) == 3:
            return parts[0], int(parts[1]), int(parts[2])
        if len(parts) == 2:
            return parts[0], int(parts[1]), 1
    except ValueError:
        pass
    return None


_fault_counts: dict[str, int] = {}


def _fault_hit(name: str, checkpoint: str) -> int | None:
    """The byte offset at which to stop if this write of `name` is the one selected for a fault."""
    spec = _fault_spec()
    if spec is None or spec[0] not in (name, f"{checkpoint}/{name}"):
        return None
    _fault_counts[spec[0]] = _fault_counts.get(spec[0], 0) + 1
    return spec[1] if _fault_counts[spec[0]] == spec[2] else None


def _write_bytes(path: Path, data: bytes, checkpoint: str) -> None:
    """Write and fsync one file; the fault-injection hook stops the process part-way if asked."""
    stop_at = _fault_hit(path.name, checkpoint)
    with open(path, "wb") as f:
        if stop_at is not None:
            f.write(data[:stop_at])
            f.flush()
            os.fsync(f.fileno())
            os._exit(137)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
