"""The gate logits' AdamW step inside the gate's backward kernel against apart from it (issue 5).

Since session 17 the fused gate's backward (fused.GatedDelta with optim.GateStep, counter.py's
kernels, one process) takes the logits' AdamW step in the same compiled loop that computes
their gradient (counter's backward_step); before, the kernel wrote each span's gradient and
torch's fused AdamW read it back in a second call. This measures forward + backward + step
over N gates both ways (``optim.STEP_IN_KERNEL``), the two taking their steps in turn in one
process so that this machine's drift falls on both alike; the logits are reset to their
state before every step, outside the timer. States as in bench/gate_cost.py.

  python bench/gate_step_cost.py [--n 22713216] [--steps 12] [--out DIR]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from diffprune import fused, optim

sys.path.insert(0, str(Path(__file__).parent))
from gate_cost import arguments, inputs, states  # noqa: E402

OUT = Path(__file__).parent / "results" / "gate_step_cost"
VARIANTS = {"in_kernel": True, "apart": False}  # optim.STEP_IN_KERNEL


def step_ms(theta0, w, a, zg, upstream, noise, stepper) -> float:
    start = time.perf_counter()
    theta = fused.GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, 1.0, True,
                                   True, noise, stepper)
    theta.backward(upstream)
    w.grad = zg.grad = None
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    args = arguments(__doc__, OUT)
    theta0, upstream, w, zg, noise = inputs(args.n)
    rows = []
    for name, logits in states(args.n).items():
        a = torch.nn.Parameter(logits.clone())
        opt = torch.optim.AdamW([{"params": [a], "lr": 0.1, "weight_decay": 0.0,
                                  "name": "gates"}])
        stepper = optim.GateStep(opt)
        times = {v: [] for v in VARIANTS}
        for i in range(args.steps + 2):  # two warm-up rounds (the first compiles)
            for variant, optim.STEP_IN_KERNEL in VARIANTS.items():
                with torch.no_grad():
                    a.copy_(logits)
                ms = step_ms(theta0, w, a, zg, upstream, noise, stepper)
                assert a.grad is None
                if i >= 2:
                    times[variant].append(ms)
        optim.STEP_IN_KERNEL = True
        ms = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"state": name, **{f"{v}_ms": m for v, m in ms.items()},
                     **{f"{v}_all": t for v, t in times.items()}})
        print(f"{name:32s} " + ", ".join(f"{v} {m:7.1f} ms" for v, m in ms.items())
              + f" ({ms['in_kernel'] / ms['apart']:.2f}x)", flush=True)
    command = " ".join(["python", "bench/gate_step_cost.py"] + sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "n": args.n,
                                                      "rows": rows}, indent=1))
    lines = ["# The gate's forward + backward + its logits' AdamW step: step inside the "
             "backward kernel vs apart (issue 5)", "", f"Command: `{command}`", "",
             f"{args.n:,} gates; median of {args.steps} steps per variant, the two taking "
             "their steps in turn in one process.", "",
             "| gates | step in the kernel, ms | step apart, ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['in_kernel_ms']:.1f} | {r['apart_ms']:.1f} | "
              f"{r['in_kernel_ms'] / r['apart_ms']:.2f}x |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
