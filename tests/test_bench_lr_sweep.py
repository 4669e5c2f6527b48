"""bench/lr_sweep.py: a row per method and rate, the scores and average from the runs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "lr_sweep.py"


def _run(tmp_path, name, task, method, score, **cfg):
    config = {"task": task, "method": method, "seed": 1, "structured": True,
              "density": 0.005, "lr_fixmask": 1e-3, "lr_adapter": 5e-4, "lr_full": 5e-5, **cfg}
    (tmp_path / f"{name}.json").write_text(json.dumps(
        {"config": config, "score": score, "train_examples": 1000}))


def _table(runs, out):
    res = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs), "--out", str(out)],
                         capture_output=True, text=True)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in out.read_text().splitlines()[1:] if line.startswith("| ")] \
        if res.returncode == 0 else None
    return res, rows


def test_rows_pivot_tasks_and_average_only_when_complete(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for task, score in (("rte", 50.0), ("cola", 10.0)):
        _run(runs, f"l5-{task}", task, "lora", score)
        _run(runs, f"l2-{task}", task, "lora", score + 1, lr_adapter=2e-3)
    _run(runs, "d-rte", "rte", "diff", 55.0, lr_fixmask=2e-3)
    res, rows = _table(runs, tmp_path / "results.md")
    assert res.returncode == 0, res.stderr
    head, body = rows[0], rows[1:]
    assert head[4:] == ["rte", "cola", "average"]  # the quick profile's task order
    by_rate = {(r[0], r[1]): r for r in body}
    assert by_rate[("lora", "lr_adapter = 0.0005")][4:] == ["50.00", "10.00", "30.00"]
    assert by_rate[("lora", "lr_adapter = 0.002")][4:] == ["51.00", "11.00", "31.00"]
    # a method with a task missing gets no average
    assert by_rate[("diff structured 0.005", "lr_fixmask = 0.002")][4:] == ["55.00", "", ""]


def test_two_runs_of_one_cell_are_an_error(tmp_path):
    _run(tmp_path, "a", "rte", "full", 50.0)
    _run(tmp_path, "b", "rte", "full", 51.0)
    res, _ = _table(tmp_path, tmp_path / "x.md")
    assert res.returncode != 0 and "two runs of rte" in res.stderr


def test_empty_directory_is_an_error(tmp_path):
    res, _ = _table(tmp_path, tmp_path / "x.md")
    assert res.returncode != 0 and "no results JSON files" in res.stderr
