"""LoRA / SHiRA through PEFT in the training loop, and the benchmark harness (smoke profile)."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffprune.recipe import TrainConfig
from diffprune.train import train

peft = pytest.importorskip("peft")
ROOT = Path(__file__).parent.parent


def bench(name: str):
    """A script of bench/ as a module, imported the way it imports its neighbours (with
    bench/ on the path)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _cfg(tiny_model_dir, tiny_glue, out, **kw):
    return TrainConfig(task="sst2", model=str(tiny_model_dir), data_dir=str(tiny_glue),
                       out=str(out), epochs=2, fixmask_epochs=1, **kw)


@pytest.mark.parametrize("method", ["lora", "shira"])
def test_peft_method_budget_artifact_and_reload(tiny_model_dir, tiny_glue, tmp_path, method):
    from peft import PeftModel

    from diffprune.data import get_task
    from diffprune.hf import head_config, load_model
    from diffprune.peers import linear_targets, params_per_rank
    res = train(_cfg(tiny_model_dir, tiny_glue, tmp_path / method, method=method, density=0.05,
                     lr_head=1e-2, lr_adapter=1e-2))
    base, tok = load_model(str(tiny_model_dir), head_config(get_task("sst2")))
    per_rank = params_per_rank(base, linear_targets(base))
    # the rank whose size is nearest the budget: no other rank comes closer
    budget = 0.05 * res["gated_params"]
    assert res["nnz"] == res["rank"] * per_rank
    assert abs(res["nnz"] - budget) <= per_rank / 2
    files = sorted(p.name for p in Path(res["artifact"]).iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert res["artifact_bytes"] == sum(p.stat().st_size
                                        for p in Path(res["artifact"]).iterdir())
    # PEFT's own loader on a fresh base reproduces the trained model's dev score
    model = PeftModel.from_pretrained(base, res["artifact"]).eval()
    from diffprune.data.batches import evaluate, tokenize
    from diffprune.data import load_task
    dev = load_task(get_task("sst2"), str(tiny_glue)).dev
    items = {k: tokenize(tok, v, 128) for k, v in dev.items()}
    score = evaluate(model, tok, get_task("sst2"), items, 8, torch.device("cpu"))["score"]
    assert score == pytest.approx(res["score"])
    assert res["trainable_params"] == res["stored_params"]


def test_peft_resume_gives_the_same_adapter(tiny_model_dir, tiny_glue, tmp_path):
    from safetensors.torch import load_file
    straight = train(_cfg(tiny_model_dir, tiny_glue, tmp_path / "a", method="lora"))
    with pytest.raises(Exception, match="stopped after step 3"):
        train(_cfg(tiny_model_dir, tiny_glue, tmp_path / "b", method="lora",
                   stop_after_steps=3))
    resumed = train(_cfg(tiny_model_dir, tiny_glue, tmp_path / "b", method="lora", resume=True))
    a = load_file(Path(straight["artifact"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["artifact"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_harness_smoke(tiny_model_dir, tiny_glue, tmp_path):
    out = tmp_path / "compare"
    cmd = [sys.executable, str(ROOT / "bench" / "compare.py"), "--profile", "smoke",
           "--model", str(tiny_model_dir), "--data-dir", str(tiny_glue), "--out", str(out)]
    subprocess.run(cmd + ["--jobs", "2"], check=True, capture_output=True)  # two at a time
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"sst2-full-s1", "sst2-diff-s-0.05-s1", "sst2-bitfit-s1",
                         "sst2-lora-s1"}
    for r in runs.values():  # every run recorded the columns of the table
        assert r["artifact_bytes"] > 0 and r["peak_memory_bytes"] > 0 and r["wall_time_s"] > 0
        assert r["train_steps"] == 12  # 48 examples, batch 8, two epochs (1 + 1 for diff)
    assert runs["sst2-diff-s-0.05-s1"]["nnz"] == round(0.05 * runs["sst2-diff-s-0.05-s1"]
                                                       ["gated_params"])
    report = (out / "results.md").read_text()
    for name in ("full finetuning", "diff pruning, structured 5%", "BitFit", "LoRA"):
        assert f"| {name}" in report
    assert (out / "score_vs_params.png").stat().st_size > 0
    assert (out / "nonzeros.png").stat().st_size > 0
    # a second call trains nothing: every run is found and reused
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "sst2 lora seed 1" in again.stdout
    assert json.loads((out / "runs" / "sst2-lora-s1.json").read_text()) == runs["sst2-lora-s1"]
    # --seeds adds runs of the methods named; the report averages each method over its seeds
    subprocess.run(cmd + ["--seeds", "2", "--methods", "bitfit"], check=True,
                   capture_output=True)
    assert {p.stem for p in (out / "runs").glob("*.json")} == set(runs) | {"sst2-bitfit-s2"}
    report = (out / "results.md").read_text()
    bitfit = next(line for line in report.splitlines() if line.startswith("| BitFit | "))
    assert bitfit.split(" | ")[1] == "2" and " ± " in bitfit
    assert next(line for line in report.splitlines()
                if line.startswith("| LoRA")).split(" | ")[1] == "1"
    assert "--seeds 2" in report and "`python bench/compare.py --profile smoke --model" in report
    # --methods can add a known variant the profile skips; the report keeps it afterwards
    subprocess.run(cmd + ["--methods", "diff-u-0.01"], check=True, capture_output=True)
    assert (out / "runs" / "sst2-diff-u-0.01-s1.json").exists()
    subprocess.run(cmd + ["--report-only"], check=True, capture_output=True)
    assert "| diff pruning, unstructured 1% | 1 |" in (out / "results.md").read_text()
    # the commands that trained runs, in order; --report-only trained nothing and adds none
    commands = json.loads((out / "results.json").read_text())["commands"]
    o = f" --out {out}"  # recorded whenever given: a rerun must write where the runs are
    assert [c.split(str(tiny_model_dir))[1] for c in commands] == [
        f"{o}", f" --methods bitfit --seeds 2{o}", f" --methods diff-u-0.01{o}"]
    bad = subprocess.run(cmd + ["--methods", "diff-x-0.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown method variant(s) ['diff-x-0.5']" in bad.stderr
    # --reuse takes a finished run with the same settings from elsewhere instead of training
    other = tmp_path / "other"
    cmd_other = [c if c != str(out) else str(other) for c in cmd]
    subprocess.run(cmd_other + ["--methods", "bitfit", "--reuse", str(out / "runs")],
                   check=True, capture_output=True)
    taken = json.loads((other / "runs" / "sst2-bitfit-s1.json").read_text())
    assert taken["reused_from"] == str(out / "runs" / "sst2-bitfit-s1.json")
    assert taken["score"] == runs["sst2-bitfit-s1"]["score"]
    assert not (other / "tmp" / "sst2-bitfit-s1").exists()  # nothing was trained
    # --set runs a study: its fields override the variant's, in a directory of its own
    study = tmp_path / "study"
    cmd_study = [c if c != str(out) else str(study) for c in cmd]
    # (--set given twice keeps both)
    subprocess.run(cmd_study + ["--methods", "bitfit", "--set", "lr_full=5e-4", "--set",
                                "lr_head=2e-4"], check=True, capture_output=True)
    config = json.loads((study / "runs" / "sst2-bitfit-s1.json").read_text())["config"]
    assert (config["lr_full"], config["lr_head"]) == (5e-4, 2e-4)  # BitFit's own: 1e-3, 1e-3
    assert json.loads((study / "results.json").read_text())["commands"][0].endswith(
        f"--methods bitfit --set lr_full=5e-4 lr_head=2e-4 --out {study}")
    for extra, message in ((["--set", "lr_full=5e-4"], "give the study its own --out"),
                           (["--out", str(study), "--set", "lr=1", "nope=2"], "'nope=2'"),
                           (["--tasks", "rte"], "task(s) ['rte'] not in the profile's")):
        bad = subprocess.run(cmd[:-2] + extra, capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr


def test_compare_profiles_epochs_rule():
    """Single-phase methods take both diff-pruning phases' epochs (equal steps), except in a
    profile that sets its own, as quick-paper does with the paper's 3 + 3 against 3."""
    compare = bench("compare")
    quick, paper = compare.PROFILES["quick"], compare.PROFILES["quick-paper"]
    assert compare.variant_config("full", quick)["epochs"] == 4
    assert compare.variant_config("lora", quick)["epochs"] == 4
    assert compare.variant_config("full", paper)["epochs"] == 3
    assert (paper.epochs, paper.fixmask_epochs) == (3, 3)
    assert "epochs" not in compare.variant_config("diff-s-0.005", paper)  # the profile's 3 + 3


def test_compare_peft_rates_follow_the_training_set_size():
    """SHiRA's rate: 5e-3 on the quick profile's 1,000-example sets, 2e-3 where a profile
    trains on the whole sets (the full profile); LoRA's 1e-3 and 5e-4; as measured at both
    sizes."""
    compare = bench("compare")
    quick, full = compare.PROFILES["quick"], compare.PROFILES["full"]
    assert compare.variant_config("shira", quick)["lr_adapter"] == 5e-3
    assert compare.variant_config("shira", full)["lr_adapter"] == 2e-3
    assert compare.variant_config("lora", quick)["lr_adapter"] == 1e-3
    assert compare.variant_config("lora", full)["lr_adapter"] == 5e-4


def test_compare_magnitude_at_other_densities():
    """"magnitude" is the baseline at 0.5%; magnitude-D runs it at another density D, and
    the report labels each by its density."""
    compare, report = bench("compare"), bench("report")
    quick = compare.PROFILES["quick"]
    assert compare.variant_config("magnitude", quick) == {"method": "magnitude", "density": 0.005}
    assert compare.variant_config("magnitude-0.001", quick) == {"method": "magnitude",
                                                                "density": 0.001}
    assert "magnitude-0.001" in compare.ALL_METHODS and "magnitude-0.005" not in compare.ALL_METHODS
    assert [report.label(v) for v in ("magnitude", "magnitude-0.001", "magnitude-0.0025")] == \
        ["magnitude (0.5%)", "magnitude (0.1%)", "magnitude (0.25%)"]
