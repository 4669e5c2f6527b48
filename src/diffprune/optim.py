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

import functools

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


# torch's AdamW kernel (one pass over the tensors; what AdamW(fused=True) calls), if present
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)
# False: the gate step always runs apart from the gradient's kernel (bench/train_cost.py
# measures both ways)
STEP_IN_KERNEL = True


class GateStep:
    """AdamW's update for the gate logits of one param group, applied by the fused gate's
    backward (fused.GatedDelta, ``gate_step``) span by span while the gradient is computed:
    no N-sized gradient is stored and the optimizer skips those parameters (their grad stays
    None). With counter.py's compiled kernels and one process, the step is taken in the
    same loop that computes the span's gradient (counter's backward_step: no gradient span
    is written and read back, one call per span instead of two). The state lives in the
    optimizer under torch's AdamW keys (step, exp_avg, exp_avg_sq), so checkpoints,
    resuming and falling back to the plain step keep working.

    Same update as torch.optim.AdamW (amsgrad and maximize off). Exact only where the gate
    gradient is final when backward reaches the gate: no clipping across parameters, no
    other loss term on log_alpha, no gradient accumulation. Under data parallelism
    ``reduce`` (distributed.averager) averages each span's gradient across processes before
    the step, as DDP would have averaged the whole gradient (the gates are then left out of
    DDP's own reduction).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group_name: str = "gates",
                 reduce=None):
        self.optimizer, self.group_name, self.reduce = optimizer, group_name, reduce
        group = self._group()
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("GateStep implements AdamW without amsgrad or maximize")

    def _group(self) -> dict:
        # looked up every step: load_state_dict replaces the group dicts (and the state)
        groups = [g for g in self.optimizer.param_groups if g.get("name") == self.group_name]
        if len(groups) != 1:
            raise ValueError(f"expected one param group named {self.group_name!r}")
        return groups[0]

    @torch.no_grad()
    def step_all(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """One AdamW step of each of ``params`` with its whole gradient, all at once: one
        multi-tensor kernel where torch has it (flat.GatedFlat's backward on a GPU), with
        no value read back from the device. Under data parallelism the caller averages the
        gradients first (``reduce``: flat.py does it once for all of them)."""
        states = [self.optimizer.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        g = self._group()
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if _FUSED_ADAMW is None or params[0].device.type not in ("cpu", "cuda"):
            for p, state, grad in zip(params, states, grads):
                SpanStep(p, state, g, None)(slice(None), grad.reshape(-1))
            return
        _FUSED_ADAMW([p.detach() for p in params], grads, [s["exp_avg"] for s in states],
                     [s["exp_avg_sq"] for s in states], [], steps, lr=g["lr"],
                     beta1=g["betas"][0], beta2=g["betas"][1], weight_decay=g["weight_decay"],
                     eps=g["eps"], amsgrad=False, maximize=False)

    @torch.no_grad()
    def begin(self, param: torch.Tensor, reduced: bool = False) -> "SpanStep":
        """One optimizer step of ``param`` begins: returns its SpanStep (called as
        update(span, grad_of_span)). ``reduced``: the caller has already averaged the
        gradient across processes."""
        state = self.optimizer.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        g = self._group()
        return SpanStep(param, state, g, None if reduced else self.reduce)


class SpanStep:
    """AdamW's step of one parameter, applied span by span: ``update(span, grad)``. Where
    no reduction across processes is pending (``in_kernel``), a caller may instead fuse the
    same update into the kernel that computes the gradient (counter.py's backward_step),
    with ``views(span)`` and ``constants``."""

    def __init__(self, param: torch.Tensor, state: dict, group: dict, reduce):
        self.lr, (self.beta1, self.beta2) = group["lr"], group["betas"]
        self.eps, self.wd = group["eps"], group["weight_decay"]
        self.count = state["step"]  # already counted up, as torch.optim does before the kernel
        t = float(self.count)
        self.step_size = self.lr / (1 - self.beta1 ** t)
        self.root_bc2 = (1 - self.beta2 ** t) ** 0.5
        self.p, self.m, self.v = (x.detach().view(-1)
                                  for x in (param, state["exp_avg"], state["exp_avg_sq"]))
        self.reduce = reduce
        self.in_kernel = reduce is None and STEP_IN_KERNEL

    @functools.cached_property
    def constants(self) -> tuple[torch.Tensor, ...]:
        """The kernel's constants as 0-dim float32 tensors (made once per step, not per
        span), each computed in double and rounded once (1 - 0.999 computed in float32 is
        off by 1e-5): 1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, eps,
        step_size, sqrt of bias correction 2."""
        return tuple(torch.tensor(x, dtype=torch.float32, device=self.p.device) for x in (
            1 - self.lr * self.wd, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2,
            self.eps, self.step_size, self.root_bc2))

    def views(self, span: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The span of the parameter and of its two moments (flat views, updated in place)."""
        return self.p[span], self.m[span], self.v[span]

    @torch.no_grad()
    def __call__(self, span: slice, grad: torch.Tensor) -> None:
        if self.reduce is not None:
            self.reduce(grad)
        ps, ms, vs = self.views(span)
        lr, wd = self.lr, self.wd
        if _FUSED_ADAMW is not None and ps.device.type in ("cpu", "cuda"):
            _FUSED_ADAMW([ps], [grad], [ms], [vs], [], [self.count], lr=lr, beta1=self.beta1,
                         beta2=self.beta2, weight_decay=wd, eps=self.eps, amsgrad=False,
                         maximize=False)
            return
        if wd:
            ps.mul_(1 - lr * wd)
        ms.lerp_(grad, 1 - self.beta1)
        vs.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        ps.addcdiv_(ms, vs.sqrt().div_(self.root_bc2).add_(self.eps), value=-self.step_size)
