"""Embedding matrices gated only at the rows a training forward looks up.

A batch of 32 sequences of 128 tokens reads at most 4,096 of BERT's 30,522 word-embedding
rows, and the loss does not depend on the others: their theta is never read, their gradients
of w and log_alpha are exactly 0 whatever their gate sample. Yet the word embeddings are half
of MiniLM's parameters (11.7M of 22.7M), and the fused gate (fused.GatedDelta) drew noise,
computed gates and wrote theta for every row, then read every row again in backward.

Here an nn.Embedding that owns a target alone gets a forward pre-hook. In a training forward
the root's materialisation (parametrize.DiffState) leaves that target pending, with the seed
it would have given fused.GatedDelta; the hook then computes theta for the rows in its input
only (counter.py's kernels, noise at each entry's flat position: the same gate samples as the
full tensor's) and hands the module those rows and the input renumbered into them. Backward
computes the rows' gradients, and the gate logits take their AdamW step over the whole
tensor (the untouched rows with gradient 0, as AdamW would) once backward is done, from all
the module's calls in that forward together.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import counter


class Pending:
    """One target's gate constants for one training forward, shared by the module's calls
    in it; collects their gate-logit gradients for one AdamW step (optim.GateStep)."""

    def __init__(self, kernels: counter.Kernels, seed: torch.Tensor, shift: torch.Tensor,
                 zg: torch.Tensor, gate_step):
        self.kernels, self.seed, self.shift, self.gate_step = kernels, seed, shift, gate_step
        self.zg = zg  # the tensor's group gate (0-dim, in the autograd graph)
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows (k,), grad (k, D))

    def add_gate_grad(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        if not self.grads:  # the first call's backward: step once, after all of them
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._step, param))
        self.grads.append((rows, grad))

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        """AdamW over the whole (V, D) tensor, span by span, the gradient 0 off the rows."""
        rows = torch.cat([r for r, _ in self.grads])
        vals = torch.cat([g for _, g in self.grads])
        self.grads = []
        if len(rows) > 1:
            rows, order = torch.sort(rows, stable=True)
            vals = vals[order]
        n_rows, width = param.shape
        per = max(1, counter.CHUNK // width)  # rows per span
        starts = list(range(0, n_rows, per))
        bounds = torch.searchsorted(rows, torch.tensor(starts + [n_rows])).tolist()
        update = self.gate_step.begin(param)
        buf = torch.empty(min(per, n_rows) * width, dtype=param.dtype)
        for j, r0 in enumerate(starts):
            r1 = min(n_rows, r0 + per)
            lo, hi = bounds[j], bounds[j + 1]
            span = buf[:(r1 - r0) * width].zero_()
            if hi > lo:
                span.view(r1 - r0, width).index_add_(0, rows[lo:hi] - r0, vals[lo:hi])
            update(slice(r0 * width, r1 * width), span)


class GatedRows(torch.autograd.Function):
    """theta0[rows] + z * zg * w[rows] for the (k,) sorted, distinct ``rows`` of (V, D)
    tensors: (k, D). Gradients: w's and log_alpha's are 0 off the rows; with a gate_step the
    logits step after backward (Pending) and get no gradient."""

    @staticmethod
    def forward(ctx, pending: Pending, rows, theta0, w, log_alpha, zg):
        out = pending.kernels.forward_rows(theta0, w.detach(), log_alpha.detach(),
                                           pending.shift, zg.detach().to(w.dtype),
                                           pending.seed, rows)
        ctx.pending, ctx.log_alpha = pending, log_alpha  # the Parameter itself
        ctx.save_for_backward(rows, w, log_alpha, zg)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, w, a, zg = ctx.saved_tensors
        p = ctx.pending
        need_w, need_a, need_zg = ctx.needs_input_grad[3:6]
        grad_w, grad_a, dot = p.kernels.backward_rows(
            grad.contiguous().to(w.dtype), w, a, p.shift, zg.detach().to(w.dtype), p.seed, rows)
        grad_w = w.new_zeros(w.shape).index_copy_(0, rows, grad_w) if need_w else None
        if need_a and p.gate_step is not None:
            p.add_gate_grad(ctx.log_alpha, rows, grad_a)
            grad_a = None
        elif need_a:
            grad_a = a.new_zeros(a.shape).index_copy_(0, rows, grad_a)
        else:
            grad_a = None
        grad_zg = dot.reshape(zg.shape).to(zg.dtype) if need_zg else None
        return None, None, None, grad_w, grad_a, grad_zg


def eligible(target) -> bool:
    """A target the hook can gate by rows: one plain nn.Embedding's weight, alone (not tied),
    large enough to be worth it, with no max_norm (which rewrites the weight) or sparse
    gradient."""
    if len(target.owners) != 1 or len(target.shape) != 2:
        return False
    module, attr = target.owners[0]
    return (type(module) is nn.Embedding and attr == "weight" and module.max_norm is None
            and not module.sparse and target.numel >= counter.SMALL)


def local_rows(ids: torch.Tensor, n_rows: int, padding_idx: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, local): the distinct rows ``ids`` reads, sorted, and ids renumbered into them.
    Rows 0 .. padding_idx are always included, so padding_idx keeps its number and
    F.embedding leaves its gradient out as before."""
    flat = ids.reshape(-1)
    if padding_idx is not None:
        flat = torch.cat([flat, torch.arange(padding_idx + 1, dtype=flat.dtype)])
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= n_rows):
        raise IndexError(f"embedding index out of range: ids span {int(rows[0])}.."
                         f"{int(rows[-1])}, the table has {n_rows} rows")
    return rows, inverse[:ids.numel()].view(ids.shape)


def _hook(state, i: int, module: nn.Module, args, kwargs):
    pending = state.rows_pending.get(i)
    if pending is None:  # not a training forward: the module holds the whole theta
        return None
    ids = args[0] if args else kwargs["input"]
    rows, local = local_rows(ids, state.targets[i].shape[0], module.padding_idx)
    module.__dict__["weight"] = GatedRows.apply(
        pending, rows, state.theta0(i), state.w[i], state.log_alpha[i], pending.zg)
    return ((local, *args[1:]), kwargs) if args else (args, {**kwargs, "input": local})


def install(state) -> list:
    """Forward pre-hooks on the embeddings gated by rows; returns their handles."""
    handles = []
    for i, target in enumerate(state.targets):
        if eligible(target):
            module = target.owners[0][0]
            handles.append(module.register_forward_pre_hook(
                functools.partial(_hook, state, i), with_kwargs=True))
            state.row_targets.add(i)
    return handles
