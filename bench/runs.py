"""Finished runs that one harness may take from another instead of training them again.

bench/mask_quality.py and bench/compare.py both accept ``--reuse DIR ...``: a run JSON (with
its ``config``) under one of the directories whose settings equal the run about to start is
taken as it is, and its record says where it came from (``reused_from``). Training is
deterministic for a given seed and code, so the score is the one the harness would get.
"""
from __future__ import annotations

import json
from pathlib import Path

# Settings that only the L0 phase reads: they cannot change a run of another method.
L0_ONLY = ("lr", "lr_gate", "sparsity", "l0_lambda", "controller_warmup", "controller_schedule",
           "gate_grad", "projection", "gate_update", "init_log_alpha", "dense_warmup",
           "gate_init", "gate_init_scale", "gate_step_in_backward")
# Settings that only the fixed-mask phase reads (diff pruning, magnitude, random).
FIXED_ONLY = ("lr_fixmask", "fixmask_epochs")


def settings(cfg) -> dict:
    """What a run's result depends on: the TrainConfig's fingerprint without the data
    directory (the same files may lie anywhere) and without the settings of a phase the
    method does not have (full finetuning's runs serve a study of the fixed-mask rate)."""
    from diffprune.recipe import plan
    out = cfg.fingerprint()
    out.pop("data_dir", None)
    stages = {phase.stage for phase in plan(cfg)}
    for stage, keys in (("l0", L0_ONLY), ("fixed", FIXED_ONLY)):
        if stage not in stages:
            for k in keys:
                out.pop(k, None)
    return out


def differences(record: dict, cfg) -> dict:
    """{field: (recorded, asked)} for each setting in which the finished run ``record`` (a run
    JSON with its ``config``) differs from ``cfg`` (a TrainConfig); empty if ``cfg`` would
    train that run. A record without a config raises KeyError."""
    from diffprune.recipe import TrainConfig
    have, want = settings(TrainConfig(**record["config"])), settings(cfg)
    return {k: (have.get(k), want.get(k)) for k in sorted(have.keys() | want.keys())
            if have.get(k) != want.get(k)}


def reusable(cfg, dirs: list[str]) -> dict | None:
    """A finished run JSON under ``dirs`` trained exactly as ``cfg`` (a TrainConfig) would be,
    with ``reused_from`` added; None if there is none. The settings are compared, not the
    code: reuse only runs of the same code."""
    for d in dirs:
        for f in sorted(Path(d).glob("*.json")):
            record = json.loads(f.read_text())
            if "config" in record and not differences(record, cfg):
                return {**record, "reused_from": str(f)}
    return None


def table_main(argv, doc: str, here: Path, heading: str, table) -> None:
    """The command line of a script that tabulates a directory of run JSONs: ``--runs DIR``
    (default here/runs) and ``--out FILE`` (default here/results.md, written atomically).
    ``table`` gets [(file stem, run record)] sorted by file name; ``heading`` goes above its
    table, and the whole is printed too."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--runs", type=Path, default=here / "runs")
    p.add_argument("--out", type=Path, default=here / "results.md")
    a = p.parse_args(argv)
    runs = [(f.stem, json.loads(f.read_text())) for f in sorted(a.runs.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no results JSON files in {a.runs}")
    text = heading + table(runs) + "\n"
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(a.out)
    print(text)
