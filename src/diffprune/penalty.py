"""The expected-L0 penalty, optimizer parameter groups, and the target-density controller.

Expected L0 (Guo, Rush & Kim 2021, Eq. 4 / Sec. 3.2; Louizos et al. 2018):
  unstructured: sum_i sigmoid(a_i - c)
  structured:   sum_g sum_i sigmoid(a_i - c) * sigmoid(a_g - c)     (the paper's product form;
                the authors' released code adds the two terms instead of multiplying them)
with c = temperature * log(-l / r).

The controller replaces a hand-tuned lambda by a Lagrangian on the expected density
(Wang, Wohlwend & Lei 2020, "Structured Pruning of Large Language Models", Eq. 6-7):
  penalty = lambda1 * (d - t) + lambda2 * (d - t)^2,
with d = E[L0] / N and (lambda1, lambda2) raised by gradient *ascent*, so the multiplier grows
while the density is above target and turns negative (re-opening gates) when it falls below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import gates
from .errors import DiffPruneError
from .inject import get_state


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
    per_tensor = torch.stack([gates.prob_nonzero(a, **kw).sum() for a in state.log_alpha])
    if c.structured:
        per_tensor = per_tensor * gates.prob_nonzero(state.group_log_alpha, **kw)
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
        gate_params = list(state.log_alpha)
        if state.config.structured:
            gate_params.append(state.group_log_alpha)
        groups.append({"name": "gates", "params": gate_params, "lr": lr_gate,
                       "weight_decay": 0.0})
    root = _root(model)
    dense = [root.get_parameter(n) for n in state.dense_names]
    if dense:
        groups.append({"name": "dense", "params": dense,
                       "lr": lr_diff if lr_dense is None else lr_dense,
                       "weight_decay": weight_decay})
    return groups


def _root(model: nn.Module) -> nn.Module:
    from .inject import unwrap
    return unwrap(model)


@dataclass
class DensityController:
    """Lagrangian control of the expected density toward ``target`` (fraction of N).

    ``warmup_fraction`` of the phase's steps anneals the target linearly from the initial
    expected density down to ``target`` (Wang et al. 2020 anneal likewise), so gates close
    gradually while w learns instead of all at once before w has moved.
    """

    target: float
    total_steps: int
    lr: float = 1.0
    warmup_fraction: float = 0.5
    lambda1: float = 0.0
    lambda2: float = 0.0
    start_density: float | None = None
    step_count: int = 0

    def current_target(self) -> float:
        start = self.start_density if self.start_density is not None else 1.0
        warm = max(1, int(self.warmup_fraction * self.total_steps))
        frac = min(1.0, self.step_count / warm)
        return start + (self.target - start) * frac

    def penalty(self, density: torch.Tensor) -> torch.Tensor:
        """The Lagrangian term for the current expected density (differentiable in it)."""
        if self.start_density is None:
            self.start_density = float(density.detach())
        gap = (density - self.current_target()) / self.target  # relative: scale-free in target
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def step(self, density: torch.Tensor) -> None:
        """Gradient ascent on the multipliers (call once per optimizer step)."""
        gap = float((density.detach() - self.current_target()) / self.target)
        self.lambda1 += self.lr * gap
        self.lambda2 += self.lr * gap * gap
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"lambda1": self.lambda1, "lambda2": self.lambda2,
                "start_density": self.start_density, "step_count": self.step_count}

    def load_state_dict(self, data: dict) -> None:
        for key, value in data.items():
            setattr(self, key, value)
