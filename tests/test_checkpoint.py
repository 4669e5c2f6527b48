"""Checkpoints and atomic directories: a checkpoint is whole or absent, never half-written."""
import os
import time

import pytest
import torch

from diffprune.checkpoint import load_checkpoint, save_checkpoint
from diffprune.fileio import STALE_S, atomic_dir


def test_checkpoint_round_trip_overwrites_in_place(tmp_path):
    path = tmp_path / "ckpt"
    first = {"w": torch.randn(3, 4), "opt.0.exp_avg": torch.randn(7).double(),
             "rng.cpu": torch.get_rng_state()}
    save_checkpoint(path, first, {"step": 1})
    second = {k: v + 1 if v.is_floating_point() else v for k, v in first.items()}
    save_checkpoint(path, second, {"step": 2})
    tensors, state = load_checkpoint(path)
    assert state == {"step": 2} and tensors.keys() == second.keys()
    assert all(torch.equal(tensors[k], second[k]) for k in second)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp leftovers


def test_a_failed_write_leaves_the_last_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"w": torch.ones(2)}, {"step": 1})
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses these
        t = torch.zeros(4)
        save_checkpoint(path, {"a": t, "b": t}, {"step": 2})
    tensors, state = load_checkpoint(path)
    assert state == {"step": 1} and torch.equal(tensors["w"], torch.ones(2))
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(path) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert load_checkpoint(path)[1] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_takes_subdirectories(tmp_path):
    path = tmp_path / "model"
    with atomic_dir(path) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
        (tmp / "weights").write_bytes(b"w")
    assert (path / "sub" / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_removes_a_killed_writes_stale_temp_directories(tmp_path):
    path = tmp_path / "checkpoint"
    stale, young = tmp_path / ".checkpoint.tmp-killed", tmp_path / ".checkpoint.old-young"
    for tmp in (stale, young):
        tmp.mkdir()
        (tmp / "tensors.safetensors").write_bytes(b"x")
    day_ago = time.time() - STALE_S - 60
    for p in (stale, stale / "tensors.safetensors"):
        os.utime(p, (day_ago, day_ago))
    with atomic_dir(path) as tmp:
        (tmp / "state.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.old-young", "checkpoint"]
