"""Dev score after every epoch of bench/compare.py runs: the learning curves behind a table.

    python bench/curves.py bench/results/compare/quick-fullset:diff-s-0.005 \
        bench/results/compare/quick-fullset:full --tasks cola

prints one markdown table per task: a row per run (side and seed), a column per epoch of
each phase (diff pruning: L0 epochs, then fixed-mask epochs), and the run's score (the best
epoch of its last phase). Runs trained since the trainer wrote ``epochs`` into results.json
carry their curve in the run JSON; for older runs it is read from the run's
``metrics.jsonl`` under the directory's tmp/ (not committed), and a run with neither shows
its final score alone. ``--out FILE`` also writes the tables, with the command, atomically.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pair  # noqa: E402  (bench/pair.py)


def curve(record: dict, directory: Path) -> list[dict] | None:
    """[{phase, epoch, score}] of a run record, from the record or else from its
    metrics.jsonl under ``directory``/tmp (the last record of an epoch counts: a run killed
    between an epoch's evaluation and its checkpoint evaluates that epoch again)."""
    if record.get("epochs"):
        return record["epochs"]
    stem = f"{record['task']}-{record['variant']}-s{record['seed']}"
    log = directory / "tmp" / stem / "metrics.jsonl"
    if not log.exists():
        return None
    last: dict[tuple, dict] = {}
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if e.get("event") == "eval":
            last[e["phase"], e["epoch"]] = {"phase": e["phase"], "epoch": e["epoch"],
                                            "score": e["dev"]["score"]}
    return list(last.values()) or None


def load(side: str) -> list[tuple[str, dict, list[dict] | None]]:
    """(side, run record, curve) of every run of DIR:VARIANT."""
    directory, variant = pair.parse_side(side)
    return [(side, rec, curve(rec, directory)) for rec in pair.load(directory, variant, variant)]


def _column(e: dict) -> str:
    return f"{e['phase']} {e['epoch'] + 1}"


def tables(runs: list[tuple[str, dict, list[dict] | None]], tasks: list[str] | None) -> str:
    """One markdown table per task, rows in the order of the sides, then by seed."""
    order = {side: i for i, side in enumerate(dict.fromkeys(s for s, _, _ in runs))}
    found = sorted({rec["task"] for _, rec, _ in runs})
    missing = [t for t in tasks or () if t not in found]
    if missing:
        raise SystemExit(f"no runs of task(s) {missing}; found {found}")
    blocks = []
    for task in tasks or found:
        rows = sorted(((s, r, c) for s, r, c in runs if r["task"] == task),
                      key=lambda x: (order[x[0]], x[1]["seed"]))
        width = max((len(c) for _, _, c in rows if c), default=0)
        lines = [f"### {task}", "",
                 "| run | seed | " + " | ".join(f"epoch {i + 1}" for i in range(width))
                 + (" | " if width else "") + "score |",
                 "|---|---|" + "---|" * width + "---|"]
        for side, rec, c in rows:
            cells = [f"{_column(e)}: {e['score']:.2f}" for e in c or ()]
            cells += [""] * (width - len(cells))
            lines.append(f"| {side} | {rec['seed']} | " + "".join(x + " | " for x in cells)
                         + f"{rec['score']:.2f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sides", nargs="+", metavar="DIR:VARIANT")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    runs = [run for side in a.sides for run in load(side)]
    text = tables(runs, a.tasks)
    print(text, end="")
    if a.out:
        command = "python bench/curves.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        from diffprune.fileio import atomic_write_bytes
        atomic_write_bytes(a.out, f"Command: `{command}`\n\n{text}".encode())
    return text


if __name__ == "__main__":
    main()
