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

import json
import math

import numpy as np
import torch

from .errors import ConfigError

# u is kept this far from 0 and 1 so that logit(u) is finite (and its gradient too).
_U_EPS = 1e-6


class CpuNoise:
    """Uniform gate noise on CPU from numpy's PCG64 stream.

    torch's CPU generator (mt19937) fills a tensor one element at a time; PCG64 fills it
    about 2.5x faster, which matters when every step draws N numbers twice (the fused gate
    replays the forward's noise in backward). Offers the part of torch.Generator's interface
    used here: ``device``, ``get_state()`` (a uint8 tensor, so checkpoints store it like a
    torch generator's) and ``set_state()``."""

    device = torch.device("cpu")

    def __init__(self, seed: int = 0):
        self._bits = np.random.PCG64(seed)
        self._gen = np.random.Generator(self._bits)

    def get_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(self._bits.state).encode()),
                                dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> "CpuNoise":
        try:
            value = json.loads(bytes(state.cpu().numpy()).decode())
            if value.get("bit_generator") != "PCG64":
                raise ValueError(value.get("bit_generator"))
            self._bits.state = value
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise ConfigError("not a saved CpuNoise state (PCG64): a checkpoint of an older "
                              "diffprune, whose CPU gate noise came from torch's generator? "
                              f"Start the run again without --resume ({e})") from None
        return self

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if dtype == torch.float64:
            return torch.from_numpy(self._gen.random(n, dtype=np.float64)).view(shape)
        return torch.from_numpy(self._gen.random(n, dtype=np.float32)).view(shape).to(dtype)

    def seed32(self) -> int:
        """One int32 seed from the stream (counter.py's noise: one per tensor, or per group
        of small tensors, and step)."""
        return int(self._gen.integers(-(1 << 31), 1 << 31))


def uniform(shape: tuple[int, ...], generator, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """U(0, 1) noise from a torch.Generator (None: torch's global one) or a CpuNoise."""
    if isinstance(generator, CpuNoise):
        return generator.uniform(tuple(shape), dtype).to(device)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def replay(generator_type: type, state: torch.Tensor, device: torch.device):
    """A generator of ``generator_type`` that continues from a saved ``state``."""
    if generator_type is CpuNoise:
        return CpuNoise().set_state(state)
    gen = torch.Generator(device)
    gen.set_state(state)
    return gen


def _stretch(s: torch.Tensor, left: float, right: float) -> torch.Tensor:
    return torch.clamp(s * (right - left) + left, 0.0, 1.0)


def sample_gate(
    log_alpha: torch.Tensor,
    u: torch.Tensor | None = None,
    left: float = -1.5,
    right: float = 1.5,
    temperature: float = 1.0,
    generator: torch.Generator | CpuNoise | None = None,
) -> torch.Tensor:
    """One stochastic hard-concrete gate per entry of ``log_alpha`` (training time).

    ``u`` may be given (same shape) to make the sample reproducible; values at exactly 0 or 1
    are clamped into the open interval. Returns values in [0, 1] with exact 0s and 1s.
    """
    if u is None:
        u = uniform(log_alpha.shape, generator, log_alpha.device, log_alpha.dtype)
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
