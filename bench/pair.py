"""Pair two sets of bench/compare.py runs that live in different result directories.

compare.py's report pairs the variants of one directory. A study of one method at another
setting (``--set lr_adapter=2e-3``) has its own directory and the same variant names, so
its runs cannot be paired there with the other methods' runs. This pairs any two sets:

    python bench/pair.py bench/results/compare/quick-fullset:diff-s-0.005 \
        bench/results/compare/quick-fullset-shira-lr2e-3:shira --tasks rte mrpc stsb cola \
        --out bench/results/compare/pairs/diff-s-0.005-vs-shira-lr2e-3.md

Seeds are matched as in the report (report.paired): a seed counts when both sides finished
every task of it. Writes markdown (and the same numbers as JSON beside it) with the command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("report", HERE / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def parse_side(text: str) -> tuple[Path, str]:
    """``DIR:VARIANT`` -> (DIR, VARIANT); the variant names runs/<task>-<variant>-s<seed>.json."""
    directory, sep, variant = text.rpartition(":")
    if not sep or not directory or not variant:
        raise SystemExit(f"expected DIR:VARIANT, got {text!r}")
    return Path(directory), variant


def load(directory: Path, variant: str, side: str) -> list[dict]:
    """The run records of ``variant`` under ``directory``/runs, renamed to ``side``."""
    runs = directory / "runs"
    if not runs.is_dir():
        raise SystemExit(f"{directory}: no runs/ directory (not a bench/compare.py output)")
    records = [{**rec, "variant": side} for rec in
               (json.loads(path.read_text()) for path in sorted(runs.glob("*.json")))
               if rec.get("variant") == variant]
    if not records:
        raise SystemExit(f"{directory}: no finished runs of variant {variant!r}")
    return records


def compare(a: list[dict], b: list[dict], tasks: tuple[str, ...]) -> dict:
    """report.paired of side "a" against side "b", with each task's means on the shared
    seeds and the per-task differences."""
    records = a + b
    overall = report.paired(records, tasks, "a", "b")
    if overall is None:
        raise SystemExit(f"no seed has every task {list(tasks)} on both sides")
    score = {(r["variant"], r["task"], r["seed"]): r["score"] for r in records}
    seeds = overall["seeds"]
    per_task = {t: {"a": statistics.mean(score["a", t, s] for s in seeds),
                    "b": statistics.mean(score["b", t, s] for s in seeds),
                    "per_seed": [score["a", t, s] - score["b", t, s] for s in seeds]}
                for t in tasks}
    for row in per_task.values():
        row["difference"] = row["a"] - row["b"]
    return {**overall, "tasks": list(tasks), "per_task": per_task,
            "average": {side: statistics.mean(per_task[t][side] for t in tasks)
                        for side in ("a", "b")}}


def markdown(result: dict, names: tuple[str, str], command: str) -> str:
    a, b = names
    tasks = result["tasks"]
    lines = [f"# {a} against {b}", "", f"Command: `{command}`", "",
             f"Seeds both sides finished every task of: {', '.join(map(str, result['seeds']))}.",
             "", "| | " + " | ".join(tasks) + " | average |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for side, name in (("a", a), ("b", b)):
        lines.append(f"| {name} | " + " | ".join(f"{result['per_task'][t][side]:.2f}"
                                                 for t in tasks)
                     + f" | {result['average'][side]:.2f} |")
    lines.append("| difference | " + " | ".join(f"{result['per_task'][t]['difference']:+.2f}"
                                                for t in tasks)
                 + f" | {result['mean']:+.2f} |")
    ci = result["interval95"]
    lines += ["", "- average difference per seed: "
              + ", ".join(f"{d:+.2f}" for d in result["per_seed"]),
              f"- mean {result['mean']:+.2f}; 95% interval of the mean (t over seeds): "
              + ("needs two seeds" if ci is None else f"{ci[0]:+.2f} to {ci[1]:+.2f}"),
              f"- task-seeds better / same / worse: {result['better']} / {result['same']} / "
              f"{result['worse']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="DIR:VARIANT, the side whose lead is measured")
    p.add_argument("b", help="DIR:VARIANT, the side it is measured against")
    p.add_argument("--tasks", nargs="+", help="tasks to average (default: those both have)")
    p.add_argument("--out", type=Path, help="write the markdown here and JSON beside it")
    args = p.parse_args(argv)
    (dir_a, var_a), (dir_b, var_b) = parse_side(args.a), parse_side(args.b)
    a, b = load(dir_a, var_a, "a"), load(dir_b, var_b, "b")
    tasks = tuple(args.tasks or sorted({r["task"] for r in a} & {r["task"] for r in b}))
    result = compare(a, b, tasks)
    command = shlex.join(["python", "bench/pair.py", *(argv if argv is not None
                                                        else sys.argv[1:])])
    text = markdown(result, (args.a, args.b), command)
    print(text)
    if args.out:
        from diffprune.fileio import atomic_write_bytes
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, text.encode())
        atomic_write_bytes(args.out.with_suffix(".json"), json.dumps(
            {"command": command, "a": args.a, "b": args.b, **result}, indent=1).encode())
    return result


if __name__ == "__main__":
    main()
