"""The fused CPU kernels' shared library: compiled, cached, checked and loaded — and what is trusted.

A shared library runs its code when it is loaded, so a cache of compiled kernels is as safe as the
folder it lives in: a library planted in a folder someone else can write runs as the user who loads
it. The rule here: a cache folder, and a library in it, are used only if the current user owns them,
no one else (group, others) can write them, and they are not symbolic links. Each is checked on the
opened file (``fstat`` of a descriptor opened with ``O_NOFOLLOW``, inside the folder's own descriptor),
and the library is loaded through that very descriptor (``/proc/self/fd/N``; where there is no
``/proc``, from a private copy of the checked bytes), so what runs is what was checked. A folder that
fails the rule is not used, and the reason goes into one warning; the next folder is tried:
``$ECLSNN_CACHE_DIR`` (else ``$XDG_CACHE_HOME/eclsnn`` or ``~/.cache/eclsnn``), then
``<temporary folder>/eclsnn-<uid>``, and last a fresh private folder (``tempfile.mkdtemp``), built
into on every run and removed once the library is loaded. New cache folders are made with mode 0700.

Damage is repaired without a word: a SHA-256 digest written beside the library when it is stored must
match before the library is mapped (a truncated library used to kill every process with SIGBUS), and a
library without the kernels' symbols counts as damaged; either is rebuilt in place. The digest says
nothing about trust — whoever can write the library can write its digest; trust comes from ownership.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Loaded", "load"]

# No fused multiply-add and no fast-math: the values must be those of the reference. -fno-trapping-math
# changes no value (it only lets the compiler ignore floating-point traps) but lets floor vectorise.
_BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
# -march=native first (vectorised floor, wider registers); then the portable baseline.
_EXTRA_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_SHLIB_SUFFIX = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
_DIGEST_SUFFIX = ".sha256"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FILE = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)  # never wait on a FIFO
_READ_FOLDER = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_DIRECTORY", 0)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC

# Descriptors of the loaded libraries, open for the life of the process: glibc knows a loaded library by
# the name it was opened under, and "/proc/self/fd/N" must go on naming this library while N is taken.
_held: list[int] = []


class Untrusted(Exception):
    """A folder or file that fails the trust rule; the message says which and why."""


class _CompileError(Exception):
    pass


@dataclass
class Loaded:
    """The loaded library, the folder it came from (None: a private one, rebuilt on every run), why a
    cache folder or library was passed over (one line each, in the order tried; empty when all went as
    configured), and whether any of that was for the trust rule."""

    lib: ctypes.CDLL
    folder: Path | None
    notes: list[str]
    distrusted: bool


# ---- where and what ------------------------------------------------------------------------------

def cache_folders() -> list[Path]:
    """The cache folders, best first: the configured one, then ``<tmp>/eclsnn-<uid>``."""
    root = os.environ.get("ECLSNN_CACHE_DIR")
    if root:
        first = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        first = (Path(xdg) if xdg else Path.home() / ".cache") / "eclsnn"
    uid = _uid()
    fallback = Path(tempfile.gettempdir()) / f"eclsnn-{uid if uid is not None else 0}"
    return [first] if os.path.abspath(first) == os.path.abspath(fallback) else [first, fallback]


def _compiler() -> str | None:
    candidates = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    for cand in candidates:
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another that
    shares the cache folder."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "|" + "|".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + "|" + platform.processor()


def _library_name(source: bytes, cc: str, flags: list[str]) -> str:
    key = hashlib.sha256(source + " ".join([cc, *flags, sys.platform, _cpu_signature()]).encode()).hexdigest()[:16]
    return f"kernels-{key}{_SHLIB_SUFFIX}"


# ---- the trust rule ------------------------------------------------------------------------------

def _uid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def check(st: os.stat_result, path, folder: bool) -> None:
    """Raise :class:`Untrusted` unless ``st`` (of ``path``) is a folder (``folder``) or a regular file
    that the current user owns and no one else can write."""
    if stat.S_ISLNK(st.st_mode):
        raise Untrusted(f"{path}: a symbolic link")
    if folder and not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"{path}: not a folder")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{path}: not a regular file")
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise Untrusted(f"{path}: owned by uid {st.st_uid}, not by you (uid {uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit)
        raise Untrusted(f"{path}: writable by {who} (mode {stat.S_IMODE(st.st_mode):o})")


def open_folder(path: Path) -> int:
    """A descriptor of the cache folder ``path`` (made with mode 0700 if missing), checked; raises
    :class:`Untrusted` or ``OSError``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder should be: say so, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check(os.lstat(path), path, folder=True)  # says "symbolic link" where the open would only fail
    fd = os.open(path, _READ_FOLDER)
    try:
        check(os.fstat(fd), path, folder=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _open_file(dfd: int, name: str, shown: Path) -> int | None:
    """A descriptor of the file ``name`` in the folder ``dfd``, checked; None if there is none."""
    try:
        check(os.stat(name, dir_fd=dfd, follow_symlinks=False), shown, folder=False)
        fd = os.open(name, _READ_FILE, dir_fd=dfd)
    except FileNotFoundError:
        return None
    try:
        check(os.fstat(fd), shown, folder=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---- loading -------------------------------------------------------------------------------------

def _dlopen(fd: int, data: bytes) -> ctypes.CDLL:
    """Load the library open at ``fd``, whose bytes ``data`` were checked; takes ``fd`` over."""
    if os.path.isdir("/proc/self/fd"):
        try:
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        _held.append(fd)
        return lib
    os.close(fd)
    folder = tempfile.mkdtemp(prefix="eclsnn-load-")
    try:
        path = os.path.join(folder, "kernels" + _SHLIB_SUFFIX)
        out = os.open(path, _NEW_FILE, 0o700)
        try:
            _write_all(out, data)
        finally:
            os.close(out)
        return ctypes.CDLL(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _complete(lib: ctypes.CDLL, symbols: Iterable[str]) -> bool:
    return all(hasattr(lib, s) for s in symbols)


def _load_cached(dfd: int, folder: Path, name: str, symbols: list[str],
                 notes: list[tuple[bool, str]]) -> ctypes.CDLL | None:
    """The library ``name`` from the checked folder, if it is there, trusted and intact; else None (a
    library that fails the trust rule adds a note; a damaged one is simply rebuilt)."""
    try:
        fd = _open_file(dfd, name, folder / name)
    except Untrusted as exc:
        notes.append((True, f"not loading {exc}"))
        return None
    except OSError:
        return None
    if fd is None:
        return None
    try:
        data = _read(fd)
        digest_fd = _open_file(dfd, name + _DIGEST_SUFFIX, folder / (name + _DIGEST_SUFFIX))
        if digest_fd is None:
            raise OSError("no digest")
        try:
            digest = _read(digest_fd).decode("ascii", "replace").strip()
        finally:
            os.close(digest_fd)
    except (OSError, Untrusted):  # unreadable, or a digest that is not ours: damaged
        os.close(fd)
        return None
    if not data or hashlib.sha256(data).hexdigest() != digest:
        os.close(fd)
        return None
    try:
        lib = _dlopen(fd, data)
    except OSError:
        return None
    return lib if _complete(lib, symbols) else None


# ---- building ------------------------------------------------------------------------------------

def _compile(cc: str, flags: list[str], source: Path) -> tuple[int, bytes]:
    """Compile ``source`` in a fresh private folder; a descriptor and the bytes of the library (the
    folder is gone when this returns)."""
    folder = tempfile.mkdtemp(prefix="eclsnn-build-")
    try:
        out = os.path.join(folder, "kernels" + _SHLIB_SUFFIX)
        try:
            proc = subprocess.run([cc, *flags, "-o", out, str(source), "-lm"], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise _CompileError(str(exc)) from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            cause = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else f"status {proc.returncode}")
            raise _CompileError(cause.strip())
        fd = os.open(out, _READ_FILE)  # in a folder only we can enter: no check needed
        try:
            return fd, _read(fd)
        except BaseException:
            os.close(fd)
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_new(dfd: int, name: str, data: bytes, mode: int) -> int:
    """Write ``data`` as ``name`` in the folder ``dfd`` (a temporary name, then a rename); returns a
    descriptor of the new file."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, _NEW_FILE, mode, dir_fd=dfd)
    try:
        _write_all(fd, data)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    return fd


def _store(dfd: int, name: str, data: bytes) -> int:
    """Store the library and then its digest; a descriptor of the stored library."""
    fd = _write_new(dfd, name, data, 0o755)
    try:
        os.close(_write_new(dfd, name + _DIGEST_SUFFIX, hashlib.sha256(data).hexdigest().encode() + b"\n", 0o644))
    except BaseException:
        os.close(fd)
        raise
    return fd


def load(source: Path, symbols: list[str]) -> Loaded:
    """The kernels compiled from ``source``, from the first cache folder that is trusted and has them
    intact, else compiled and stored in the first that is trusted and writable, else compiled into a
    private folder. ``symbols``: the names a complete library has. Raises RuntimeError naming each
    compiler failure when no flags compile.

    The notes name every folder or library passed over for the trust rule, and — when this call had to
    compile — every folder that could not be made or written (on later runs the library is found in
    the next folder, and nothing is said)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    text = source.read_bytes()
    notes: list[tuple[bool, str]] = []  # (for the trust rule?, what happened)
    errors: list[str] = []
    opened: dict[Path, int | None] = {}  # folder -> descriptor (None: not usable, noted once)
    compiled = False

    def folder_fd(path: Path) -> int | None:
        if path not in opened:
            try:
                opened[path] = open_folder(path)
            except Untrusted as exc:
                notes.append((True, f"not using {exc}"))
                opened[path] = None
            except OSError as exc:
                notes.append((False, f"cannot make {path}: {exc.strerror or exc}"))
                opened[path] = None
        return opened[path]

    def loaded(lib: ctypes.CDLL, path: Path | None) -> Loaded:
        if not _complete(lib, symbols):
            raise RuntimeError(f"the library compiled from {source.name} lacks the kernels' symbols")
        said = [note for trust, note in notes if trust or compiled]
        return Loaded(lib, path, said, any(trust for trust, _ in notes))

    try:
        for extra in _EXTRA_FLAGS:
            flags = _BASE_FLAGS + extra
            name = _library_name(text, cc, flags)
            built: tuple[int, bytes] | None = None
            try:
                for path in cache_folders():
                    dfd = folder_fd(path)
                    if dfd is None:
                        continue
                    lib = _load_cached(dfd, path, name, symbols, notes)
                    if lib is not None:
                        return loaded(lib, path)
                    if built is None:
                        built, compiled = _compile(cc, flags, source), True
                    try:
                        stored = _store(dfd, name, built[1])
                    except OSError as exc:
                        notes.append((False, f"cannot write to {path}: {exc.strerror or exc}"))
                        opened[path] = None
                        os.close(dfd)
                        continue
                    try:
                        return loaded(_dlopen(stored, built[1]), path)
                    except OSError as exc:  # e.g. a folder on a file system mounted noexec
                        notes.append((False, f"cannot load from {path}: {exc}"))
                if built is None:
                    built, compiled = _compile(cc, flags, source), True
                fd, data = built
                built = None  # _dlopen takes the descriptor over
                return loaded(_dlopen(fd, data), None)
            except _CompileError as exc:
                errors.append(f"{' '.join(extra) or 'baseline'}: {exc}")
            finally:
                if built is not None:
                    os.close(built[0])
    finally:
        for dfd in opened.values():
            if dfd is not None:
                os.close(dfd)
    raise RuntimeError("; ".join(errors) or "build failed")
