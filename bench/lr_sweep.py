"""Tabulate learning-rate sweeps: one row per method and rate, one column per task.

Issue 4's comparison should give every method the same tuning effort. The rates behind the
quick profile's defaults were picked on seed 1 of its 1,000-example sets, one `diffprune train`
command per run (commands in bench/README.md, "Session 7" and "Session 9"). This script reads
their `results.json` copies in bench/results/lr_sweep/runs/NAME.json and writes
bench/results/lr_sweep/results.md: for each method, the rate its trained phase used (the
fixed-mask phase's for diff pruning, the adapter's for LoRA and SHiRA, the dense one's for
full finetuning and BitFit), the dev score per task and the average where every task ran.

  python bench/lr_sweep.py                       # the committed runs
  python bench/lr_sweep.py --runs DIR --out FILE # any directory of results.json copies
"""
from __future__ import annotations

from pathlib import Path

from runs import table_main  # bench/runs.py

HERE = Path(__file__).parent / "results" / "lr_sweep"
TASK_ORDER = ("rte", "mrpc", "stsb", "cola", "sst2")  # the quick profile's column order
# the config field holding the rate of the phase a method's final model comes from
RATE = {"diff": "lr_fixmask", "magnitude": "lr_fixmask", "random": "lr_fixmask",
        "lora": "lr_adapter", "shira": "lr_adapter", "full": "lr_full", "bitfit": "lr_full"}


def key(r: dict) -> tuple:
    """(method label, rate field, rate, seed, training examples) of one run."""
    cfg = r["config"]
    method = cfg["method"]
    if method == "diff":
        method += f" {'structured' if cfg['structured'] else 'unstructured'} {cfg['density']:g}"
    field = RATE[cfg["method"]]
    return method, field, cfg[field], cfg["seed"], r["train_examples"]


def pivot(runs: list[dict]) -> tuple[list[str], dict[tuple, dict[str, float]]]:
    """The task columns in order, and {row key: {task: score}}; a (key, task) seen twice is an
    error, since the table could only show one of them."""
    rows: dict[tuple, dict[str, float]] = {}
    for r in runs:
        cells = rows.setdefault(key(r), {})
        task = r["config"]["task"]
        if task in cells:
            raise SystemExit(f"two runs of {task} for {key(r)}: keep one in the runs directory")
        cells[task] = r["score"]
    seen = {t for cells in rows.values() for t in cells}
    tasks = [t for t in TASK_ORDER if t in seen] + sorted(seen - set(TASK_ORDER))
    return tasks, rows


def table(runs: list[tuple[str, dict]]) -> str:
    tasks, rows = pivot([r for _, r in runs])
    head = ["method", "rate", "seed", "train examples", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(rows, key=lambda k: (k[0], k[3], k[4], k[2])):
        cells = rows[k]
        scores = [f"{cells[t]:.2f}" if t in cells else "" for t in tasks]
        average = (f"{sum(cells[t] for t in tasks) / len(tasks):.2f}"
                   if all(t in cells for t in tasks) else "")
        lines.append("| " + " | ".join([k[0], f"{k[1]} = {k[2]:g}", str(k[3]), f"{k[4]:,}",
                                         *scores, average]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    table_main(argv, __doc__, HERE,
               "# Learning-rate sweeps behind the quick profile's rates (issue 4)\n\n"
               "Written by `python bench/lr_sweep.py` from the runs' `results.json` copies in "
               "`runs/`; the commands that trained them are in bench/README.md (\"Session 7\", "
               "\"Session 9\"). Scores: each task's dev metric (best epoch of the final phase), "
               "percent. `rate`: the learning rate of the phase the final model comes from "
               "(diff pruning: the fixed-mask phase; LoRA and SHiRA: the adapter; full "
               "finetuning and BitFit: the dense phase).\n\n",
               table)


if __name__ == "__main__":
    main()
