"""bench/curves.py tabulates the dev score after every epoch of compare.py's runs."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("curves", ROOT / "bench" / "curves.py")
curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curves)


def _run(directory: Path, seed: int, score: float, epochs=None) -> None:
    (directory / "runs").mkdir(parents=True, exist_ok=True)
    rec = {"variant": "diff-s-0.005", "task": "cola", "seed": seed, "score": score}
    if epochs is not None:
        rec["epochs"] = epochs
    (directory / "runs" / f"cola-diff-s-0.005-s{seed}.json").write_text(json.dumps(rec))


def _eval(phase, epoch, score):
    return json.dumps({"event": "eval", "phase": phase, "epoch": epoch,
                       "dev": {"score": score}})


def test_curves_from_records_logs_and_neither(tmp_path):
    d = tmp_path / "study"
    _run(d, 1, 30.0, [{"phase": "l0", "epoch": 0, "score": 5.0},
                      {"phase": "fixmask", "epoch": 0, "score": 30.0}])
    _run(d, 2, 25.0)  # an older run: its curve is in tmp/.../metrics.jsonl
    log = d / "tmp" / "cola-diff-s-0.005-s2" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join([
        json.dumps({"phase": "l0", "epoch": 0, "step": 50, "loss": 0.6}),
        _eval("l0", 0, 1.0),
        _eval("l0", 0, 2.0),  # evaluated again after a kill before the checkpoint: this counts
        _eval("fixmask", 0, 25.0),
        '{"event": "eval", "pha']))  # a line cut by a kill
    _run(d, 3, 20.0)  # neither
    text = curves.main([f"{d}:diff-s-0.005", "--tasks", "cola", "--out", str(tmp_path / "c.md")])
    rows = [line for line in text.splitlines() if line.startswith(f"| {d}")]
    assert rows == [f"| {d}:diff-s-0.005 | 1 | l0 1: 5.00 | fixmask 1: 30.00 | 30.00 |",
                    f"| {d}:diff-s-0.005 | 2 | l0 1: 2.00 | fixmask 1: 25.00 | 25.00 |",
                    f"| {d}:diff-s-0.005 | 3 |  |  | 20.00 |"]
    saved = (tmp_path / "c.md").read_text()
    assert saved.startswith("Command: `python bench/curves.py ") and text in saved


def test_unknown_task_and_variant_are_named(tmp_path):
    d = tmp_path / "study"
    _run(d, 1, 30.0)
    with pytest.raises(SystemExit, match="rte"):
        curves.main([f"{d}:diff-s-0.005", "--tasks", "rte"])
    with pytest.raises(SystemExit, match="full"):
        curves.main([f"{d}:full"])
