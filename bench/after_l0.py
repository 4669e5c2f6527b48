"""Tabulate single `diffprune train` runs: the score after the L0 phase next to finetuning.

Issue 7 asks that the model after the L0 phase alone (before projection) come within 2 points
of full finetuning. Those comparisons were trained one `diffprune train` command at a time
(commands in bench/README.md, "Session 5", "Session 6" and "Session 8"); this script reads their
`results.json` files, copied to bench/results/after_l0/runs/NAME.json, and writes one row per
run to bench/results/after_l0/results.md.

  python bench/after_l0.py                       # the committed runs
  python bench/after_l0.py --runs DIR --out FILE # any directory of results.json copies
"""
from __future__ import annotations

from pathlib import Path

from runs import table_main  # bench/runs.py

HERE = Path(__file__).parent / "results" / "after_l0"
COLUMNS = ("run", "task", "method", "seed", "train examples", "epochs (L0 + fixed mask)",
           "after L0 / dense", "final", "E[density] after L0", "kept by delta / by fill",
           "lr (w or body) / head / controller warm-up")


def _fmt(x, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def row(name: str, r: dict) -> list[str]:
    """One table row from a run's results.json (diff runs have an `l0` phase, others `dense`)."""
    cfg, phases, proj = r["config"], r["phases"], r.get("projection") or {}
    first = phases.get("l0") or phases.get("dense") or {}
    epochs = str(cfg["epochs"])
    if "l0" in phases:
        epochs += f" + {cfg['fixmask_epochs']}"
    final = phases["fixmask"]["dev"]["score"] if "fixmask" in phases else None
    kept = f"{proj['by_delta']:,} / {proj['by_fill']:,}" if "by_delta" in proj else ""
    density = first.get("expected_density") if "l0" in phases else None
    if "l0" in phases:
        rates = f"{cfg['lr']:g} / {cfg['lr_head']:g} / {cfg['controller_warmup']:g}"
    else:
        rates = f"{cfg['lr_full']:g} / {cfg['lr_head']:g} /"
    return [name, cfg["task"], cfg["method"], str(cfg["seed"]), f"{r['train_examples']:,}",
            epochs, _fmt(first["dev"]["score"]), _fmt(final), _fmt(density, ".5f"), kept, rates]


def table(runs: list[tuple[str, dict]]) -> str:
    rows = [row(name, r) for name, r in runs]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    table_main(argv, __doc__, HERE,
               "# Single runs behind the after-L0 comparisons (issue 7)\n\n"
               "Written by `python bench/after_l0.py` from the runs' `results.json` copies in "
               "`runs/`; the commands that trained them are in bench/README.md (\"Session 5\", "
               "\"Session 6\", \"Session 8\"). Scores: the task's dev metric, percent; "
               "\"after L0 / dense\": the L0 phase's dev score for diff pruning, the (best-epoch) "
               "score for full finetuning.\n\n",
               table)


if __name__ == "__main__":
    main()
