"""The fused gate's own cost: forward + backward of fused.GatedDelta over N gates (issue 5).

On CPU the gate noise comes from numpy's PCG64 (gates.CpuNoise) and costs more than any other
part of the gate. A span of z that needed noise for every entry and came out nearly all 0 or
all 1 is kept exactly for backward (fused._SparseZ) instead of having its noise drawn again.
This script measures what that saves, with gates in the states a real L0 phase passes through:
fresh (log_alpha 5, the paper's start), shut by the density controller to 0.5% before they
separate (every logit at -5.3), half open (0: nothing is kept), and separated (2.5% of the
logits spread over the band where the noise decides, the rest shut; noise is drawn only for
those, so nothing is kept either). The two variants alternate step by step in one process,
so that this machine's drift over minutes falls on both alike; the median of each is kept.

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

from diffprune import fused
from diffprune.gates import CpuNoise

OUT = Path(__file__).parent / "results" / "gate_cost"
UNSURE_SHARE = 0.025  # as in bench/train_cost.py's separated configuration


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=22_713_216, help="gates (default: MiniLM's)")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each variant")
    p.add_argument("--out", type=Path, default=OUT, help="results directory")
    args = p.parse_args()
    torch.manual_seed(0)
    theta0, upstream = torch.randn(args.n), torch.randn(args.n)
    w = (torch.randn(args.n) * 0.01).requires_grad_()
    zg = torch.tensor(1.0, requires_grad=True)
    noise = CpuNoise(0)
    rows = []
    for name, logits in states(args.n).items():
        a = logits.requires_grad_()
        times = {True: [], False: []}
        for i in range(2 * args.steps + 2):  # two warm-up steps
            fused.KEEP_Z = bool(i % 2)
            ms = step_ms(theta0, w, a, zg, upstream, noise)
            if i >= 2:
                times[fused.KEEP_Z].append(ms)
        fused.KEEP_Z = True
        kept, replayed = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"state": name, "kept_ms": kept, "replayed_ms": replayed,
                     "ratio": kept / replayed, "kept_all": times[True],
                     "replayed_all": times[False]})
        print(f"{name:32s} z kept {kept:7.1f} ms, noise replayed {replayed:7.1f} ms "
              f"({kept / replayed:.2f}x)", flush=True)
    command = " ".join(["python", "bench/gate_cost.py"] + sys.argv[1:])  # as it was given
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "n": args.n,
                                                  "rows": rows}, indent=1))
    lines = ["# The fused gate's forward + backward: z kept vs noise replayed (issue 5)", "",
             f"Command: `{command}`", "", f"{args.n:,} gates in CPU spans of {fused.CHUNK:,}; "
             f"median of {args.steps} steps per variant, the variants alternating step by step.",
             "", "| gates | z kept where compact, ms | noise always replayed, ms | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['kept_ms']:.1f} | {r['replayed_ms']:.1f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
