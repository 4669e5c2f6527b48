"""Operations and device read-backs per training step, as an accelerator would see them.

On a GPU a step whose tensors are small is bound by kernel launches (each costs a few
microseconds of CPU whatever its size) and stalls whenever the host reads a value back from
the device, or copies a tensor made from host data to it. None of this needs a GPU to
count: every PyTorch operator call goes through the dispatcher, so a TorchDispatchMode sees
each one, on CPU as on a GPU. A read-back is the operator _local_scalar_dense (``float(t)``,
``t.item()``), an upload is lift_fresh (``torch.tensor(values)``). This runs the
accelerators' code paths on CPU, with a torch generator for the gate noise and the GPU's
chunk size, and counts one training step (after two) of each configuration:

- full: full finetuning;
- l0_per_target: the L0 phase, structured, one fused.GatedDelta per target (the GPU path
  before flat.py);
- l0_flat: the same through flat.py (every target in one pass);
- fixmask_per_target, fixmask_flat: the fixed-mask phase at 0.5%, one scatter per target
  or one for all (flat.fixed_thetas).

"kernels" leaves out the operators that only make views (view, t, transpose, detach, slice,
...), which launch nothing. Counts, not seconds: bench/README.md says what they explain.

  python bench/launch_count.py [--model random:minilm] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import train_cost  # noqa: E402  (bench/train_cost.py: the same models and steps)

OUT = Path(__file__).parent / "results" / "launch_count"
VIEWS = {"view", "_unsafe_view", "t", "transpose", "detach", "slice", "expand", "as_strided",
         "reshape", "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "permute",
         "alias", "unbind", "_reshape_alias", "narrow"}
CONFIGS = {"full": ("full", False), "l0_per_target": ("l0_structured", False),
           "l0_flat": ("l0_structured", True), "fixmask_per_target": ("fixmask", False),
           "fixmask_flat": ("fixmask", True)}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, model: str) -> dict:
    """One step of configuration ``name`` (CONFIGS) on the accelerators' path, counted."""
    from diffprune import flat, fused, parametrize
    config, on_flat = CONFIGS[name]
    flat.ON_CPU = on_flat
    fused.CHUNK = fused.GPU_CHUNK  # the GPU's chunks (chunk_for gives CHUNK on CPU)
    generators = {}

    def torch_generator(state):  # the GPU's kind of noise generator, on CPU
        return generators.setdefault(id(state), torch.Generator().manual_seed(0))
    parametrize.DiffState.noise_generator = torch_generator
    step = train_cost._setup(config, {"model": model, "batch": 2, "length": 16, "steps": 3,
                                      "device": "cpu", "bf16": False})
    step()
    step()
    with Counter() as c:
        step()
    return {"config": name, "ops": sum(c.ops.values()),
            "kernels": sum(v for k, v in c.ops.items() if k not in VIEWS),
            "reads": c.ops["_local_scalar_dense"], "uploads": c.ops["lift_fresh"],
            "by_op": dict(c.ops.most_common())}


def _worker(name: str, model: str, queue) -> None:
    queue.put(count(name, model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:minilm")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # each configuration in a fresh process (module patches)
    rows = []
    for name in CONFIGS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(name, args.model, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"{name:14s} {rows[-1]['ops']:6d} ops, {rows[-1]['kernels']:6d} kernels, "
              f"{rows[-1]['reads']:4d} read-backs, {rows[-1]['uploads']:4d} uploads", flush=True)
    command = " ".join(["python", "bench/launch_count.py"] + sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "model": args.model,
                                                       "rows": rows}, indent=1))
    full = rows[0]
    lines = ["# Operations per training step on the accelerators' path", "",
             f"Command: `{command}`", "", f"Model {args.model}, one step after two, counted "
             "on CPU with the GPU's noise generator and chunks (bench/launch_count.py).", "",
             "| configuration | operator calls | x full | kernels | x full | read-backs "
             "| uploads |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['ops']} | {r['ops'] / full['ops']:.2f} | {r['kernels']} "
              f"| {r['kernels'] / full['kernels']:.2f} | {r['reads']} | {r['uploads']} |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
