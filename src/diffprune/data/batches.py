"""From examples to model inputs, and dev-set evaluation (shared by training, CLI and server).

Tokenisation happens once per run; batches are padded dynamically to their longest example.
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import compute as compute_metrics


def subsample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of n rows (all rows if n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
    return [rows[i] for i in keep]


def tokenize(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0]["text_pair"] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": r["label"]} for i, r in enumerate(rows)]


def collate(tokenizer, items: list[dict], device) -> dict:
    labels = torch.tensor([it["labels"] for it in items])
    feats = tokenizer.pad([{k: v for k, v in it.items() if k != "labels"} for it in items],
                          return_tensors="pt")
    out = {k: v.to(device) for k, v in feats.items()}
    out["labels"] = (labels.float() if labels.is_floating_point() else labels).to(device)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, spec, dev: dict[str, list[dict]], batch_size: int,
             device) -> dict:
    """Metrics per dev split (percent) and ``score``, the mean over splits."""
    was_training = model.training
    model.eval()
    out = {}
    for split, items in dev.items():
        preds = []
        for i in range(0, len(items), batch_size * 4):
            batch = collate(tokenizer, items[i:i + batch_size * 4], device)
            batch.pop("labels")
            logits = model(**batch).logits.float().cpu()
            preds.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
        gold = np.array([it["labels"] for it in items])
        out[split] = compute_metrics(spec.metrics, torch.cat(preds).numpy(), gold)
    out["score"] = float(np.mean([m["score"] for m in out.values()]))
    model.train(was_training)
    return out


def predictions(logits: torch.Tensor, labels: list[str] | None, digits: int = 6) -> list[dict]:
    """Per row: {"label", "scores"} for classification, {"score"} for regression (no labels)."""
    logits = logits.float().cpu()
    if labels is None:
        return [{"score": float(row[0])} for row in logits]
    return [{"label": labels[int(p.argmax())],
             "scores": {n: round(float(v), digits) for n, v in zip(labels, p)}}
            for p in logits.softmax(-1)]
