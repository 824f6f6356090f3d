"""Where data sets are looked for, in one place, so that every loader searches the same folders.

Nothing is hard-coded per user: an explicit `data_dir` wins, then `$ECLSNN_DATA`, then the download
cache. Fashion-MNIST additionally falls back to the Debian/Ubuntu system package (see
`fashion_mnist.SYSTEM_DIR`).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ECLSNN_DATA"


def default_cache_dir() -> Path:
    """Folder that `download=True` fills when no data folder is given: ``$XDG_CACHE_HOME/eclsnn``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "eclsnn"


def _as_path(folder: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(folder)))


def search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders to search, best first: `data_dir`, `$ECLSNN_DATA`, the download cache (no duplicates)."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(_as_path(data_dir))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(_as_path(env))
    roots.append(default_cache_dir())
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def download_root(data_dir: str | os.PathLike | None) -> Path:
    """Folder a download goes to: `data_dir`, else `$ECLSNN_DATA`, else the cache."""
    if data_dir is not None:
        return _as_path(data_dir)
    env = os.environ.get(ENV_VAR)
    return _as_path(env) if env else default_cache_dir()


def format_places(places: list[Path]) -> str:
    """One indented line per searched place, for error messages."""
    return "\n".join(f"  - {place}" for place in places)
