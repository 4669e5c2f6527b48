"""MiniLM small enough to travel to a lent GPU machine, and back to float32 there.

The device tool carries at most 64 MiB of working tree to its machine, which reaches no
network; the packaged MiniLM's weights are 91 MB in float32. ``pack`` writes the model
directory with its floating-point weights rounded to float16 (45 MB; 15 of its 22.7M
entries flush to 0 and 5,209 lose more than 1e-3 of their value), ``widen`` writes a float32
copy of a packed directory, which is what a run there loads. Both methods of a comparison
must start from the same widened base (session 26 did: bench/results/gpu_check/results.md).

  python bench/carry_minilm.py pack DIR        # here (the packaged model)
  python3 bench/carry_minilm.py widen DIR OUT  # there
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def convert(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy the model directory ``src`` to ``dst`` with its floating-point weights in
    ``dtype`` (other tensors, such as position ids, unchanged)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != WEIGHTS:
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / WEIGHTS)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
              dst / WEIGHTS, metadata={"format": "pt"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pack").add_argument("out", type=Path)
    widen = sub.add_parser("widen")
    widen.add_argument("src", type=Path)
    widen.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "pack":
        from diffprune.packaged import MINILM, packaged_path
        convert(Path(packaged_path(MINILM)), args.out, torch.float16)
    else:
        convert(args.src, args.out, torch.float32)
    print(args.out)


if __name__ == "__main__":
    main()
