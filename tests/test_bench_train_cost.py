"""bench/train_cost.py's summary: ratios to the mean of full finetuning's processes in each
round, the median over rounds, and the report rebuilt from a saved results.json."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_cost", ROOT / "bench" / "train_cost.py")
train_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_cost)


def run(step_s, peak=1000.0):
    return {"step_s": step_s, "peak_rss_mb": peak, "peak_train_rss_mb": peak,
            "step_s_all": [step_s]}


ROUNDS = [{"full": run(1.0), "full_again": run(1.2), "l0": run(1.21, 1200.0)},
          {"full": run(2.0), "full_again": run(2.0), "l0": run(2.2, 1300.0)},
          {"full": run(1.0), "full_again": run(1.0), "l0": run(1.5, 1100.0)}]


def test_each_round_is_compared_with_the_mean_of_its_full_finetuning_processes():
    bases = [train_cost._base(r) for r in ROUNDS]
    assert [b["step_s"] for b in bases] == [1.1, 2.0, 1.0]
    row = train_cost.summarise("l0", [r["l0"] for r in ROUNDS], bases, 32, 128)
    assert [round(x, 6) for x in row["time_ratio_rounds"]] == [1.1, 1.1, 1.5]
    assert round(row["time_ratio"], 6) == 1.1  # the median of the rounds' ratios
    assert row["step_s"] == 1.5 and row["peak_rss_mb"] == 1200.0
    assert round(row["memory_ratio"], 6) == 1.2


def test_the_report_is_written_again_from_the_saved_measurements(tmp_path, monkeypatch):
    rows = [train_cost.summarise(c, [r[c] for r in ROUNDS],
                                 [train_cost._base(r) for r in ROUNDS], 32, 128)
            for c in ROUNDS[0]]
    # a results.json from before "measured" was kept: the rows carry their rounds
    (tmp_path / "results.json").write_text(json.dumps({"command": "python x", "rows": rows}))
    monkeypatch.setattr(sys, "argv", ["train_cost.py", "--report-only", "--out", str(tmp_path)])
    train_cost.main()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["measured"] == [{"batch": 32, "rounds": ROUNDS}]
    assert [r["time_ratio"] for r in saved["rows"]] == [r["time_ratio"] for r in rows]
    md = (tmp_path / "results.md").read_text()
    assert "| 32 | l0 | 1500.0 | 1.10 |" in md and "1.10 / 1.10 / 1.50" in md
    # a run from before the machine was recorded says so; a recorded one is kept as it was
    assert saved["machine"] == "not recorded" and "Machine: not recorded." in md
    saved["machine"] = "Some CPU @ 2.0GHz, 2 cores, torch 2.13.0"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    train_cost.main()
    assert "Machine: Some CPU @ 2.0GHz, 2 cores" in (tmp_path / "results.md").read_text()


def test_the_machine_is_named_with_its_cores_and_torch():
    import torch
    assert train_cost.machine().endswith(f", {os.cpu_count()} cores, torch {torch.__version__}")


def test_full_traffic_is_not_a_full_process_and_its_hooks_time_is_taken_off():
    assert train_cost.is_full("full_again") and not train_cost.is_full("full_traffic")
    rounds = [{"full": run(1.0), "full_traffic": dict(run(1.3), step_s_all=[1.3, 1.4],
                                                      traffic_s_all=[0.2, 0.1])}]
    bases = [train_cost._base(r) for r in rounds]
    assert bases[0]["step_s"] == 1.0  # full_traffic is not averaged into the base
    row = train_cost.summarise("full_traffic", [rounds[0]["full_traffic"]], bases, 32, 128)
    assert round(row["traffic_s"], 6) == 0.15
    assert round(row["less_traffic_ratio"], 6) == 1.2  # median of 1.1 and 1.3


def test_each_batch_size_is_saved_as_it_finishes(tmp_path, monkeypatch, capsys):
    def measure_all(args, batch, turn=0):
        if batch == 32:  # as a caller's time limit would stop it
            raise KeyboardInterrupt
        return ROUNDS[0]
    monkeypatch.setattr(train_cost, "measure_all", measure_all)
    monkeypatch.setattr(train_cost, "machine", lambda device: "a test machine")
    monkeypatch.setattr(sys, "argv", ["train_cost.py", "--batch-sizes", "8", "32", "--out",
                                      str(tmp_path)])
    try:
        train_cost.main()
    except KeyboardInterrupt:
        pass
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [m["batch"] for m in saved["measured"]] == [8]
    assert [(r["batch"], r["config"]) for r in saved["rows"]] == [
        (8, "full"), (8, "full_again"), (8, "l0")]
    assert "| 8 | l0 | 1210.0 | 1.10 |" in (tmp_path / "results.md").read_text()
    assert "batch   8 l0" in capsys.readouterr().out


def test_a_tiny_random_model_runs_every_stage_and_reports_its_progress(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_cost.py"), "--model", "random:tiny",
         "--batch-sizes", "2", "--length", "8", "--steps", "1",
         "--configs", "full", "l0_structured", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch 2: l0_structured set up in" in out.stderr
    assert "batch 2: l0_structured warm-up step 3 took" in out.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["full", "l0_structured"]
    assert all(r["step_s"] > 0 for r in rows)


def test_a_configuration_whose_process_dies_is_named(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_cost.py"), "--model", "random:nonesuch",
         "--batch-sizes", "2", "--steps", "1", "--configs", "full", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown random model 'nonesuch'" in out.stderr  # the child's own error
    assert "batch 2: the process of full ended (exit code 1" in out.stderr
    assert "Traceback" not in out.stderr.split("unknown random model")[1]
