"""Projection of the diff onto the L0 ball by magnitude, and the switch to a fixed mask.

Guo, Rush & Kim 2021, Sec. 3.3: after the L0 phase, keep the k entries of delta = z * w with
the largest magnitude (k = round(density * N)), zero the rest, then finetune the kept entries.
Selection is global over all gated tensors, exact in k, and deterministic on ties (lower
tensor index, then lower flat position, wins). Entries whose score is exactly zero are never
chosen by tie-breaking: if fewer than k entries of delta are nonzero, the remainder is filled
by a stated secondary score (|w|, the undiluted diff weight) and the report says how many.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import gates
from .errors import ConfigError, DiffPruneError
from .inject import get_state

log = logging.getLogger(__name__)


@dataclass
class ProjectionReport:
    """How the k kept entries were chosen."""

    k: int
    by_delta: int
    by_fill: int
    fill: str

    @property
    def kept(self) -> int:
        return self.by_delta + self.by_fill

    @property
    def short(self) -> int:
        return self.k - self.kept


def budget(n: int, density: float | None = None, nnz: int | None = None) -> int:
    """k from exactly one of ``density`` (fraction of n, in (0, 1]) or ``nnz``."""
    if (density is None) == (nnz is None):
        raise ConfigError("give exactly one of density= or nnz=")
    if nnz is not None:
        if not 0 < nnz <= n:
            raise ConfigError(f"nnz must be in [1, {n}], got {nnz}")
        return int(nnz)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * n))


def top_k_positive(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted flat indices per tensor of the k globally largest strictly positive scores.

    Returns fewer than k in all if fewer are positive. Never sorts more than k candidates per
    tensor (topk per tensor, then one topk over the candidates).
    """
    flat = [s.detach().reshape(-1) for s in scores]
    positive = sum(int((f > 0).sum()) for f in flat)
    if positive <= k:
        return [torch.nonzero(f > 0).squeeze(1) for f in flat]
    cands = torch.cat([torch.topk(f, min(k, f.numel()), sorted=False).values for f in flat])
    threshold = torch.topk(cands, k, sorted=False).values.min()  # the k-th largest score
    above = [f > threshold for f in flat]
    need = k - sum(int(a.sum()) for a in above)  # entries equal to the threshold still to take
    out = []
    for f, a in zip(flat, above):
        ties = torch.nonzero(f == threshold).squeeze(1)[:max(need, 0)]
        need -= ties.numel()
        out.append(torch.cat([torch.nonzero(a).squeeze(1), ties]).sort().values)
    return out


def _scores(state, score: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(delta, the selection score, the fill score |w|) per target."""
    with torch.no_grad():
        deltas = [d.detach() for d in state.deltas(stochastic=False)]
        fill = [w.detach().abs() for w in state.w]
        if score == "delta" or state.stage != "l0":
            return deltas, [d.abs() for d in deltas], fill
        # expected |delta| ~ P(gate open) * |w|: half-open gates with a large w still count
        c = state.config
        kw = {"left": c.stretch_left, "right": c.stretch_right, "temperature": c.temperature}
        elem, group = state.logits()
        probs = [gates.prob_nonzero(a, **kw) for a in elem]
        if group is not None:
            pg = gates.prob_nonzero(group, **kw)
            probs = [p * pg[i] for i, p in enumerate(probs)]
        return deltas, [p * f for p, f in zip(probs, fill)], fill


@torch.no_grad()
def project_(model: nn.Module, density: float | None = None, nnz: int | None = None,
             fill: str = "w", score: str = "delta") -> ProjectionReport:
    """Keep exactly k entries of delta (by |delta|) and switch the model to the fixed mask.

    ``fill="w"``: if fewer than k entries of delta are nonzero, fill up with the largest |w|
    among the rest (entries whose gate closed but whose weight learned something); the filled
    entries start at delta = 0, so the model's function is unchanged by the fill.
    ``fill="none"``: keep only the nonzero entries (fewer than k).
    ``score="expected"`` ranks the L0 stage by P(gate open) * |w| instead of |delta| (the
    deterministic gate); the kept values are delta either way.
    """
    state = get_state(model)
    if state.stage not in ("l0", "dense"):
        raise DiffPruneError(f"project_ needs the L0 or dense stage; the model is in {state.stage!r}")
    if fill not in ("w", "none"):
        raise ConfigError(f"fill must be 'w' or 'none', got {fill!r}")
    if score not in ("delta", "expected"):
        raise ConfigError(f"score must be 'delta' or 'expected', got {score!r}")
    k = budget(state.numel(), density, nnz)
    deltas, scores, fill_scores = _scores(state, score)
    chosen = top_k_positive(scores, k)
    by_delta = sum(c.numel() for c in chosen)
    by_fill = 0
    if by_delta < k and fill == "w":
        for score, c in zip(fill_scores, chosen):
            score.view(-1).scatter_(0, c, 0.0)  # already chosen
        extra = top_k_positive(fill_scores, k - by_delta)
        by_fill = sum(e.numel() for e in extra)
        chosen = [torch.cat([c, e]).sort().values for c, e in zip(chosen, extra)]
    values = [d.reshape(-1).index_select(0, c) for d, c in zip(deltas, chosen)]
    state.set_stage_("fixed", chosen, values)
    report = ProjectionReport(k, by_delta, by_fill, fill)
    if report.short or report.by_fill:
        log.warning("projection: only %d of k=%d delta entries were nonzero; %d filled by |w|, "
                    "%d left empty", by_delta, k, by_fill, report.short)
    return report


@torch.no_grad()
def random_mask_(model: nn.Module, density: float | None = None, nnz: int | None = None,
                 seed: int = 0) -> int:
    """Switch to a fixed mask of k uniformly random positions (delta = 0 there): the control
    that shows whether a learned mask beats chance."""
    state = get_state(model)
    n = state.numel()
    k = budget(n, density, nnz)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n, generator=gen)[:k].sort().values
    chosen, start = [], 0
    for t in state.targets:
        sel = flat[(flat >= start) & (flat < start + t.numel)] - start
        chosen.append(sel)
        start += t.numel
    values = [torch.zeros(c.numel()) for c in chosen]
    state.set_stage_("fixed", chosen, values)
    return k
