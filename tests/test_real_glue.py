"""Real GLUE data with the packaged MiniLM (marked slow; needs GLUE_DIR)."""
import json
import os

import pytest

from diffprune.cli import main
from diffprune.data import get_task, load_task

GLUE_DIR = os.environ.get("GLUE_DIR")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not GLUE_DIR or not os.path.isdir(os.path.join(GLUE_DIR or "",
                                                                                 "SST-2")),
                                 reason="needs GLUE_DIR with SST-2 (real GLUE data)")]


def test_minilm_diff_pruning_beats_majority_on_sst2_subset(tmp_path):
    out = tmp_path / "sst2"
    rc = main(["-q", "train", "--task", "sst2", "--data-dir", GLUE_DIR, "--out", str(out),
               "--max-train-samples", "2000", "--epochs", "2", "--fixmask-epochs", "2"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    dev = load_task(get_task("sst2"), GLUE_DIR).dev["dev"]
    positive = sum(r["label"] for r in dev)
    majority = 100 * max(positive, len(dev) - positive) / len(dev)  # 50.9% on SST-2 dev
    assert results["score"] > majority + 15, (results["score"], majority)
    assert results["nnz"] == round(0.005 * results["gated_params"])
