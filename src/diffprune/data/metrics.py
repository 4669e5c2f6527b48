"""GLUE's official metrics (accuracy, binary F1, Matthews correlation, Pearson, Spearman)."""
from __future__ import annotations

import numpy as np
from scipy import stats


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def _constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x.flat[0]))


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    if _constant(pred) or _constant(gold):
        return 0.0
    return float(stats.pearsonr(pred, gold)[0])


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    if _constant(pred) or _constant(gold):
        return 0.0
    return float(stats.spearmanr(pred, gold)[0])


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def compute(names: tuple[str, ...], pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Named metrics in percent plus ``score``, their mean (GLUE's per-task number)."""
    out = {name: 100.0 * METRICS[name](pred, gold) for name in names}
    out["score"] = float(np.mean(list(out.values())))
    return out
