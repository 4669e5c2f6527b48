"""Hard-concrete gates as pure functions.

Implements the stretched, clamped binary-concrete relaxation of Louizos, Welling & Kingma
(2018), "Learning Sparse Neural Networks through L0 Regularization", as used by diff pruning
(Guo, Rush & Kim, ACL 2021, Sec. 3.1):

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / temperature)
    z = clamp(s * (r - l) + l, 0, 1)

and the closed form of the expected number of nonzero gates,

    P(z != 0) = sigmoid(log_alpha - temperature * log(-l / r)).

Every function is safe for log_alpha in [-20, 20] (and beyond) and for u at exactly 0 or 1.
"""
from __future__ import annotations

import math

import torch

# u is kept this far from 0 and 1 so that logit(u) is finite (and its gradient too).
_U_EPS = 1e-6


def _stretch(s: torch.Tensor, left: float, right: float) -> torch.Tensor:
    return torch.clamp(s * (right - left) + left, 0.0, 1.0)


def sample_gate(
    log_alpha: torch.Tensor,
    u: torch.Tensor | None = None,
    left: float = -1.5,
    right: float = 1.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One stochastic hard-concrete gate per entry of ``log_alpha`` (training time).

    ``u`` may be given (same shape) to make the sample reproducible; values at exactly 0 or 1
    are clamped into the open interval. Returns values in [0, 1] with exact 0s and 1s.
    """
    if u is None:
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device,
                       dtype=log_alpha.dtype)
    noise = torch.logit(u, eps=_U_EPS)  # log u - log(1-u), finite
    s = torch.sigmoid((noise + log_alpha) / temperature)
    return _stretch(s, left, right)


def deterministic_gate(log_alpha: torch.Tensor, left: float = -1.5,
                       right: float = 1.5) -> torch.Tensor:
    """Test-time gate: the stretched sigmoid without noise, clamped to [0, 1]."""
    return _stretch(torch.sigmoid(log_alpha), left, right)


def l0_shift(left: float = -1.5, right: float = 1.5, temperature: float = 1.0) -> float:
    """The constant c = temperature * log(-l / r) in P(z != 0) = sigmoid(log_alpha - c)."""
    return temperature * math.log(-left / right)


def prob_nonzero(log_alpha: torch.Tensor, left: float = -1.5, right: float = 1.5,
                 temperature: float = 1.0) -> torch.Tensor:
    """P(z != 0) per entry, the closed-form expected L0 contribution (differentiable)."""
    return torch.sigmoid(log_alpha - l0_shift(left, right, temperature))
