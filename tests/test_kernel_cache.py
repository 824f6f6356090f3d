"""The cache of the fused CPU kernels' shared library (issue #14, items 1 and 2): what it loads and what
it refuses. A library runs its code when loaded, so only folders and libraries owned by the current user,
writable by no one else and not symbolic links are used; anything else gives one warning and the kernels
come from another folder. A damaged library (truncated, or without the kernels' symbols) is rebuilt
instead of crashing every process or warning on every run; a cache folder that cannot be written gives
a warning that names the cause, and the temporary folder takes over.

Each test runs eclsnn in a child process (a truncated library used to kill it with SIGBUS) with its own
``ECLSNN_CACHE_DIR`` and temporary folder (``TMPDIR``). One real build is shared through the fixture
``built``; a "planted" library, when loaded, creates the file named by ``ECLSNN_TEST_PLANTED``, so a
test sees whether foreign code ran."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file ownership as on Linux")

# The child: load the kernels, check them against the reference, print what happened as one JSON line.
_CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from eclsnn.core.backends import cpu as kernels, use_backend
    from eclsnn.core.neurons import IFNeuron
    available = kernels.available()
    same = None
    if available:
        x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
        with use_backend("fused-cpu"):
            fast = IFNeuron(1.0).multi_step(x)
        with use_backend("reference"):
            same = torch.equal(fast, IFNeuron(1.0).multi_step(x))
print(json.dumps({"available": available, "same": same, "error": kernels.build_error(),
                  "warnings": [str(w.message) for w in caught if "eclsnn" in str(w.message)]}))
"""

# As root, permissions do not stop writes; dropping CAP_DAC_OVERRIDE from the bounding set before exec
# makes the child a root that folder modes do stop (exit 77: the kernel refused the drop).
_WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""

_PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("ECLSNN_TEST_PLANTED");
    FILE *f = p ? fopen(p, "w") : NULL;
    if (f) fclose(f);
}
int eclsnn_not_a_kernel(void) { return 0; }
"""


def _digest_of(lib: Path) -> str:
    """What the cache writes beside a library (``<library>.sha256``): its SHA-256. It detects damage only;
    whoever can write the library can write this too."""
    return hashlib.sha256(lib.read_bytes()).hexdigest()


def _put(folder: Path, name: str, lib: Path) -> Path:
    """Place ``lib`` as ``folder/name`` with a matching digest (a planter can write both)."""
    target = folder / name
    shutil.copyfile(lib, target)
    os.chmod(target, 0o700)
    (folder / f"{name}.sha256").write_text(_digest_of(target))
    return target


def _private(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o700)
    return path


class _Built:
    def __init__(self, root: Path):
        self.cache = root / "cache"
        libs = sorted(p for p in self.cache.iterdir() if p.name.startswith("kernels-") and not p.name.endswith(".sha256"))
        assert len(libs) == 1, libs
        self.lib = libs[0]
        self.name = self.lib.name
        self.planted = root / "planted.so"
        cc = shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc")
        src = root / "planted.c"
        src.write_text(_PLANTED_C)
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(self.planted), str(src)], check=True, capture_output=True)

    def fill(self, folder: Path) -> None:
        """A good cached library (and its digest) in ``folder``."""
        _put(folder, self.name, self.lib)


def _run(code: str, cache: Path, tmp: Path, without_dac_override: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "ECLSNN_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "ECLSNN_TEST_PLANTED": str(tmp.parent / "PLANTED-RAN")}
    env.pop("ECLSNN_KERNELS", None)
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if without_dac_override and os.geteuid() == 0:
        argv = [sys.executable, "-c", _WITHOUT_DAC_OVERRIDE, textwrap.dedent(code)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def _child(cache: Path, tmp: Path, **kw) -> dict:
    proc = _run(_CHILD, cache, tmp, **kw)
    if proc.returncode == 77:
        pytest.skip("cannot make a folder read-only for this root process (CAP_DAC_OVERRIDE kept)")
    assert proc.returncode == 0, f"the child died with status {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> _Built:
    root = tmp_path_factory.mktemp("kernel-cache")
    cache, tmp = _private(root / "cache"), _private(root / "tmp")
    out = _child(cache, tmp)
    assert out["available"], out
    return _Built(root)


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """A cache folder and a temporary folder of the test's own (``cache`` not yet created)."""
    return tmp_path / "cache", _private(tmp_path / "tmp")


def _fallback(tmp: Path) -> Path:
    """The temporary-folder cache, ``$TMPDIR/eclsnn-<uid>``."""
    return tmp / f"eclsnn-{os.getuid()}"


def _planted_ran(tmp: Path) -> bool:
    return (tmp.parent / "PLANTED-RAN").exists()


# ---- damage: rebuilt, never a crash ------------------------------------------------------------------

def test_a_truncated_library_does_not_crash_and_is_rebuilt(built, tmp_path):
    cache, tmp = _folders(tmp_path)
    _private(cache)
    lib = _put(cache, built.name, built.lib)
    size = lib.stat().st_size
    with open(lib, "r+b") as f:
        f.truncate(size // 2)
    out = _child(cache, tmp)
    assert out["available"] and out["same"], out
    assert out["warnings"] == [], out
    assert lib.stat().st_size > size // 2
    assert (cache / f"{built.name}.sha256").read_text().strip() == _digest_of(lib)


def test_a_library_without_the_kernel_symbols_is_rebuilt_once(built, tmp_path):
    cache, tmp = _folders(tmp_path)
    _private(cache)
    _put(cache, built.name, built.planted)  # loadable, digest matching, but no kernels in it
    first = _child(cache, tmp)
    assert first["available"] and first["same"], first
    second = _child(cache, tmp)
    assert second["available"] and second["warnings"] == [], second
    assert not list(_fallback(tmp).glob("kernels-*")), "rebuilt in the cache folder itself"


def test_a_read_only_cache_folder_warns_with_the_cause_and_the_temporary_folder_takes_over(built, tmp_path):
    cache, tmp = _folders(tmp_path)
    _private(cache)
    os.chmod(cache, 0o500)
    out = _child(cache, tmp, without_dac_override=True)
    assert out["available"] and out["same"], out
    assert len(out["warnings"]) == 1, out
    assert str(cache) in out["warnings"][0] and os.strerror(errno.EACCES) in out["warnings"][0], out
    assert list(_fallback(tmp).glob("kernels-*")), "built into the temporary-folder cache"
    assert not list(cache.iterdir())


# ---- trust: only what the user owns and no one else can write ----------------------------------------

@pytest.mark.parametrize("mode", [0o777, 0o770], ids=["world-writable", "group-writable"])
def test_a_cache_folder_others_can_write_is_not_trusted(built, tmp_path, mode):
    cache, tmp = _folders(tmp_path)
    _private(cache)
    os.chmod(cache, mode)
    _put(cache, built.name, built.planted)
    built.fill(_private(_fallback(tmp)))
    out = _child(cache, tmp)
    assert not _planted_ran(tmp), "the library planted in a folder others can write was loaded"
    assert out["available"] and out["same"], out
    assert len(out["warnings"]) == 1 and str(cache) in out["warnings"][0] and "writable" in out["warnings"][0], out


@pytest.mark.parametrize("link", ["folder", "library"])
def test_symbolic_links_are_not_followed(built, tmp_path, link):
    cache, tmp = _folders(tmp_path)
    elsewhere = _private(tmp_path / "elsewhere")
    _put(elsewhere, built.name, built.planted)
    if link == "folder":
        cache.symlink_to(elsewhere)
        built.fill(_private(_fallback(tmp)))
    else:
        _private(cache)
        (cache / built.name).symlink_to(elsewhere / built.name)
        shutil.copyfile(elsewhere / f"{built.name}.sha256", cache / f"{built.name}.sha256")
    out = _child(cache, tmp)
    assert not _planted_ran(tmp), f"the library behind a symbolic link ({link}) was loaded"
    assert out["available"] and out["same"], out
    assert len(out["warnings"]) == 1 and "symbolic link" in out["warnings"][0], out
    if link == "library":  # rebuilt in its place
        assert (cache / built.name).is_file() and not (cache / built.name).is_symlink()


@pytest.mark.parametrize("owned", ["temporary folder", "library"])
def test_what_another_user_owns_is_not_trusted(built, tmp_path, owned):
    other = os.getuid() + 4242
    cache, tmp = _folders(tmp_path)
    if owned == "temporary folder":
        # the cache folder cannot be made (it would be below a file), and someone else made the fallback first
        (tmp_path / "a-file").write_text("")
        cache = tmp_path / "a-file" / "cache"
        target = _private(_fallback(tmp))
        planted = _put(target, built.name, built.planted)
        chown = [target, planted, target / f"{built.name}.sha256"]
    else:
        _private(cache)
        planted = _put(cache, built.name, built.planted)
        chown = [planted]
    try:
        for p in chown:
            os.chown(p, other, other)
    except PermissionError:
        pytest.skip("giving a file to another user needs root")
    out = _child(cache, tmp)
    assert not _planted_ran(tmp), f"a library another user owns ({owned}) was loaded"
    assert out["available"] and out["same"], out
    assert len(out["warnings"]) == 1 and f"uid {other}" in out["warnings"][0], out
    if owned == "temporary folder":  # built in a private folder, removed after loading
        assert sorted(p.name for p in tmp.iterdir()) == [_fallback(tmp).name]
    else:  # rebuilt in its place
        assert planted.stat().st_uid == os.getuid()
