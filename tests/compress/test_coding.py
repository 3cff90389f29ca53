"""Relative sparse indices and canonical Huffman codes: closed forms and round trips."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fewbits.compress.coding import (canonical_codes, fixed_gap_bits, gap_symbols, huffman_decode, huffman_encode,
                                     huffman_lengths, positions_from_gaps)
from fewbits.compress.prune import magnitude_masks, sparsity_schedule


def test_gaps_use_fillers_as_in_the_paper():
    # 3-bit gaps: filler 7 = "skip 7 zeros, no weight"; a gap of 20 zeros is 7, 7, 6
    assert gap_symbols(np.array([20]), 3).tolist() == [7, 7, 6]
    assert gap_symbols(np.array([0, 1, 9]), 3).tolist() == [0, 0, 7, 0]
    assert positions_from_gaps(np.array([7, 7, 6]), 3, 21).tolist() == [20]
    with pytest.raises(ValueError, match="run past"):
        positions_from_gaps(np.array([7, 7, 6]), 3, 20)


@given(st.sets(st.integers(0, 5000), max_size=300), st.integers(1, 10))
def test_gaps_round_trip(positions, bits):
    p = np.array(sorted(positions), dtype=np.int64)
    assert np.array_equal(positions_from_gaps(gap_symbols(p, bits), bits, 5001), p)


def test_fixed_gap_bits_picks_the_smallest_width():
    p = np.arange(0, 1000, 10)  # gaps of 9: 4 bits hold them without fillers (100·4 = 400 bits)
    bits, total = fixed_gap_bits(p)
    assert (bits, total) == (4, 400)


def test_huffman_lengths_and_canonical_codes_closed_form():
    # counts 5, 2, 1, 1: lengths 1, 2, 3, 3 → canonical 0, 10, 110, 111
    lengths = huffman_lengths(np.array([5, 2, 1, 1]))
    assert lengths.tolist() == [1, 2, 3, 3]
    assert canonical_codes(lengths).tolist() == [0b0, 0b10, 0b110, 0b111]
    data, nbits = huffman_encode(np.array([0, 1, 2, 3, 0]), lengths)
    assert nbits == 1 + 2 + 3 + 3 + 1 and data == bytes([0b01011011, 0b10000000])
    assert huffman_lengths(np.array([0, 9, 0])).tolist() == [0, 1, 0]  # a lone symbol still takes a bit


@given(st.lists(st.integers(0, 40), min_size=1, max_size=2000))
def test_huffman_round_trips_and_is_within_a_bit_of_the_entropy(symbols):
    s = np.array(symbols)
    counts = np.bincount(s, minlength=41)
    lengths = huffman_lengths(counts)
    data, nbits = huffman_encode(s, lengths)
    assert np.array_equal(huffman_decode(data, nbits, lengths, s.size), s)
    p = counts[counts > 0] / s.size
    entropy = -(p * np.log2(p)).sum()
    assert nbits / s.size <= entropy + 1 + 1e-9  # Huffman's bound; a lone symbol costs exactly 1 bit


def test_huffman_decode_fails_on_damage():
    lengths = huffman_lengths(np.array([5, 2, 1, 1]))
    data, nbits = huffman_encode(np.array([0, 1, 2, 3]), lengths)
    with pytest.raises(ValueError, match="decoded 4 of 5"):
        huffman_decode(data, nbits, lengths, 5)
    with pytest.raises(ValueError, match="claims"):
        huffman_decode(data, 64, lengths, 4)
    with pytest.raises(ValueError, match="no code has"):  # a complete code never sees that; an incomplete one can
        huffman_decode(bytes([0b11111111]), 8, np.array([1, 2, 0, 0]), 2)


def test_magnitude_masks_global_layer_and_named():
    w = {"a": np.array([0.1, -5.0, 0.2, 3.0]), "b": np.array([1.0, -0.05, 2.0, 0.3])}
    import torch

    w = {k: torch.tensor(v) for k, v in w.items()}
    m = magnitude_masks(w, 0.5, "global")  # the four largest of eight: 5, 3, 2, 1
    assert m["a"].tolist() == [False, True, False, True] and m["b"].tolist() == [True, False, True, False]
    m = magnitude_masks(w, 0.75, "layer")  # one per layer
    assert m["a"].tolist() == [False, True, False, False] and m["b"].tolist() == [False, False, True, False]
    m = magnitude_masks(w, {"a": 0.5})
    assert m["b"].all() and int(m["a"].sum()) == 2
    with pytest.raises(ValueError, match="does not prune: \\['c'\\]"):
        magnitude_masks(w, {"c": 0.5})
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(w, 0.5, "row")
    s = sparsity_schedule(0.9, 3)
    assert abs(s[-1] - 0.9) < 1e-12 and abs((1 - s[0]) ** 3 - 0.1) < 1e-12  # equal kept share per step
