"""Is the learned mask any good? Diff pruning vs a random mask vs magnitude vs full finetuning.

Issue 7's evidence: on real GLUE data with the packaged MiniLM, at one density, the same
fixed-mask phase on (a) the mask diff pruning learned, (b) a uniformly random mask, (c) the
magnitude baseline's mask; plus full finetuning as the reference, over several seeds.
Runs one after another in this process, skips runs whose JSON already exists (so it can be
interrupted and restarted), and writes bench/results/mask_quality/nN/{runs/*.json, results.md}
(N: training examples per task).

  GLUE_DIR=../shared/data/glue python bench/mask_quality.py --tasks sst2 mrpc --seeds 1 2 3
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from diffprune.cli import tune_allocator
from diffprune.recipe import TrainConfig
from diffprune.train import train
from runs import reusable  # bench/runs.py

OUT = Path(__file__).parent / "results" / "mask_quality"
KEEP = ("task", "method", "seed", "score", "dev", "density", "nnz", "artifact_bytes",
        "wall_time_s", "train_steps", "train_examples", "phases", "projection")


def out_dir(args) -> Path:
    """One directory per training-set size: runs of different sizes never mix."""
    return OUT / f"n{args.max_train_samples}"


def run_path(task: str, method: str, seed: int, args) -> Path:
    return out_dir(args) / "runs" / f"{task}-{method}-d{args.density}-s{seed}.json"


def run_one(task: str, method: str, seed: int, args) -> dict:
    path = run_path(task, method, seed, args)
    if path.exists():
        return json.loads(path.read_text())
    cfg = TrainConfig(task=task, method=method, seed=seed, density=args.density,
                      data_dir=args.data_dir, max_train_samples=args.max_train_samples,
                      epochs=args.epochs, fixmask_epochs=args.fixmask_epochs,
                      batch_size=args.batch_size, out=str(out_dir(args) / "tmp" / path.stem),
                      resume=True)
    results = reusable(cfg, args.reuse)
    if results is None:
        results = train(cfg)
    record = {k: results.get(k) for k in KEEP}
    record["config"] = results["config"]
    if "reused_from" in results:
        record["reused_from"] = results["reused_from"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def table(records: list[dict], tasks: list[str], methods: list[str]) -> str:
    def cell(task, method):
        scores = [r["score"] for r in records if r["task"] == task and r["method"] == method]
        if not scores:
            return "", None
        mean = statistics.mean(scores)
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        return f"{mean:.2f} ± {sd:.2f} (n={len(scores)})", mean
    lines = ["| method | " + " | ".join(tasks) + " | average |",
             "|---" * (len(tasks) + 2) + "|"]
    for method in methods:
        cells = [cell(t, method) for t in tasks]
        means = [m for _, m in cells if m is not None]
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(tasks) else ""
        lines.append(f"| {method} | " + " | ".join(c for c, _ in cells) + f" | {avg} |")
    return "\n".join(lines)


def l0_table(records: list[dict]) -> str:
    lines = ["| task | seed | E[density] end of L0 | dev after L0 | after projection | "
             "after fixed mask | kept by delta / filled |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["method"] != "diff":
            continue
        l0, proj = r["phases"]["l0"], r["projection"]
        lines.append(f"| {r['task']} | {r['seed']} | {l0['expected_density']:.5f} | "
                     f"{l0['dev']['score']:.2f} | {proj['dev']['score']:.2f} | {r['score']:.2f} "
                     f"| {proj['by_delta']} / {proj['by_fill']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    p.add_argument("--methods", nargs="+", default=["diff", "random", "magnitude", "full"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--max-train-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fixmask-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--reuse", nargs="*", default=[], metavar="DIR",
                   help="directories of run JSONs (e.g. bench/results/compare/quick/runs) "
                        "whose runs with identical settings are taken instead of retrained (the "
                        "settings are compared, not the code: reuse only runs of the same code)")
    p.add_argument("--report-only", action="store_true",
                   help="write results.md from the runs already finished, train nothing")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    records = []
    for seed in args.seeds:  # seed-major: partial results already cover every method
        for task in args.tasks:
            for method in args.methods:
                path = run_path(task, method, seed, args)
                if args.report_only and not path.exists():
                    continue
                records.append(run_one(task, method, seed, args))
                print(f"{task} {method} seed {seed}: {records[-1]['score']:.2f}", flush=True)
    command = " ".join(["python", "bench/mask_quality.py"] + [a for a in sys.argv[1:]
                                                              if a != "--report-only"])
    text = ["# Mask quality: learned vs random vs magnitude (issue 7)", "",
            f"Command: `{command}`", "",
            f"MiniLM (packaged), density {args.density}, {args.max_train_samples} training "
            f"examples per task (seeded subsample), {args.epochs} epochs + "
            f"{args.fixmask_epochs} fixed-mask epochs, batch {args.batch_size}. Dev scores "
            "(mean ± sd over seeds). `full` trains for the first-phase epochs only.", "",
            table(records, args.tasks, args.methods), "", "## The L0 phase of diff pruning",
            "", l0_table(records), ""]
    (out_dir(args) / "results.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
