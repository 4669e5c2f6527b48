"""bench/pair.py pairs runs of two result directories on the seeds both finished."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pair", ROOT / "bench" / "pair.py")
pair = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pair)


def write_runs(directory: Path, variant: str, scores: dict) -> None:
    """scores: {(task, seed): score} as compare.py's run records."""
    (directory / "runs").mkdir(parents=True, exist_ok=True)
    for (task, seed), score in scores.items():
        (directory / "runs" / f"{task}-{variant}-s{seed}.json").write_text(
            json.dumps({"variant": variant, "task": task, "seed": seed, "score": score}))


def test_pairs_across_directories_on_shared_complete_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_runs(a, "diff-s-0.005", {("rte", 1): 60.0, ("cola", 1): 30.0,
                                   ("rte", 2): 58.0, ("cola", 2): 20.0,
                                   ("rte", 3): 50.0})           # seed 3 lacks cola
    write_runs(a, "shira", {("rte", 1): 0.0, ("cola", 1): 0.0})  # same dir, other variant
    write_runs(b, "shira", {("rte", 1): 56.0, ("cola", 1): 32.0,
                            ("rte", 2): 58.0, ("cola", 2): 24.0,
                            ("rte", 3): 40.0, ("cola", 3): 10.0})
    out = tmp_path / "pairs" / "x.md"
    result = pair.main([f"{a}:diff-s-0.005", f"{b}:shira", "--tasks", "rte", "cola",
                        "--out", str(out)])
    assert result["seeds"] == [1, 2]
    assert result["per_seed"] == pytest.approx([1.0, -2.0])  # (4 - 2) / 2, (0 - 4) / 2
    assert result["mean"] == pytest.approx(-0.5)
    assert (result["better"], result["same"], result["worse"]) == (1, 1, 2)
    assert result["per_task"]["cola"]["difference"] == pytest.approx(-3.0)
    assert result["average"] == pytest.approx({"a": 42.0, "b": 42.5})
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].startswith("python bench/pair.py ") and saved["seeds"] == [1, 2]
    assert "| difference | +2.00 | -3.00 | -0.50 |" in out.read_text()


def test_bad_input_is_named(tmp_path):
    write_runs(tmp_path / "a", "full", {("rte", 1): 1.0})
    with pytest.raises(SystemExit, match="DIR:VARIANT"):
        pair.parse_side("no-colon")
    with pytest.raises(SystemExit, match="no runs/ directory"):
        pair.load(tmp_path / "missing", "full", "a")
    with pytest.raises(SystemExit, match="no finished runs of variant 'lora'"):
        pair.load(tmp_path / "a", "lora", "a")
    write_runs(tmp_path / "b", "full", {("cola", 1): 1.0})
    with pytest.raises(SystemExit, match="no seed has every task"):
        pair.main([f"{tmp_path / 'a'}:full", f"{tmp_path / 'b'}:full", "--tasks", "rte"])
