"""The ``diffprune`` command line: train, eval, inspect, merge, predict, demo.

Each subcommand is a thin caller of library functions. Options of ``train`` are generated from
TrainConfig, whose field docstrings are the help text (written once, in recipe.py).
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import inspect
import json
import logging
import sys
import typing
from pathlib import Path

import torch

from .data.tasks import TASKS, TaskSpec, custom_task
from .errors import DiffPruneError
from .hf import load_model
from .sparse_diff import SparseDiff
from .data.batches import collate, evaluate, predictions, tokenize
from .distributed import is_main_process
from .recipe import METHODS, TrainConfig
from .train import TrainingInterrupted, train

log = logging.getLogger("diffprune")
DEMO = {"task": "rotten", "out": "runs/demo", "max_train_samples": 2000}


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the source is the single place of help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _add_config_options(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    docs = field_docs(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            if f.name == "structured":
                parser.add_argument("--unstructured", dest="structured", action="store_false",
                                    help="same as --no-structured")
            continue
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)
        convert = next(t for t in kind if t is not type(None))
        choices = METHODS if f.name == "method" else None
        parser.add_argument(flag, dest=f.name, type=convert, default=default, choices=choices,
                            help=help_text)


def _config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _spec_from_diff(diff: SparseDiff) -> TaskSpec:
    meta = diff.metadata
    name = meta.get("task", "custom")
    if name in TASKS:
        return TASKS[name]
    return custom_task(name, meta.get("labels"), bool(meta.get("pair")))


def _load_base(diff_dir: str, base: str | None):
    """The diff and a fresh copy of its base model with the right task head."""
    diff = SparseDiff.load(diff_dir)
    head = diff.metadata.get("head")
    if head is None:
        raise DiffPruneError(f"{diff_dir} has no task-head metadata (not made by diffprune "
                             "train); use the Python API to apply it")
    model, tokenizer = load_model(base or diff.base_model, head)
    return diff, model.eval(), tokenizer


def _load_applied(diff_dir: str, base: str | None, force: bool):
    diff, model, tokenizer = _load_base(diff_dir, base)
    diff.apply_(model, force=force)
    return diff, model, tokenizer


def cmd_train(args) -> int:
    results = train(_config(args))
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    print(json.dumps({k: results[k] for k in ("task", "method", "score", "density", "nnz",
                                              "artifact_bytes", "wall_time_s")}, indent=1))
    return 0


def cmd_demo(args) -> int:
    results = train(_config(args))
    print(f"\nrotten (sentence sentiment), {results['train_examples']} training sentences: "
          f"dev accuracy {results['score']:.2f}% with {results['nnz']:,} changed parameters "
          f"({100 * results['density']:.2f}%), diff {results['artifact_bytes'] / 1e3:.0f} kB, "
          f"{results['wall_time_s']:.0f} s")
    _, model, tokenizer = _load_applied(f"{args.out}/diff", None, False)
    for text in ("A gorgeous, heartfelt film.", "Tedious and badly acted."):
        print(f"  predict {text!r}: {_predict(model, tokenizer, TASKS['rotten'], text, None)}")
    return 0


def cmd_eval(args) -> int:
    from .data.batches import subsample
    from .train import load_data
    diff, model, tokenizer = _load_applied(args.diff, args.base, args.force)
    cfg = TrainConfig(task=args.task or diff.metadata.get("task", "custom"),
                      data_dir=args.data_dir, train_file=args.train_file,
                      dev_file=args.dev_file, text_column=args.text_column,
                      text_pair_column=args.text_pair_column, label_column=args.label_column)
    data = load_data(cfg)
    max_length = diff.metadata.get("max_length", 128)
    dev = {k: tokenize(tokenizer, subsample(v, args.max_eval_samples, 0), max_length)
           for k, v in data.dev.items()}
    metrics = evaluate(model, tokenizer, data.task, dev, args.batch_size, torch.device("cpu"))
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_inspect(args) -> int:
    from . import inspect_diff
    info = inspect_diff.summary(SparseDiff.load(args.diff))
    info["bytes_on_disk"] = sum(p.stat().st_size for p in Path(args.diff).iterdir())
    if args.plot:
        inspect_diff.plot(info, args.plot)
    if not args.tensors:
        info.pop("tensors")
    print(json.dumps(info, indent=1))
    return 0


def cmd_merge(args) -> int:
    diff, model, tokenizer = _load_base(args.diff, args.base)
    diff.merge(model, args.out, force=args.force)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out} ({diff.nnz:,} entries changed)")
    return 0


def _predict(model, tokenizer, spec: TaskSpec, text: str, pair: str | None) -> dict:
    item = tokenize(tokenizer, [{"text": text, "text_pair": pair, "label": 0}], 512)
    batch = collate(tokenizer, item, torch.device("cpu"))
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    return predictions(logits, None if spec.is_regression else list(spec.labels), digits=4)[0]


def cmd_predict(args) -> int:
    diff, model, tokenizer = _load_applied(args.diff, args.base, args.force)
    print(json.dumps(_predict(model, tokenizer, _spec_from_diff(diff), args.text, args.pair)))
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .serve import Service, create_app
    except ImportError:
        raise DiffPruneError("serving needs: pip install 'diffprune[serve]'") from None
    diffs = {}
    for spec in args.diff:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise DiffPruneError(f"--diff takes NAME=DIR, got {spec!r}")
        diffs[name] = path
    service = Service(args.base, diffs, args.max_length)
    log.info("serving %s on http://%s:%d", ", ".join(diffs), args.host, args.port)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def _diff_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("diff", help="a diff directory (RUN_DIR/diff)")
    p.add_argument("--base", help="base model directory or hub id (default: the one recorded "
                                  "in the diff)")
    p.add_argument("--force", action="store_true",
                   help="apply even if the base fingerprint does not match")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprune", description="Diff pruning: "
                                     "parameter-efficient transfer learning (Guo et al. 2021)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a task diff (or a baseline) and write RUN_DIR")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="the main job on the embedded default: diff pruning of the "
                                    "packaged MiniLM on Rotten Tomatoes sentences from PyPI")
    _add_config_options(p, DEMO)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="score a diff on a task's dev set (prints JSON)")
    _diff_options(p)
    p.add_argument("--task", help="task name (default: the diff's task)")
    p.add_argument("--data-dir", help="GLUE directory (default: $GLUE_DIR)")
    p.add_argument("--train-file", help="with --dev-file: your own task's files")
    p.add_argument("--dev-file", help="dev file (CSV, TSV or JSONL) of your own task")
    p.add_argument("--text-column", default="text", help="text column of your files")
    p.add_argument("--text-pair-column", help="second text column, for sentence pairs")
    p.add_argument("--label-column", default="label", help="label column of your files")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--max-eval-samples", type=int, help="score a seeded subset of dev")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("inspect", help="nonzeros per tensor / layer / component, bytes, "
                                       "fingerprint (JSON)")
    p.add_argument("diff", help="a diff directory")
    p.add_argument("--plot", help="write a PNG of density per layer and component")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("merge", help="write a standalone Hugging Face model (base + diff)")
    _diff_options(p)
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("predict", help="label a sentence (or a pair) with a diff")
    _diff_options(p)
    p.add_argument("text", help="the sentence")
    p.add_argument("pair", nargs="?", help="the second sentence, for pair tasks")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("serve", help="HTTP JSON service: one base model, many task diffs")
    p.add_argument("--base", default=None, help="base model directory or hub id (default: "
                                                "the one recorded in the first diff)")
    p.add_argument("--diff", action="append", required=True, metavar="NAME=DIR",
                   help="a task to serve (repeat for more tasks)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per input")
    p.set_defaults(func=cmd_serve)
    return parser


def tune_allocator() -> None:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    A training step allocates many N-sized temporaries; with glibc's default each one is a
    fresh mmap that page-faults on first touch (~50 ms per 90 MB here). Reusing heap memory
    made a MiniLM step 1.8x faster on CPU, for finetuning and diff pruning alike (the same
    reason PyTorch's CPU tuning guide recommends jemalloc or tcmalloc). No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    tune_allocator()
    args = build_parser().parse_args(argv)
    quiet = args.quiet or not is_main_process()  # under torchrun, rank 0 talks
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"diffprune: {exc}", file=sys.stderr)
        return 130
    except (DiffPruneError, FileNotFoundError) as exc:
        print(f"diffprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
