"""theta = theta0 + z * w with the hard-concrete gate fused into one autograd Function.

Plain autograd keeps every intermediate of the gate (noise, pre-sigmoid, sigmoid, stretched,
clamped) for backward. This Function keeps none of them at their full size. On CPU, float32
and a gates.CpuNoise generator (the trainer's), both directions run as counter.py's compiled
kernels, whose noise is a function of (seed, position) computed again in backward.
Otherwise, with numpy's noise (gates.CpuNoise; counter.ENABLED off or other dtypes) a chunk
of the sampled gate z that needed noise for every entry is kept in a compact exact form when
nearly all of it is 0 or 1, as at the start of the L0 phase (_SparseZ: the clamp value
most entries share plus the rest by position); otherwise backward draws the same noise again
(only where it was drawn) and recomputes z, as it always does with a torch generator (the
test-time gate needs no noise), in chunks that stay in cache. Inside the unclamped region
the sigmoid value is s = (z - l) / (r - l), so dz/dlog_alpha = (r - l) * s * (1 - s) /
temperature, and it is 0 where z is clamped at 0 or 1. Same maths as gates.sample_gate
(tested against it).

``expected_grad=True`` swaps that sampled derivative for the derivative of the probability
that the gate is open, d/da P(z != 0) = sigma'(a - c) (a smoothed, always-positive surrogate
of d E[z] / da). A gate that is clamped at the sampled noise still learns g * w, the first-order
change of the loss if it opened or closed. With few training steps and low densities, the
sampled derivative is zero for almost every gate at almost every step and the gates do not
separate; see bench/README.md for the measurements behind the default.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import counter
from .gates import _U_EPS, CpuNoise, replay, uniform


def _gate(log_alpha: torch.Tensor, shift: torch.Tensor, left: float, right: float,
          temperature: float, stochastic: bool, generator, record: list | None = None
          ) -> torch.Tensor:
    """z (clamped stretched sigmoid) of log_alpha + shift in one buffer; the noise comes from
    ``generator`` (a _SpanNoise: what the forward drew for this span). With a CpuNoise and
    a flat span, what was drawn is appended to ``record``."""
    z = log_alpha + shift
    if stochastic and isinstance(generator, _SpanNoise):
        generator.add_to(z)
    elif stochastic and isinstance(generator, CpuNoise) and z.dim() == 1:
        drawn = _add_noise_where_uncertain(z, generator, *_certain_band(left, right, temperature))
        if record is not None:
            record.append(drawn)
    elif stochastic:
        z.add_(uniform(log_alpha.shape, generator, log_alpha.device,
                       log_alpha.dtype).logit_(_U_EPS))
    if temperature != 1.0:
        z.div_(temperature)
    return z.sigmoid_().mul_(right - left).add_(left).clamp_(0.0, 1.0)


# |logit(u)| for u clamped into [eps, 1 - eps]: no noise sample lies beyond it.
_LOGIT_MAX = math.log((1 - _U_EPS) / _U_EPS)
_MARGIN = 0.01  # logits of slack around the band, far above float rounding
_DENSE_FRACTION = 0.25  # above this share of uncertain gates in a span, draw for all of it
# z of a span is kept (_SparseZ) when at most this share of it differs from its fill value:
# at most 1.2 bytes per entry (int64 position + float32 value), 27 MB for MiniLM's 22.7M gates
_KEEP_FRACTION = 0.1
KEEP_Z = True  # False: always replay the noise (bench/gate_cost.py measures both)


def _logit(p: float) -> float:
    return -math.inf if p <= 0.0 else math.inf if p >= 1.0 else math.log(p / (1.0 - p))


def _certain_band(left: float, right: float, temperature: float) -> tuple[float, float]:
    """(lo, hi): a gate logit x <= lo gives z = 0 and x >= hi gives z = 1 for every noise
    value, since z = clamp(sigmoid((x + L) / T) (r - l) + l, 0, 1) with |L| <= _LOGIT_MAX."""
    q0 = _logit(-left / (right - left))  # s below this: z clamped at 0
    q1 = _logit((1.0 - left) / (right - left))  # s above this: z clamped at 1
    return temperature * q0 - _LOGIT_MAX - _MARGIN, temperature * q1 + _LOGIT_MAX + _MARGIN


class _SparseZ:
    """One span of the sampled gate z, kept exactly for backward in place of its noise:
    every entry is ``fill`` (0 or 1, the clamp value most entries share) except those at
    ``idx``, whose values are ``vals``. Rebuilding costs two cheap passes where replaying the
    noise costs a draw, a logit and the gate again (on CPU the draw is the costliest part)."""

    __slots__ = ("fill", "idx", "vals")

    def __init__(self, fill: float, idx: torch.Tensor, vals: torch.Tensor):
        self.fill, self.idx, self.vals = fill, idx, vals

    def z(self, n: int, like: torch.Tensor) -> torch.Tensor:
        z = torch.full((n,), self.fill, dtype=like.dtype, device=like.device)
        return z.index_copy_(0, self.idx, self.vals) if self.idx.numel() else z

    @staticmethod
    def of(z: torch.Tensor) -> "_SparseZ | None":
        """z (a CPU span) in this form when at most _KEEP_FRACTION of it differs from 0 or
        from 1, else None (its noise is replayed instead). sum(z) bounds both counts from
        below, so a span that cannot qualify costs one pass; numpy finds the positions about
        4x faster than torch.nonzero here."""
        if z.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
            return None
        n = z.numel()
        limit = _KEEP_FRACTION * n
        total = float(z.sum())  # <= #(z != 0), and n - total <= #(z != 1), as 0 <= z <= 1
        fill = 0.0 if total <= limit else 1.0 if n - total <= limit else None
        if fill is None:
            return None
        zn = z.numpy()
        idx = np.flatnonzero(zn != fill)
        if len(idx) > limit:
            return None
        return _SparseZ(fill, torch.from_numpy(idx), torch.from_numpy(zn[idx]))


class _SpanNoise:
    """The noise one span of the forward drew, for its backward: the generator's state when
    the whole span was drawn, or the uncertain positions and their noise (a few % of the
    span once the gates have separated, at most _DENSE_FRACTION of it), or nothing."""

    __slots__ = ("state", "idx", "noise")

    def __init__(self, state=None, idx=None, noise=None):
        self.state, self.idx, self.noise = state, idx, noise

    def add_to(self, x: torch.Tensor) -> None:
        if self.state is not None:
            x.add_(CpuNoise().set_state(self.state).uniform(tuple(x.shape), x.dtype)
                   .logit_(_U_EPS))
        elif self.idx is not None:
            x.index_add_(0, self.idx, self.noise)


def _add_noise_where_uncertain(x: torch.Tensor, generator: CpuNoise, lo: float,
                               hi: float) -> _SpanNoise:
    """x += logistic noise, drawn only for the entries whose gate the noise can change.

    Once the gates have separated most logits lie outside (lo, hi) (2.5% inside at the end
    of an STS-B L0 phase here), so most of the random numbers, the costliest part of a
    gate on CPU, are never drawn. The sample is still exact: the skipped gates are 0 or 1
    whatever the noise. How many numbers are drawn (k, or all of the span when k exceeds
    _DENSE_FRACTION of it) follows from x alone. Returns what was drawn, so that backward
    adds the same noise without searching for the uncertain gates again."""
    if not x.numel():
        return _SpanNoise()
    least, most = (float(v) for v in torch.aminmax(x))
    if least >= hi or most <= lo:  # every gate certain
        return _SpanNoise()
    unsure = None if least > lo and most < hi else (x > lo).logical_and_(x < hi)
    k = x.numel() if unsure is None else int(unsure.sum())
    if k > _DENSE_FRACTION * x.numel():  # gathering would cost more than drawing for all
        state = generator.get_state()
        x.add_(generator.uniform(tuple(x.shape), x.dtype).logit_(_U_EPS))
        return _SpanNoise(state=state)
    if not k:
        return _SpanNoise()
    idx = unsure.nonzero().squeeze(1).to(torch.int32)
    noise = generator.uniform((k,), x.dtype).logit_(_U_EPS)
    x.index_add_(0, idx, noise)
    return _SpanNoise(idx=idx, noise=noise)


# Elements per chunk: every temporary (noise, gate, products) is this size instead of the
# tensor's, and stays in cache between the elementwise passes.
CHUNK = 1 << 18
# On a GPU each pass is a kernel launch of a few microseconds whatever its size, and cache
# does not pay for them: chunks of 16M entries (64 MB temporaries in float32) put most of a
# base-size model's tensors in one chunk each (and flat.py's concatenation of all of them
# in a few).
GPU_CHUNK = 1 << 24


def chunk_for(device: torch.device) -> int:
    """Elements per chunk of the fused gate's passes on ``device``."""
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator behind torch's global RNG on ``device`` (None where unknown)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None


class GatedDelta(torch.autograd.Function):
    """theta0 + (z * zg) * w, z ~ hard-concrete(log_alpha + shift); differentiable in w,
    log_alpha and zg (``shift``, the density controller's offset, is a constant here).

    Nothing of size N is kept for backward. The deterministic gate is a function of log_alpha;
    for the sampled one the noise generator's state before sampling is saved (``generator``,
    else the device's global one) and backward draws the same noise again (bit-identical z),
    except for the CPU spans kept as _SparseZ.
    Both passes work in chunks of ``chunk_for(device)`` elements, drawing the noise chunk by
    chunk in the same order, so no temporary is larger than a chunk.

    ``gate_step`` (optim.GateStep): log_alpha takes its optimizer step inside backward, span
    by span, as soon as its gradient is known (with counter.py's kernels, in the same
    loop), instead of keeping an N-sized gradient for the optimizer; log_alpha.grad stays
    None. Exact for gates that are not clipped together
    with other parameters (under DDP the stepper averages each span across ranks first)."""

    @staticmethod
    def forward(ctx, theta0, w, log_alpha, shift, zg, left: float, right: float,
                temperature: float, stochastic: bool, expected_grad: bool = False,
                generator=None, gate_step=None):
        if not stochastic:
            temperature = 1.0  # the test-time gate has no temperature
        elif generator is None:
            generator = _default_generator(log_alpha.device)
        keep_z = stochastic and generator is None  # no generator to replay: keep z
        # CpuNoise: counter-based noise in compiled kernels where they apply (counter.py),
        # else each span's draw is recorded (ctx.plan); other generators are replayed
        counted = (stochastic and isinstance(generator, CpuNoise)
                   and counter.usable(theta0, w, log_alpha))
        plan = [] if stochastic and isinstance(generator, CpuNoise) and not counted else None
        replayed = stochastic and not keep_z and not counted and plan is None
        ctx.consts = (left, right, temperature, expected_grad, stochastic,
                      generator.get_state() if replayed else None,
                      (type(generator), generator.device) if replayed else None)
        ctx.counter = None
        with torch.no_grad():
            if counted:
                ctx.counter = (counter.kernels(left, right, temperature, expected_grad),
                               counter.scalar(generator.seed32(), torch.int32),
                               counter.scalar(shift), counter.scalar(zg))
                z, theta = None, _counted_forward(ctx.counter, theta0, w, log_alpha)
            elif keep_z:
                z = _gate(log_alpha, shift, left, right, temperature, True, None)
                theta = torch.addcmul(theta0.to(w.dtype), z * zg, w).to(theta0.dtype)
            else:
                z = None
                theta = torch.empty_like(theta0)
                out, t0, wf, af = (t.reshape(-1) for t in (theta, theta0, w, log_alpha))
                for s in _spans(out.numel(), chunk_for(out.device)):
                    zs = _gate(af[s], shift, left, right, temperature, stochastic,
                               generator, plan)
                    if KEEP_Z and plan and plan[-1].state is not None:  # drawn for all:
                        plan[-1] = _SparseZ.of(zs) or plan[-1]  # keep z instead, if compact
                    zs.mul_(zg)
                    if out.dtype == wf.dtype:
                        torch.addcmul(t0[s], zs, wf[s], out=out[s])
                    else:  # half-precision base: the sum in w's dtype, then rounded once
                        out[s] = torch.addcmul(t0[s].to(wf.dtype), zs, wf[s])
        ctx.chunk = (counter.CHUNK if counted else chunk_for(w.device) if z is None
                     else max(w.numel(), 1))
        ctx.plan = plan
        ctx.gate_step, ctx.log_alpha = gate_step, log_alpha  # the Parameter itself
        ctx.save_for_backward(z, w, zg, log_alpha, shift)
        return theta

    @staticmethod
    def backward(ctx, grad):
        z, w, zg, log_alpha, shift = ctx.saved_tensors
        left, right, temperature, expected_grad, stochastic, rng_state, kind = ctx.consts
        need_w, need_a, need_zg = (ctx.needs_input_grad[i] for i in (1, 2, 4))
        gen = None
        if rng_state is not None:  # draw the forward's noise again, chunk by chunk
            gen = replay(kind[0], rng_state, kind[1])
        grad_w = torch.empty_like(w) if need_w else None
        stepper = ctx.gate_step if need_a else None
        in_kernel, span_a = False, None
        if stepper is not None:  # log_alpha steps here, span by span; no gradient is kept
            grad_a, update = None, stepper.begin(ctx.log_alpha)
            # with the compiled kernels, in the same loop that computes the gradient
            in_kernel = ctx.counter is not None and update.in_kernel
            span_a = None if in_kernel else torch.empty(
                min(ctx.chunk, log_alpha.numel()), dtype=log_alpha.dtype,
                device=log_alpha.device)
        else:
            grad_a = torch.empty_like(log_alpha) if need_a else None
        grad_zg = torch.zeros((), dtype=w.dtype, device=w.device) if need_zg else None
        gf, wf, af = (t.reshape(-1) for t in (grad, w, log_alpha))
        for i, s in enumerate(_spans(wf.numel(), ctx.chunk)):
            g_s = gf[s].to(w.dtype)
            out_w = None if grad_w is None else grad_w.view(-1)[s]
            out_a = (span_a[:s.stop - s.start] if span_a is not None else
                     None if grad_a is None else grad_a.view(-1)[s])
            if in_kernel:
                dot = _counted_backward_step(ctx.counter, s, g_s, wf[s], out_w, update)
            elif ctx.counter is not None:
                dot = _counted_backward(ctx.counter, s, g_s, wf[s], af[s], out_w, out_a)
            else:
                if ctx.plan is not None:
                    gen = ctx.plan[i]
                if isinstance(gen, _SparseZ):
                    zc = gen.z(s.stop - s.start, af)
                else:
                    zc = (z.reshape(-1)[s] if z is not None else
                          _gate(af[s], shift, left, right, temperature, stochastic, gen))
                gw = _grads(g_s, zc, wf[s], af[s], shift, zg, left, right, temperature,
                            expected_grad, out_w, out_a)
                dot = torch.dot(gw, zc) if need_zg else None
            if stepper is not None and not in_kernel:
                update(s, out_a)  # after z and p of this span were computed from the old a
            if need_zg:
                grad_zg += dot
        if need_zg:
            grad_zg = grad_zg.reshape(zg.shape)
        return None, grad_w, grad_a, None, grad_zg, None, None, None, None, None, None, None


def _counted_forward(kernel_args, theta0, w, log_alpha) -> torch.Tensor:
    """theta through counter.py's forward kernel, span by span (positions count from 0)."""
    kernels, seed, shift, zg = kernel_args
    theta = torch.empty_like(theta0)
    out, t0, wf, af = (t.reshape(-1) for t in (theta, theta0, w, log_alpha))
    for s in _spans(out.numel(), counter.CHUNK):
        kernels.forward(out[s], t0[s], wf[s], af[s], shift, zg, seed,
                        counter.scalar(s.start, torch.int32))
    return theta


def _counted_backward(kernel_args, s: slice, g, w, log_alpha, out_w, out_a) -> torch.Tensor:
    """One span's gradients through counter.py's backward kernel; returns sum(g * w * z).
    A gradient that is not needed goes to a scratch buffer."""
    kernels, seed, shift, zg = kernel_args
    scratch = None if out_w is not None and out_a is not None else torch.empty_like(w)
    return kernels.backward(g, w, log_alpha, shift, zg, seed,
                            counter.scalar(s.start, torch.int32),
                            scratch if out_w is None else out_w,
                            scratch if out_a is None else out_a)


def _counted_backward_step(kernel_args, s: slice, g, w, out_w, update) -> torch.Tensor:
    """One span's gradient of w, and log_alpha's AdamW step (optim.SpanStep ``update``), in
    counter.py's backward_step kernel; returns sum(g * w * z)."""
    kernels, seed, shift, zg = kernel_args
    a, m, v = update.views(s)
    return kernels.backward_step(g, w, a, m, v, shift, zg, seed,
                                 counter.scalar(s.start, torch.int32),
                                 torch.empty_like(w) if out_w is None else out_w,
                                 *update.constants)


def _grads(g, z, w, log_alpha, shift, zg, left, right, temperature, expected_grad, out_w, out_a):
    """Gradients of one flat span: dL/dw into ``out_w`` and dL/dlog_alpha into ``out_a``
    (each skipped when None); returns g * w = dL/d(z * zg), from which zg's gradient follows."""
    if out_w is not None:
        torch.mul(g, z, out=out_w).mul_(zg)
    gw = g * w
    if out_a is not None and expected_grad:
        # sigma'(x) = p - p^2 with p = sigmoid(a + shift - c)
        p = (log_alpha + shift).sub_(temperature * math.log(-left / right)).sigmoid_()
        torch.addcmul(p, p, p, value=-1.0, out=out_a).mul_(gw).mul_(zg)
    elif out_a is not None:
        # s = (z - l) / (r - l) inside the unclamped band, s (1 - s) (r - l) / T there
        s = (z - left).div_(right - left)
        torch.addcmul(s, s, s, value=-1.0, out=out_a).mul_((right - left) / temperature)
        out_a.mul_((z > 0) & (z < 1)).mul_(gw).mul_(zg)
    return gw
