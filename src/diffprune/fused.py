"""theta = theta0 + z * w with the hard-concrete gate fused into one autograd Function.

Plain autograd keeps every intermediate of the gate (noise, pre-sigmoid, sigmoid, stretched,
clamped) for backward. This Function keeps none of them: with a noise generator it saves the
generator's state and backward draws the same noise again, recomputing the elementwise gate z
(without one, e.g. the deterministic test-time gate, it keeps z). Inside the unclamped region
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

import torch

from .gates import _U_EPS


def _gate(log_alpha: torch.Tensor, left: float, right: float, temperature: float,
          stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    """z (clamped stretched sigmoid) in one buffer; the noise comes from ``generator``."""
    if stochastic:
        z = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device,
                       dtype=log_alpha.dtype).logit_(_U_EPS).add_(log_alpha)
    else:
        z = log_alpha.clone()
    if temperature != 1.0:
        z.div_(temperature)
    return z.sigmoid_().mul_(right - left).add_(left).clamp_(0.0, 1.0)


class GatedDelta(torch.autograd.Function):
    """theta0 + (z * zg) * w, z ~ hard-concrete(log_alpha); differentiable in w, log_alpha, zg.

    With a ``generator``, nothing of size N is kept for backward: the generator's state
    before sampling is saved and backward draws the same noise again (bit-identical z)."""

    @staticmethod
    def forward(ctx, theta0, w, log_alpha, zg, left: float, right: float, temperature: float,
                stochastic: bool, expected_grad: bool = False,
                generator: torch.Generator | None = None):
        if not stochastic:
            temperature = 1.0  # the test-time gate has no temperature
        recompute = stochastic and generator is not None
        ctx.consts = (left, right, temperature, expected_grad, stochastic,
                      generator.get_state() if recompute else None,
                      generator.device if recompute else None)
        with torch.no_grad():
            z = _gate(log_alpha, left, right, temperature, stochastic, generator)
            scale = z.mul_(zg) if recompute else z * zg
            theta = torch.addcmul(theta0.to(w.dtype), scale, w).to(theta0.dtype)
        ctx.save_for_backward(None if recompute else z, w, zg, log_alpha)
        return theta

    @staticmethod
    def backward(ctx, grad):
        z, w, zg, log_alpha = ctx.saved_tensors
        left, right, temperature, expected_grad, stochastic, rng_state, device = ctx.consts
        if z is None:  # draw the forward's noise again
            gen = torch.Generator(device)
            gen.set_state(rng_state)
            z = _gate(log_alpha, left, right, temperature, stochastic, gen)
        grad = grad.to(w.dtype)
        grad_w = grad_a = grad_zg = None
        if ctx.needs_input_grad[1]:
            grad_w = grad * z
            grad_w.mul_(zg)
        gw = grad * w  # dL/d(z * zg)
        if ctx.needs_input_grad[2] and expected_grad:
            # sigma'(x) = p - p^2 with p = sigmoid(a - c), computed in place
            grad_a = torch.sigmoid(log_alpha - temperature * math.log(-left / right))
            grad_a.addcmul_(grad_a, grad_a, value=-1.0).mul_(gw).mul_(zg)
        elif ctx.needs_input_grad[2]:
            # s = (z - l) / (r - l) inside the unclamped band, s (1 - s) (r - l) / T there
            grad_a = (z - left).div_(right - left)
            grad_a.addcmul_(grad_a, grad_a, value=-1.0).mul_((right - left) / temperature)
            grad_a.mul_((z > 0) & (z < 1)).mul_(gw).mul_(zg)
        if ctx.needs_input_grad[3]:
            grad_zg = torch.dot(gw.reshape(-1), z.reshape(-1)).reshape(zg.shape)
        return None, grad_w, grad_a, grad_zg, None, None, None, None, None, None
