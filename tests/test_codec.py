import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffprune.codec import decode_positions, encode_positions
from diffprune.errors import DiffFormatError

MINILM_PARAMS = 22_713_216  # gated parameters of all-MiniLM-L6-v2 (all but the head)


@given(st.sets(st.integers(0, 10_000), max_size=300))
@settings(max_examples=200, deadline=None)
def test_round_trip(positions):
    pos = np.array(sorted(positions), dtype=np.int64)
    enc = encode_positions(pos)
    assert np.array_equal(decode_positions(enc, 10_001), pos)


@pytest.mark.parametrize("density,max_bits", [(0.001, 12.5), (0.005, 11.0), (0.01, 10.0)])
def test_bits_per_nonzero_on_minilm_sized_positions(density, max_bits):
    rng = np.random.default_rng(0)
    k = round(density * MINILM_PARAMS)
    pos = np.sort(rng.choice(MINILM_PARAMS, size=k, replace=False))
    enc = encode_positions(pos)
    bits = 8 * enc.nbytes / k
    p = density
    entropy = (-p * np.log2(p) - (1 - p) * np.log2(1 - p)) / p
    assert entropy < bits < max_bits, (bits, entropy)
    assert bits < entropy + 0.6  # within ~0.6 bit of the entropy bound
    assert np.array_equal(decode_positions(enc, MINILM_PARAMS), pos)


def test_out_of_range_positions_are_refused():
    enc = encode_positions(np.array([3, 70, 99]))
    with pytest.raises(DiffFormatError, match="outside"):
        decode_positions(enc, 50)
    enc.count += 1
    with pytest.raises(DiffFormatError):
        decode_positions(enc, 100)


def test_unsorted_positions_are_rejected():
    with pytest.raises(ValueError):
        encode_positions(np.array([5, 3]))
