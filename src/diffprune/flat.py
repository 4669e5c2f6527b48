"""The L0 stage's gates for every target in one pass over their concatenation (accelerators).

On a GPU each elementwise pass is a kernel launch of a few microseconds whatever its size.
fused.GatedDelta takes about 30 of them per target and step, and the gate logits' optimizer
step one more per target; a BERT model has 100-400 targets, so diff pruning's step was
bound by launches (and, while the step count was read back per target, by waiting for the
device): on an H200, with 16 runs sharing it, full finetuning of MiniLM on CoLA finished in
227 s and diff pruning had not finished after 320 s (bench/README.md, session 26). Here
theta0, w and
log_alpha of all targets are concatenated (three copies of N entries, cheap on a GPU), the
gate runs over the flat vector in chunks of fused.chunk_for(device) entries, and the thetas
are views of the flat result; backward computes the flat gradients in the same chunks, the
group gates' gradients as per-target sums (a segment reduction per chunk), and steps every
gate logit at once (optim.GateStep.step_all: one multi-tensor AdamW kernel). The flat
theta lives until the end of backward (per target, each theta could go once its
consumer's backward had run): one more copy of N entries at the peak. The concatenated w
and log_alpha are not kept between forward and backward: backward concatenates them again.

Same maths as fused.GatedDelta (tested against the plain formulation). The noise comes from
the generator's stream drawn chunk by chunk over the flat vector, so it differs from the
per-target path's draws: one sample is as good as the other, but a run on this path does
not repeat one on that path bit for bit.
"""
from __future__ import annotations

import math
import os

import torch

from .fused import _default_generator, _spans, chunk_for
from .gates import _U_EPS

# True (or DIFFPRUNE_FLAT_ON_CPU=1): this path on CPU too, with a torch generator for the noise
# (DiffState.noise_generator): the accelerators' code, run where the tests run; the CPU has
# faster kernels of its own
ON_CPU = os.environ.get("DIFFPRUNE_FLAT_ON_CPU", "0") == "1"


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once: a tensor built from host data each
    step would be a copy to the device each step, which waits for the device's queue."""
    key = (values, device)
    if key not in _CONSTANTS:
        if len(_CONSTANTS) > 64:  # a few models per process; never grow without bound
            _CONSTANTS.clear()
        _CONSTANTS[key] = torch.tensor(values, device=device)
    return _CONSTANTS[key]


def usable(theta0s: list[torch.Tensor], generator) -> bool:
    """Whether the flat path applies: an accelerator (or ON_CPU), a torch generator or the
    global one where it is known (fused._default_generator), and one dtype and device for
    all of theta0."""
    device = theta0s[0].device
    return ((device.type != "cpu" or ON_CPU)
            and (isinstance(generator, torch.Generator)
                 or generator is None and _default_generator(device) is not None)
            and all(t.device == device and t.dtype == theta0s[0].dtype for t in theta0s))


def _cat(tensors) -> torch.Tensor:
    """The tensors' entries, one after another, in one flat tensor (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut back into views shaped like ``like`` (the inverse of _cat)."""
    return [x.view(t.shape) for x, t in zip(flat.split([t.numel() for t in like]), like)]


def gated_thetas(theta0s, ws, log_alphas, shift, zg, left: float, right: float,
                 temperature: float, stochastic: bool, expected_grad: bool, generator=None,
                 gate_step=None) -> list[torch.Tensor]:
    """theta_i = theta0_i + (z_i * zg_i) * w_i for every target i, through one GatedFlat.
    With ``gate_step`` the logits (when they need a gradient) step inside backward and get
    none; otherwise they get theirs through the concatenation."""
    sizes = [t.numel() for t in theta0s]
    with torch.no_grad():
        theta0 = _cat(theta0s)
    w = _cat(ws)
    a = _cat(log_alphas)  # with a gate_step, its grad is None
    lengths = constant(tuple(sizes), theta0.device)
    flat = GatedFlat.apply(theta0, w, a, shift, zg, lengths,
                           (left, right, temperature if stochastic else 1.0, stochastic,
                            expected_grad, generator, gate_step, list(ws), list(log_alphas),
                            sizes))
    return _views(flat, theta0s)


def offset_indices(indices: list[torch.Tensor], theta0s: list[torch.Tensor]) -> torch.Tensor:
    """The fixed stage's flat positions per target, as positions in the concatenation."""
    offsets, start = [], 0
    for t in theta0s:
        offsets.append(start)
        start += t.numel()
    return torch.cat([i + o for i, o in zip(indices, offsets)])


def fixed_thetas(theta0s, values, flat_indices: torch.Tensor) -> list[torch.Tensor]:
    """The fixed stage's theta_i = theta0_i with its values scattered in, for every target
    in one scatter (the same sums as DiffState.thetas's per-target ones, bit for bit)."""
    with torch.no_grad():
        theta0 = _cat(theta0s)
    v = _cat(values)
    return _views(theta0.to(v.dtype).index_add(0, flat_indices, v).to(theta0.dtype), theta0s)


def _gate(a: torch.Tensor, shift, left, right, temperature, noise) -> torch.Tensor:
    """z of one flat span: clamp(sigmoid((a + shift + logit(u)) / T) (r - l) + l, 0, 1)."""
    z = a + shift
    if noise is not None:
        z.add_(noise.logit_(_U_EPS))
    if temperature != 1.0:
        z.div_(temperature)
    return z.sigmoid_().mul_(right - left).add_(left).clamp_(0.0, 1.0)


def _overlaps(sizes: list[int], span: slice) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The targets (by index) that share entries with ``span`` of the concatenation, and
    how many entries each shares."""
    ids, parts, start = [], [], 0
    for i, n in enumerate(sizes):
        lo, hi = max(start, span.start), min(start + n, span.stop)
        if hi > lo:
            ids.append(i)
            parts.append(hi - lo)
        start += n
    return tuple(ids), tuple(parts)


def _noise(n: int, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)


class GatedFlat(torch.autograd.Function):
    """The flat gate: inputs theta0, w, log_alpha (N,), shift (0-dim), zg (targets,),
    lengths (targets,); consts = (left, right, temperature, stochastic, expected_grad,
    generator, gate_step, the w and log_alpha tensors per target, their sizes). Backward
    draws the forward's noise again from the generator's saved state, and concatenates w
    and log_alpha again from the targets' tensors (unchanged until the optimizer steps)
    rather than keeping the forward's copies alive through the whole step."""

    @staticmethod
    def forward(ctx, theta0, w, a, shift, zg, lengths, consts):
        left, right, temperature, stochastic, expected_grad, generator, gate_step, ws, params, \
            sizes = consts
        if stochastic and generator is None:
            generator = _default_generator(a.device)
        state = generator.get_state() if stochastic else None
        n = a.numel()
        zg_e = torch.repeat_interleave(zg.detach(), lengths, output_size=n)
        theta = torch.empty_like(theta0)
        with torch.no_grad():
            for s in _spans(n, chunk_for(a.device)):
                noise = _noise(s.stop - s.start, generator, a) if stochastic else None
                z = _gate(a[s], shift, left, right, temperature, noise).mul_(zg_e[s])
                if theta.dtype == w.dtype:
                    torch.addcmul(theta0[s], z, w[s], out=theta[s])
                else:  # half-precision base: the sum in w's dtype, then rounded once
                    theta[s] = torch.addcmul(theta0[s].to(w.dtype), z, w[s])
        ctx.consts = (left, right, temperature, stochastic, expected_grad, state,
                      gate_step, ws, params, sizes)
        ctx.save_for_backward(shift, zg, lengths)
        return theta

    @staticmethod
    def backward(ctx, grad):
        shift, zg, lengths = ctx.saved_tensors
        left, right, temperature, stochastic, expected_grad, state, gate_step, ws, params, \
            sizes = ctx.consts
        with torch.no_grad():
            w, a = _cat(ws), _cat(params)
        need_w, need_a, need_zg = (ctx.needs_input_grad[i] for i in (1, 2, 4))
        step = gate_step is not None and need_a  # the logits step here, get no gradient
        generator = None
        if stochastic:
            generator = torch.Generator(a.device)
            generator.set_state(state)
        n = a.numel()
        zg_e = torch.repeat_interleave(zg.detach(), lengths, output_size=n)
        grad_w = torch.empty_like(w) if need_w else None
        grad_a = torch.empty_like(a) if need_a else None
        grad_zg = torch.zeros_like(zg) if need_zg else None
        c = temperature * math.log(-left / right)
        for s in _spans(n, chunk_for(a.device)):
            noise = _noise(s.stop - s.start, generator, a) if stochastic else None
            z = _gate(a[s], shift, left, right, temperature, noise)
            g = grad[s].to(w.dtype)
            gw = g * w[s]
            if need_zg:  # per-target sums of g * w * z over this chunk's part of each
                ids, parts = _overlaps(sizes, s)
                grad_zg.index_add_(0, constant(ids, a.device), torch.segment_reduce(
                    gw * z, "sum", lengths=constant(parts, a.device)))
            if grad_w is not None:
                torch.mul(g, z, out=grad_w[s]).mul_(zg_e[s])
            if grad_a is not None:
                if expected_grad:  # d/da P(z != 0) = sigma'(a + shift - c)
                    p = (a[s] + shift).sub_(c).sigmoid_()
                    torch.addcmul(p, p, p, value=-1.0, out=grad_a[s])
                else:  # dz/da inside the unclamped band, 0 where z is clamped
                    sig = (z - left).div_(right - left)  # the sigmoid, where unclamped
                    torch.addcmul(sig, sig, sig, value=-1.0, out=grad_a[s]).mul_(
                        (right - left) / temperature).mul_((z > 0) & (z < 1))
                grad_a[s].mul_(gw).mul_(zg_e[s])
        if step:
            if gate_step.reduce is not None:  # data parallel: one average for all the gates
                gate_step.reduce(grad_a)
            gate_step.step_all(params, _views(grad_a, params))
            grad_a = None
        return None, grad_w, grad_a, None, grad_zg, None, None
