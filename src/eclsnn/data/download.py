"""Fetch data set files from their official hosts, only when the user asks (`download=True`).

A file is written to a temporary name in the target folder, checked against its published MD5 and
only then renamed into place, so an interrupted or corrupted download never looks like a valid file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from eclsnn.errors import DataError

_CHUNK = 1 << 20


def download_file(url: str, target: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Download `url` to `target` atomically and verify its MD5; return `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https/http hosts)
                total = int(response.headers.get("Content-Length") or 0)
                _copy_with_progress(response, out, digest, total, target.name)
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"downloaded {url} but its MD5 is {digest.hexdigest()}, expected {md5}; the download is "
                f"corrupt or the host changed it. Try again, or fetch it by hand to {target}"
            )
        os.replace(tmp_name, target)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataError(
            f"could not download {url} ({err}). Check the network, or fetch the file by hand and put it "
            f"at {target} (then run without --download)"
        ) from err
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _copy_with_progress(response, out, digest, total: int, label: str) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {label}", leave=False) as bar:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
