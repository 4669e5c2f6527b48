"""The fused gate's own cost: forward + backward of fused.GatedDelta over N gates (issue 5).

Three ways on CPU, each exact: the compiled kernels with counter-based noise (counter.py, the
default); numpy's PCG64 stream (gates.CpuNoise) with z kept where it is compact
(fused._SparseZ: a span that needed noise for every entry and came out nearly all 0 or all 1);
the same stream replayed in backward everywhere. They are measured with gates in the states
a real L0 phase passes through:
fresh (log_alpha 5, the paper's start), shut by the density controller to 0.5% before they
separate (every logit at -5.3), half open (0: nothing is kept), and separated (2.5% of the
logits spread over the band where the noise decides, the rest shut; noise is drawn only for
those, so nothing is kept either). The variants take their steps in turn in one process, so
that this machine's drift over minutes falls on all alike; the median of each is kept.

  python bench/gate_cost.py [--n 22713216] [--steps 12] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from diffprune import counter, fused
from diffprune.gates import CpuNoise

OUT = Path(__file__).parent / "results" / "gate_cost"
UNSURE_SHARE = 0.025  # as in bench/train_cost.py's separated configuration
# name: (counter.ENABLED, fused.KEEP_Z); ratios are to the first
VARIANTS = {"counter": (True, True), "stream_kept": (False, True),
            "stream_replayed": (False, False)}


def states(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    unsure = torch.rand(n, generator=g) < UNSURE_SHARE
    separated = torch.where(unsure, torch.rand(n, generator=g) * 28 - 13, -25.0)
    return {"fresh (5)": torch.full((n,), 5.0), "shut before separating (-5.3)":
            torch.full((n,), -5.3), "half open (0)": torch.zeros(n), "separated": separated}


def step_ms(theta0, w, a, zg, upstream, noise) -> float:
    start = time.perf_counter()
    theta = fused.GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, 1.0, True,
                                   True, noise)
    theta.backward(upstream)
    w.grad = a.grad = zg.grad = None
    return 1e3 * (time.perf_counter() - start)


def arguments(doc: str, out: Path) -> argparse.Namespace:
    """The command line shared with bench/gate_step_cost.py."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--n", type=int, default=22_713_216, help="gates (default: MiniLM's)")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each variant")
    p.add_argument("--out", type=Path, default=out, help="results directory")
    return p.parse_args()


def inputs(n: int) -> tuple:
    """theta0, the upstream gradient, w, the group gate and the noise generator (seeded)."""
    torch.manual_seed(0)
    theta0, upstream = torch.randn(n), torch.randn(n)
    w = (torch.randn(n) * 0.01).requires_grad_()
    return theta0, upstream, w, torch.tensor(1.0, requires_grad=True), CpuNoise(0)


def main() -> None:
    args = arguments(__doc__, OUT)
    theta0, upstream, w, zg, noise = inputs(args.n)
    rows = []
    for name, logits in states(args.n).items():
        a = logits.requires_grad_()
        times = {v: [] for v in VARIANTS}
        for i in range(args.steps + 2):  # two warm-up rounds (the first compiles)
            for variant, (counter.ENABLED, fused.KEEP_Z) in VARIANTS.items():
                ms = step_ms(theta0, w, a, zg, upstream, noise)
                if i >= 2:
                    times[variant].append(ms)
        counter.ENABLED, fused.KEEP_Z = VARIANTS["counter"]
        ms = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"state": name, **{f"{v}_ms": m for v, m in ms.items()},
                     **{f"{v}_all": t for v, t in times.items()}})
        print(f"{name:32s} " + ", ".join(f"{v} {m:7.1f} ms" for v, m in ms.items()), flush=True)
    command = " ".join(["python", "bench/gate_cost.py"] + sys.argv[1:])  # as it was given
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "n": args.n,
                                                  "rows": rows}, indent=1))
    lines = ["# The fused gate's forward + backward: compiled counter-noise kernels vs the "
             "numpy stream (issue 5)", "", f"Command: `{command}`", "",
             f"{args.n:,} gates; kernels in spans of {counter.CHUNK:,}, the stream in spans of "
             f"{fused.CHUNK:,}; median of {args.steps} steps per variant, the variants taking "
             "their steps in turn.", "",
             "| gates | counter kernels, ms | stream, z kept where compact, ms | stream, noise "
             "replayed, ms | kernels / z kept |", "|---|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['counter_ms']:.1f} | {r['stream_kept_ms']:.1f} | "
              f"{r['stream_replayed_ms']:.1f} | {r['counter_ms'] / r['stream_kept_ms']:.2f}x |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
