"""AdamW for the diff and head, and a gate update that keeps the size of each gate's evidence.

Adam divides each gate's gradient by that gate's own running RMS. A gate whose task gradient
g * w (fused.py) is tiny but steady then moves as fast as one whose gradient is large, so the
gates order themselves by how *consistent* their evidence is, not by how much the loss cares;
the density controller's shared offset (penalty.py) then closes gates almost regardless of
importance. ``gate_update="shared_rms"`` keeps Adam's first moment per gate but divides by one
running RMS shared by the whole group: the typical step is still about lr (scale-free, no
per-model tuning), while a gate with ten times the typical gradient moves ten times as far.
The accumulated update is then a first-order importance score, as in movement pruning
(Sanh, Wolf & Rush 2020), and the optimizer keeps one state tensor per gate instead of two.
"""
from __future__ import annotations

import torch


class DiffAdamW(torch.optim.AdamW):
    """torch's AdamW, except for param groups with ``shared_rms=True`` (see module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        stashed = []
        for group in self.param_groups:
            if group.get("shared_rms"):
                self._shared_rms_step(group)
                for p in group["params"]:  # AdamW skips parameters without a gradient
                    stashed.append((p, p.grad))
                    p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, grad in stashed:
                p.grad = grad

    def _shared_rms_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        head = self.state[params[0]]  # the group's shared scalars live with its first tensor
        if "step" not in head:
            head["step"] = torch.zeros(())
            head["sq"] = torch.zeros(())  # float32: survives load_state_dict unchanged
        head["step"] += 1
        t = float(head["step"])
        mean_sq = sum(p.grad.double().pow(2).sum() for p in params) / sum(p.numel()
                                                                          for p in params)
        head["sq"].mul_(beta2).add_(mean_sq.float().cpu(), alpha=1 - beta2)
        rms = float((head["sq"] / (1 - beta2 ** t)).sqrt()) + group["eps"]
        step_size = group["lr"] / (1 - beta1 ** t) / rms
        for p in params:
            state = self.state[p]
            if "m" not in state:
                state["m"] = torch.zeros_like(p)
            state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)  # (same shape as p)
            p.add_(state["m"], alpha=-step_size)
