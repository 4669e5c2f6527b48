"""bench/task_switch.py's helpers: untimed set-up before every timed call, page-cache eviction."""
import ctypes
import ctypes.util
import importlib.util
import mmap
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("task_switch", ROOT / "bench" / "task_switch.py")
task_switch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_switch)


def test_before_runs_ahead_of_every_call_and_is_not_timed():
    log = []
    res = task_switch.timed(lambda: log.append("fn"), 3, before=lambda: log.append("before"))
    assert log == ["before", "fn"] * 4  # one warm-up call, then 3 timed ones
    assert res["n"] == 3 and res["median_ms"] >= 0


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) on a fresh mapping)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def on_tmpfs(path: Path) -> bool:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] in ("tmpfs", "ramfs")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise")
def test_eviction_empties_the_page_cache_and_keeps_the_files(tmp_path):
    if on_tmpfs(tmp_path):
        pytest.skip("files on tmpfs live in the page cache")
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.bin", tmp_path / "sub" / "b.bin"]
    data = os.urandom(64 * mmap.PAGESIZE)
    for f in files:
        f.write_bytes(data)  # just written: dirty, in the cache
        assert resident_pages(f) == 64
    task_switch.evict_from_page_cache(str(tmp_path))
    for f in files:
        assert resident_pages(f) == 0
        assert f.read_bytes() == data
        assert resident_pages(f) == 64
