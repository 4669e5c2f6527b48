"""bench/runs.py: which finished runs another harness may take instead of training."""
import importlib.util
import json
import sys
from pathlib import Path

from diffprune.recipe import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("runs", ROOT / "bench" / "runs.py")
runs = importlib.util.module_from_spec(spec)
sys.modules["runs"] = runs
spec.loader.exec_module(runs)


def test_settings_leave_out_the_phases_a_method_does_not_have():
    def same(method, **change):
        return runs.settings(TrainConfig(method=method)) == \
            runs.settings(TrainConfig(method=method, **change))
    # full finetuning has neither an L0 nor a fixed-mask phase
    assert same("full", lr_fixmask=5e-4) and same("full", fixmask_epochs=1)
    assert same("full", lr=1.0) and not same("full", lr_full=1e-4)
    # magnitude has a fixed-mask phase and no L0 phase; diff pruning has both
    assert not same("magnitude", lr_fixmask=5e-4) and same("magnitude", lr=1.0)
    assert not same("diff", lr_fixmask=5e-4) and not same("diff", lr=1.0)
    assert not same("diff", fixmask_epochs=1)
    # where the data lies does not matter; what the run trains on does
    assert same("diff", data_dir="/elsewhere") and not same("diff", max_train_samples=10)


def test_a_run_is_reused_only_with_the_settings_it_was_trained_with(tmp_path):
    full = TrainConfig(method="full", task="sst2", seed=3)
    (tmp_path / "sst2-full-s3.json").write_text(json.dumps(
        {"score": 80.0, "config": json.loads(json.dumps(full.__dict__))}))
    (tmp_path / "notes.json").write_text("{}")  # a JSON without a config is skipped
    taken = runs.reusable(TrainConfig(method="full", task="sst2", seed=3, lr_fixmask=5e-4),
                          [str(tmp_path)])
    assert taken["score"] == 80.0
    assert taken["reused_from"] == str(tmp_path / "sst2-full-s3.json")
    assert runs.reusable(TrainConfig(method="full", task="sst2", seed=4), [str(tmp_path)]) is None
