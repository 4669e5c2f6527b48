"""Compact, vectorised coding of sorted sparse positions.

Positions p_0 < p_1 < ... are turned into gaps g_j = p_j - p_{j-1} - 1 (p_{-1} = -1) and
Golomb-Rice coded with parameter 2^b: quotient g >> b in unary, remainder in b bits. The
quotients and remainders go to two separate bit streams so that both directions are a handful
of numpy operations (no per-element Python loop): remainders are fixed-width, and the unary
stream is decoded by finding its zeros. For positions drawn at density p the cost is about
b + 1 + E[g] / 2^b bits per position, e.g. ~9.5 bits at p = 0.5% against the entropy bound
H(p) / p ~ 9.1 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DiffFormatError

_MAX_RICE_BITS = 40


@dataclass
class EncodedPositions:
    unary: np.ndarray  # (ceil(unary_bits / 8),) uint8, packed MSB first
    remainders: np.ndarray  # (ceil(count * rice_bits / 8),) uint8
    count: int
    rice_bits: int
    unary_bits: int

    @property
    def nbytes(self) -> int:
        return int(self.unary.nbytes + self.remainders.nbytes)


def _gaps(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions, prepend=-1) - 1


def best_rice_bits(gaps: np.ndarray) -> int:
    """The b minimising the total coded size of ``gaps``."""
    if gaps.size == 0:
        return 0
    bs = np.arange(0, _MAX_RICE_BITS + 1)
    sizes = [gaps.size * (b + 1) + int(np.sum(gaps >> b)) for b in bs]
    return int(bs[int(np.argmin(sizes))])


def encode_positions(positions: np.ndarray) -> EncodedPositions:
    """Code strictly increasing non-negative int positions."""
    positions = np.asarray(positions, dtype=np.int64)
    gaps = _gaps(positions)
    if gaps.size and gaps.min() < 0:
        raise ValueError("positions must be strictly increasing and non-negative")
    b = best_rice_bits(gaps)
    q = gaps >> b
    unary_bits = int(q.sum()) + gaps.size
    bits = np.ones(unary_bits, dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 0  # each quotient: q ones, then a terminating zero
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
    rem_bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)  # (count * b,)
    return EncodedPositions(np.packbits(bits), np.packbits(rem_bits), int(gaps.size), b,
                            unary_bits)


def decode_positions(enc: EncodedPositions, limit: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`; checks every position lies in [0, limit)."""
    n, b = enc.count, enc.rice_bits
    if n < 0 or not 0 <= b <= _MAX_RICE_BITS or enc.unary_bits < n:
        raise DiffFormatError(f"position header is inconsistent (count={n}, rice_bits={b}, "
                              f"unary_bits={enc.unary_bits})")
    if enc.unary.size * 8 < enc.unary_bits or enc.remainders.size * 8 < n * b:
        raise DiffFormatError("position streams are shorter than their header says")
    bits = np.unpackbits(enc.unary)[:enc.unary_bits]
    ends = np.flatnonzero(bits == 0)
    if ends.size != n or (n and ends[-1] != enc.unary_bits - 1):
        raise DiffFormatError("unary position stream is corrupt (wrong number of terminators)")
    q = np.diff(ends, prepend=-1) - 1
    rem = np.unpackbits(enc.remainders)[:n * b].reshape(n, b).astype(np.int64)
    r = rem @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64)) if b else np.zeros(n, np.int64)
    positions = np.cumsum((q.astype(np.int64) << b) + r + 1) - 1
    if n and positions[-1] >= limit:
        raise DiffFormatError(f"decoded position {int(positions[-1])} is outside [0, {limit})")
    return positions
