"""How many word-embedding rows a task's training set reads: distinct token ids of its
training examples (whole set and first 1,000), with the packaged MiniLM's tokenizer and max
length 128 (bench/README.md, training cost, session 14).

  GLUE_DIR=../shared/data/glue python bench/vocab_rows.py [--tasks rte mrpc stsb cola sst2]
"""
from __future__ import annotations

import argparse
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "stsb", "cola", "sst2"])
    p.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from diffprune.data import get_task, load_task
    from diffprune.hf import DEFAULT_MODEL, resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    print("| task | examples | distinct rows, whole training set | in the first 1,000 |")
    print("|---|---|---|---|")
    for name in args.tasks:
        train = load_task(get_task(name), args.data_dir).train
        seen, first = set(), None
        for n, ex in enumerate(train, 1):
            seen.update(tok(ex["text"], ex.get("text_pair"), truncation=True,
                            max_length=args.max_length)["input_ids"])
            if n == 1000:
                first = len(seen)
        print(f"| {name} | {len(train):,} | {len(seen):,} ({len(seen) / tok.vocab_size:.1%}) "
              f"| {first:,} |")


if __name__ == "__main__":
    main()
