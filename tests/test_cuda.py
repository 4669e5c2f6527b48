"""Training on a GPU under bf16 autocast. Skipped where no GPU is present (CI has none;
bench/README.md, session 26, says where it ran). The gates' own GPU tests are in
test_fused.py and test_flat.py, beside their CPU versions."""
import json

import pytest
import torch

import diffprune as dp
from diffprune.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_training_on_the_gpu_gives_a_diff_that_scores_the_same_on_the_cpu(
        tmp_path, tiny_model_dir, tiny_glue, capsys):
    """Diff pruning on CUDA under bf16 autocast (precision auto), both phases: exactly k
    nonzeros, and the saved diff applied on the CPU scores what the trainer measured."""
    out = tmp_path / "run"
    assert main(["-q", "train", "--task", "sst2", "--data-dir", str(tiny_glue), "--model",
                 str(tiny_model_dir), "--out", str(out), "--epochs", "2", "--fixmask-epochs",
                 "1", "--batch-size", "8", "--density", "0.05", "--lr", "1e-2",
                 "--lr-fixmask", "1e-2", "--device", "cuda"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["nnz"] == round(0.05 * results["gated_params"])
    assert results["peak_memory_bytes"] > 0 and results["config"]["device"] == "cuda"
    diff = dp.SparseDiff.load(out / "diff")
    assert sum(int(t.values.ne(0).sum()) for t in diff.tensors) > 0
    capsys.readouterr()
    assert main(["-q", "eval", str(out / "diff"), "--data-dir", str(tiny_glue)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(results["score"],
                                                                         abs=1e-9)
