"""Two CPU processes (gloo, DistributedDataParallel) train the same diff as one process.

With dropout off, the only randomness left is the data order (one global permutation) and the
gate noise (one generator seeded alike on every rank), so a 2-process run with the same global
batch must reach the diff of a 1-process run up to float rounding: each rank pads its half
batch on its own and DDP averages the two half-batch gradients. Tolerance: identical nonzero
positions, values within 1e-5 (they are of order 1e-2 after these steps).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import write_tiny_model_dir
from diffprune import SparseDiff


def _train(args: list[str], procs: int, out, check: bool = True, env: dict | None = None):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable])
    cmd = launch + ["-m", "diffprune.cli", "train", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _assert_same(a: SparseDiff, b: SparseDiff, atol: float) -> None:
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta.indices, tb.indices), ta.name
        torch.testing.assert_close(ta.values, tb.values, atol=atol, rtol=0)
    for k in a.dense:
        torch.testing.assert_close(a.dense[k], b.dense[k], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_glue):
    root = tmp_path_factory.mktemp("ddp")
    # 4,096 x 16 word embeddings: large enough to be gated by the rows a batch reads (rows.py;
    # the gates' AdamW step, averaged across ranks, then runs after backward)
    model = write_tiny_model_dir(root / "model", dropout=0.0, vocab_size=4096)
    args = ["--task", "sst2", "--model", str(model), "--data-dir", str(tiny_glue),
            "--epochs", "2", "--fixmask-epochs", "1", "--density", "0.05", "--batch-size", "8",
            "--lr", "1e-2", "--lr-fixmask", "1e-2", "--lr-head", "1e-2", "--save-every", "2"]
    _train(args, 1, root / "single")
    _train(args, 2, root / "ddp")
    return root, args


def test_two_processes_train_the_single_process_diff(runs):
    root, _ = runs
    single, ddp = SparseDiff.load(root / "single" / "diff"), SparseDiff.load(root / "ddp" / "diff")
    assert single.nnz == ddp.nnz > 0
    assert max(float(t.values.abs().max()) for t in single.tensors if t.values.numel()) > 1e-3
    _assert_same(single, ddp, atol=1e-5)  # it did train, and the same way
    # both stepped the gates inside backward (under DDP: span gradients averaged there)
    for run in ("single", "ddp"):
        assert json.loads((root / run / "results.json").read_text())["gate_step_in_backward"]
    # rank 0 wrote everything once; no rank left a temp directory behind
    assert not [p for p in (root / "ddp").iterdir() if p.name.startswith(".")]


def test_two_process_run_resumes_from_its_checkpoint(runs):
    root, args = runs
    stopped = _train(args + ["--stop-after-steps", "7"], 2, root / "resumed", check=False)
    # each rank exits 130 after the checkpoint barrier; torchrun itself then reports 1
    assert stopped.returncode != 0 and "stopped after step 7" in stopped.stderr
    assert (root / "resumed" / "checkpoint" / "trainer_state.json").is_file()
    assert not (root / "resumed" / "diff").exists()
    # another number of processes is refused (dropout RNG and batch split are per rank)
    wrong = _train(args + ["--resume"], 1, root / "resumed", check=False)
    assert wrong.returncode == 2 and "trained by 2 processes" in wrong.stderr
    _train(args + ["--resume"], 2, root / "resumed")
    _assert_same(SparseDiff.load(root / "ddp" / "diff"),
                 SparseDiff.load(root / "resumed" / "diff"), atol=1e-6)


def test_two_processes_on_the_accelerators_path_train_the_single_process_diff(runs):
    """The same on the GPU's code path (flat.py, run on CPU): the gate logits' gradient is
    averaged across ranks once for all of them inside backward."""
    root, args = runs
    env = {"DIFFPRUNE_FLAT_ON_CPU": "1"}
    _train(args, 1, root / "flat-single", env=env)
    _train(args, 2, root / "flat-ddp", env=env)
    single = SparseDiff.load(root / "flat-single" / "diff")
    per_target = SparseDiff.load(root / "single" / "diff")
    assert single.nnz == per_target.nnz > 0  # another path: other noise, another diff
    assert any(not torch.equal(a.values, b.values)
               for a, b in zip(single.tensors, per_target.tensors))
    _assert_same(single, SparseDiff.load(root / "flat-ddp" / "diff"), atol=1e-5)
