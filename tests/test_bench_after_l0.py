"""bench/after_l0.py: one row per committed run, the numbers taken from its results.json."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "after_l0.py"
RUNS = ROOT / "bench" / "results" / "after_l0" / "runs"


def test_table_has_a_row_per_run_with_its_scores(tmp_path):
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, str(SCRIPT), "--runs", str(RUNS), "--out", str(out)],
                   check=True, capture_output=True)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    runs = sorted(RUNS.glob("*.json"))
    assert len(rows) == len(runs) > 0
    for line, path in zip(rows, runs):
        r = json.loads(path.read_text())
        first = r["phases"].get("l0") or r["phases"]["dense"]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == path.stem and cells[1] == r["config"]["task"]
        assert cells[6] == f"{first['dev']['score']:.2f}"


def test_empty_directory_is_an_error(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path),
                          "--out", str(tmp_path / "x.md")], capture_output=True, text=True)
    assert res.returncode != 0 and "no results JSON files" in res.stderr
