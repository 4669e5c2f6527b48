"""The hard-concrete gate (Louizos et al. 2018) in two compiled CPU kernels, with noise from a
counter-based hash instead of a random-number stream.

The fused gate (fused.GatedDelta) spends most of its CPU time in elementwise passes over all N
gates: drawing the noise, its logit, the stretched sigmoid, the clamp, the product with w, and
again in backward. Here each direction is one loop compiled by torch.compile (inductor's
vectorised C++, all cores): forward writes theta = theta0 + z * zg * w, backward writes the
gradients of w and log_alpha and the sum that gives zg's (or, when log_alpha steps inside
backward, backward_step takes its AdamW step in the same loop instead of writing its
gradient). A second pair does the same for
chosen rows of a matrix (rows.GatedRows: the embedding rows a batch reads), with each
entry's noise at its flat position in the whole matrix.

The noise u of gate i is a pure function of (seed, i): two rounds of murmur3's 32-bit
finaliser, whose top 24 bits make u in (0, 1), clamped into [_U_EPS, 1 - _U_EPS] as in
gates.sample_gate. Backward recomputes it instead of storing or replaying a stream, no span
depends on another, and processes that share the seed draw the same mask. One seed per
tensor and step (one for all of the small tensors of GatedGroup) comes from the diff's
noise generator (gates.CpuNoise.seed32), so checkpoints and data-parallel ranks keep one
gate sample per step as before.

Where torch.compile does not work (no C++ compiler, say) the same functions run eagerly:
the same samples, more slowly (a warning says so).
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .gates import _U_EPS

log = logging.getLogger(__name__)

# Set DIFFPRUNE_COUNTER_NOISE=0 for the numpy stream (gates.CpuNoise) on CPU instead.
ENABLED = os.environ.get("DIFFPRUNE_COUNTER_NOISE", "1") != "0"
# Elements per kernel call: the gate logits' AdamW step (optim.GateStep) follows each span
# while it is still in cache; each call costs about 0.1 ms of Python and guards.
CHUNK = 1 << 20
_MAX_N = 1 << 31  # positions are int32
_M1, _M2 = -2048144789, -1028477387  # murmur3 fmix32 constants 0x85EBCA6B, 0xC2B2AE35 as int32


def usable(theta0: torch.Tensor, w: torch.Tensor, log_alpha: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32 on CPU, under 2^31 entries."""
    return (ENABLED and w.numel() < _MAX_N
            and all(t.device.type == "cpu" and t.dtype == torch.float32
                    for t in (theta0, w, log_alpha)))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int32 (a bijection; arithmetic shifts masked to logical ones)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _M2
    return h ^ ((h >> 16) & 0xFFFF)


def positions(n: int, offset: torch.Tensor) -> torch.Tensor:
    """Flat positions offset .. offset + n - 1 (int32)."""
    return torch.arange(n, dtype=torch.int32) + offset


def row_positions(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Flat positions of whole rows of a (rows, width) tensor: (k, width), int32."""
    return rows.to(torch.int32).view(-1, 1) * width + torch.arange(width, dtype=torch.int32)


def uniform(pos: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise of the gates at flat positions ``pos`` (int32) under ``seed``."""
    h = _fmix32(_fmix32(pos ^ seed) + seed)
    u = (((h >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # pos's shape
    return u.clamp(_U_EPS, 1.0 - _U_EPS)


def _sigmoid_of_noisy(x: torch.Tensor, u: torch.Tensor, temperature: float,
                      exp_neg_x: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid((x + log u - log(1 - u)) / T); at T = 1 as u / (u + (1 - u) exp(-x)), one
    exponential (``exp_neg_x``, when the caller has it) instead of two logarithms and one."""
    if temperature == 1.0:
        return u / (u + (1.0 - u) * (torch.exp(-x) if exp_neg_x is None else exp_neg_x))
    return torch.sigmoid((x + torch.log(u) - torch.log1p(-u)) / temperature)


def _make(left: float, right: float, temperature: float, expected_grad: bool):
    """The kernels for one set of gate constants (plain functions): forward and backward over
    a flat span, the same over whole rows of a matrix (rows.GatedRows), and their maths."""
    c = temperature * math.log(-left / right)  # P(z != 0) = sigmoid(a - c)

    def gate(a, shift, seed, pos, exp_neg_x=None):
        s = _sigmoid_of_noisy(a + shift, uniform(pos, seed), temperature, exp_neg_x)
        return torch.clamp(s * (right - left) + left, 0.0, 1.0)

    def forward(out, theta0, w, a, shift, zg, seed, offset):
        out.copy_(theta0 + gate(a, shift, seed, positions(a.numel(), offset)) * zg * w)

    def terms(g, w, a, shift, zg, seed, pos):
        """dL/dw, dL/dlog_alpha and g * w * z, the terms of zg's gradient, elementwise."""
        # at T = 1 one exponential serves z and p: exp(-(x - c)) = exp(-x) * exp(c)
        e = torch.exp(-(a + shift)) if expected_grad and temperature == 1.0 else None
        z = gate(a, shift, seed, pos, e)
        gw = g * w  # dL/d(z * zg)
        if expected_grad:  # sigma'(a + shift - c), fused.py's surrogate
            p = (torch.sigmoid(a + shift - c) if e is None else
                 1.0 / (1.0 + e * math.exp(c)))
            grad_a = (p - p * p) * gw * zg
        else:  # dz/da = (r - l) s (1 - s) / T inside the unclamped band, s = (z - l) / (r - l)
            s = (z - left) / (right - left)
            inside = ((z > 0.0) & (z < 1.0)).to(z.dtype)
            grad_a = (s - s * s) * ((right - left) / temperature) * inside * gw * zg
        return g * z * zg, grad_a, gw * z

    def backward(g, w, a, shift, zg, seed, offset, out_w, out_a):
        grad_w, grad_a, dot = terms(g, w, a, shift, zg, seed, positions(g.numel(), offset))
        out_w.copy_(grad_w)
        out_a.copy_(grad_a)
        return dot.sum()

    def backward_step(g, w, a, m, v, shift, zg, seed, offset, out_w, decay, beta1, rest1,
                      beta2, rest2, eps, step_size, root_bc2):
        """backward, then AdamW's step of the span's logits a with the gradient just
        computed from the old a (optim.SpanStep's maths; ``decay`` = 1 - lr * weight_decay,
        ``rest1`` = 1 - beta1 and ``rest2`` = 1 - beta2, each rounded once from double, as
        torch's AdamW does): a and its moments m, v are updated in place, and no gradient
        of a is written."""
        grad_w, grad_a, dot = terms(g, w, a, shift, zg, seed, positions(g.numel(), offset))
        out_w.copy_(grad_w)
        m_new = m + (grad_a - m) * rest1
        v_new = v * beta2 + grad_a * grad_a * rest2
        a.copy_(a * decay - step_size * m_new / (torch.sqrt(v_new) / root_bc2 + eps))
        m.copy_(m_new)
        v.copy_(v_new)
        return dot.sum()

    def forward_rows(theta0, w, a, shift, zg, seed, rows):  # (V, D) each, rows (k,) -> (k, D)
        pos = row_positions(rows, w.shape[1])
        return theta0[rows] + gate(a[rows], shift, seed, pos) * zg * w[rows]

    def backward_rows(g, w, a, shift, zg, seed, rows):  # g (k, D): the rows' gradients
        grad_w, grad_a, dot = terms(g, w[rows], a[rows], shift, zg, seed,
                                    row_positions(rows, w.shape[1]))
        return grad_w, grad_a, dot.sum()

    return forward, backward, forward_rows, backward_rows, backward_step, terms


class Kernels:
    """The compiled kernels for one set of constants; each eager after its first compile
    failure."""

    def __init__(self, left: float, right: float, temperature: float, expected_grad: bool):
        *self.eager, self.terms = _make(left, right, temperature, expected_grad)
        self.compiled = [torch.compile(f, dynamic=True) for f in self.eager]

    def _call(self, which: int, *args):
        if self.compiled[which] is not None:
            try:
                return self.compiled[which](*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run it eagerly
                log.warning("torch.compile failed for the gate kernel (%s: %s); running it "
                            "eagerly: same samples, slower", type(e).__name__, e)
                self.compiled[which] = None
        return self.eager[which](*args)

    def forward(self, *args) -> None:
        self._call(0, *args)

    def backward(self, *args) -> torch.Tensor:
        return self._call(1, *args)

    def forward_rows(self, *args) -> torch.Tensor:
        return self._call(2, *args)

    def backward_rows(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._call(3, *args)

    def backward_step(self, *args) -> torch.Tensor:
        return self._call(4, *args)


_KERNELS: dict[tuple, Kernels] = {}


def kernels(left: float, right: float, temperature: float, expected_grad: bool) -> Kernels:
    key = (float(left), float(right), float(temperature), bool(expected_grad))
    if key not in _KERNELS:
        _KERNELS[key] = Kernels(*key)
    return _KERNELS[key]


def scalar(value, dtype=torch.float32) -> torch.Tensor:
    """A 0-dim CPU tensor: kernel arguments stay tensors, so new values never recompile."""
    return torch.as_tensor(value).detach().to(device="cpu", dtype=dtype).reshape(())


# Tensors under this many entries are gated together (GatedGroup): one eager pass over all
# of them costs less than two compiled calls each (about 0.1 ms of guards and wrappers per
# call, plus the Function's own overhead: MiniLM has 64 biases and layer norms).
SMALL = 1 << 16
_ZERO = torch.zeros((), dtype=torch.int32)


class GatedGroup(torch.autograd.Function):
    """theta_i = theta0_i + z_i * zg_i * w_i for many small tensors in one eager pass of
    the kernels' maths: the tensors laid end to end, one seed for all of them, positions
    counted from the first entry of the first. log_alpha steps inside backward
    (``gate_step``, optim.GateStep) as in fused.GatedDelta, after one reduction of the
    group's gradient under data parallelism.

    apply(consts, *theta0s, *ws, *log_alphas, zg): consts = (Kernels, seed, shift,
    gate_step); zg (n,) holds the n tensors' group gates. Returns the n thetas."""

    @staticmethod
    def forward(ctx, consts, *tensors):
        kernels, seed, shift, _ = consts
        n = len(tensors) // 3
        sizes = [t.numel() for t in tensors[:n]]
        segment = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))  # (total,)
        theta0, w, a = (torch.cat([t.detach().reshape(-1) for t in tensors[k * n:(k + 1) * n]])
                        for k in range(3))
        zg = tensors[-1].detach().to(w.dtype)[segment]  # (total,)
        out = torch.empty_like(w)
        kernels.eager[0](out, theta0, w, a, shift, zg, seed, _ZERO)
        ctx.consts, ctx.sizes, ctx.log_alphas = consts, sizes, tensors[2 * n:3 * n]
        ctx.save_for_backward(w, a, zg, segment)
        return tuple(o.view(t.shape) for o, t in zip(out.split(sizes), tensors[:n]))

    @staticmethod
    def backward(ctx, *grads):
        kernels, seed, shift, stepper = ctx.consts
        w, a, zg, segment = ctx.saved_tensors
        sizes, n = ctx.sizes, len(ctx.sizes)
        g = torch.cat([x.reshape(-1).to(w.dtype) for x in grads])
        grad_w, grad_a, dot = kernels.terms(g, w, a, shift, zg, seed, positions(w.numel(), _ZERO))
        need = ctx.needs_input_grad
        need_w, need_a, need_zg = any(need[1 + n:1 + 2 * n]), any(need[1 + 2 * n:-1]), need[-1]
        grad_zg = (torch.zeros(n, dtype=w.dtype).index_add_(0, segment, dot)
                   if need_zg else None)
        if need_a and stepper is not None:  # log_alpha steps here; no gradient is returned
            if stepper.reduce is not None:
                stepper.reduce(grad_a)
            for p, span in zip(ctx.log_alphas, grad_a.split(sizes)):
                stepper.begin(p, reduced=True)(slice(0, p.numel()), span)
            need_a = False

        def split(flat, wanted):
            return ([x.view(p.shape) for x, p in zip(flat.split(sizes), ctx.log_alphas)]
                    if wanted else [None] * n)
        return (None, *[None] * n, *split(grad_w, need_w), *split(grad_a, need_a), grad_zg)
