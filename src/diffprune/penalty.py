"""The expected-L0 penalty, optimizer parameter groups, and the target-density controller.

Expected L0 (Guo, Rush & Kim 2021, Eq. 4 / Sec. 3.2; Louizos et al. 2018):
  unstructured: sum_i sigmoid(a_i - c)
  structured:   sum_g sum_i sigmoid(a_i - c) * sigmoid(a_g - c)     (the paper's product form;
                the authors' released code adds the two terms instead of multiplying them)
with c = temperature * log(-l / r).

The density controller replaces a hand-tuned lambda. Like the Lagrangian of Wang, Wohlwend &
Lei (2020, "Structured Pruning of Large Language Models"), it prices the constraint
E[L0] / N = t with one dual variable; but instead of raising a multiplier by gradient ascent
(which, with Adam on the gates, overshoots: every gate then moves by ~lr per step whatever its
task gradient, and all close together), the price is a logit offset b shared by all gates,
solved each step by a Newton step on log E[density](b) = log t. The expected density so
follows its schedule by construction, and log_alpha learns only from the task loss which
entries deserve to be among the open ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import flat, gates
from .errors import DiffPruneError
from .inject import get_state, unwrap


def l0_penalty(model: nn.Module, normalized: bool = False) -> torch.Tensor:
    """Expected number of nonzero diff entries, E||delta||_0 (a differentiable scalar).

    ``normalized=True`` divides by the number of gated parameters N (expected density).
    Only defined in the L0 stage.
    """
    state = get_state(model)
    if state.stage != "l0":
        raise DiffPruneError(f"l0_penalty needs the L0 stage; the model is in {state.stage!r}")
    c = state.config
    kw = {"left": c.stretch_left, "right": c.stretch_right, "temperature": c.temperature}
    elem, group = state.logits()
    per_tensor = torch.stack([gates.prob_nonzero(a, **kw).sum() for a in elem])
    if group is not None:
        per_tensor = per_tensor * gates.prob_nonzero(group, **kw)
    total = per_tensor.sum()
    return total / state.numel() if normalized else total


def expected_density(model: nn.Module) -> float:
    """E||delta||_0 / N in the L0 stage; the exact density nnz / N in the fixed stage."""
    state = get_state(model)
    if state.stage == "l0":
        with torch.no_grad():
            return float(l0_penalty(model, normalized=True))
    if state.stage == "fixed":
        return sum(state.indices(i).numel() for i in range(len(state.targets))) / state.numel()
    return 1.0


def param_groups(model: nn.Module, lr_diff: float, lr_gate: float = 0.1,
                 lr_dense: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: diff weights (w or fixed-mask values), gates (log_alpha), dense heads.

    Gates get no weight decay (it would bias them toward density 1/2 instead of the penalty).
    """
    state = get_state(model)
    diff = list(state.values) if state.stage == "fixed" else list(state.w)
    groups = [{"name": "diff", "params": diff, "lr": lr_diff, "weight_decay": weight_decay}]
    if state.stage == "l0":
        groups.append({"name": "gates", "params": list(state.log_alpha), "lr": lr_gate,
                       "weight_decay": 0.0})
        if state.config.structured:  # its own group: a sum over a tensor has its own scale
            groups.append({"name": "group_gates", "params": [state.group_log_alpha],
                           "lr": lr_gate, "weight_decay": 0.0})
    root = unwrap(model)
    dense = [root.get_parameter(n) for n in state.dense_names]
    if dense:
        groups.append({"name": "dense", "params": dense,
                       "lr": lr_diff if lr_dense is None else lr_dense,
                       "weight_decay": weight_decay})
    return groups


# The controller reads every 8th gate of tensors with at least 2^16 entries (>= 8192 samples
# each): 8x cheaper, unbiased, and exact for small tensors.
_SUBSAMPLE, _SUBSAMPLE_MIN = 8, 1 << 16


def _density_and_slope(state) -> tuple[float, float]:
    """E[density] and its derivative in the shared offset b, estimated from a strided subset
    of the gates of large tensors (exact for small ones)."""
    c = state.config
    c0 = gates.l0_shift(c.stretch_left, c.stretch_right, c.temperature)
    shift = c0 - state.logit_shift
    subsets = [a.detach().reshape(-1)[::_SUBSAMPLE if a.numel() >= _SUBSAMPLE_MIN else 1]
               for a in state.log_alpha]
    scales = [a.numel() / x.numel() for a, x in zip(state.log_alpha, subsets)]
    if subsets[0].device.type != "cpu" or flat.ON_CPU:
        # one pass over the subsets together: a few kernel launches instead of six per
        # tensor (flat.py says why that matters on an accelerator)
        lengths = flat.constant(tuple(x.numel() for x in subsets), subsets[0].device)
        p = torch.sigmoid(torch.cat(subsets) - shift)
        scale = flat.constant(tuple(scales), p.device)
        s = torch.segment_reduce(p, "sum", lengths=lengths) * scale
        ds = torch.segment_reduce(p * (1 - p), "sum", lengths=lengths) * scale
    else:  # tensor by tensor: one subset's probabilities at a time
        s, ds = [], []
        for x, k in zip(subsets, scales):
            p = torch.sigmoid(x - shift)
            s.append(p.sum() * k)
            ds.append((p * (1 - p)).sum() * k)
        s, ds = torch.stack(s), torch.stack(ds)
    if not c.structured:
        return float(s.sum()) / state.numel(), float(ds.sum()) / state.numel()
    pg = torch.sigmoid(state.group_log_alpha.detach() - c0)
    dens = (pg * s).sum()
    slope = (pg * ds).sum()  # the shift moves the entry gates only (DiffState.logits)
    return float(dens) / state.numel(), float(slope) / state.numel()


@dataclass
class DensityController:
    """Keeps the expected density E||delta||_0 / N on a schedule that ends at ``target``.

    Over the first ``warmup_fraction`` of ``total_steps`` the target falls from the density at
    the start to ``target`` (gates close gradually while w learns), then holds. ``schedule``
    "geometric" (the default) falls linearly in log density, so each factor of ten gets the
    same number of steps; "linear" falls linearly in density (almost all its steps above
    10%, the last factor of ten in a few steps).
    """

    target: float
    total_steps: int
    warmup_fraction: float = 0.5
    schedule: str = "geometric"
    start_density: float | None = None
    step_count: int = 0

    def current_target(self) -> float:
        start = self.start_density if self.start_density is not None else 1.0
        warm = max(1, int(self.warmup_fraction * self.total_steps))
        frac = min(1.0, self.step_count / warm)
        if self.schedule == "linear":
            return start + frac * (self.target - start)
        return math.exp(math.log(start) + frac * (math.log(self.target) - math.log(start)))

    @torch.no_grad()
    def step(self, model: nn.Module) -> float:
        """Move the offset so that E[density] meets this step's target (one Newton step on
        log density, warm-started from the last step's offset: one pass over the gates).
        Returns the expected density measured before the move."""
        state = get_state(model)
        if state.stage != "l0":
            raise DiffPruneError("the density controller needs the L0 stage")
        density, slope = _density_and_slope(state)
        if self.start_density is None:
            self.start_density = max(density, self.target)
        goal = self.current_target()
        move = (math.log(goal) - math.log(max(density, 1e-30))) * density / max(slope, 1e-30)
        state.logit_shift += max(-4.0, min(4.0, move))  # bounded: robust when all gates shut
        self.step_count += 1
        return density

    def state_dict(self) -> dict:
        return {"start_density": self.start_density, "step_count": self.step_count}

    def load_state_dict(self, data: dict) -> None:
        self.start_density = data["start_density"]
        self.step_count = data["step_count"]
