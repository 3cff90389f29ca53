"""Lossless coding for Deep Compression: relative sparse indices and canonical Huffman codes.

**Relative indices** (Han et al. 2016, §2): the positions of a pruned tensor's surviving
weights, in C order, are stored as the number of zeros before each one. With ``b``-bit gap
symbols, ``F = 2^b − 1`` is the *filler*: "skip ``F`` zeros, no weight here"; a symbol
``g < F`` means "skip ``g`` zeros, then a weight". A gap of 20 with ``b = 3`` is ``7, 7, 6``.

**Huffman** (canonical): code lengths from the symbol counts; codes assigned in order of
(length, symbol), so the lengths alone describe the code — that is what a file stores. Bits are
written most significant first.
"""
from __future__ import annotations

import heapq

import numpy as np


# ---- relative sparse indices -----------------------------------------------------------------
def gap_symbols(positions: np.ndarray, gap_bits: int) -> np.ndarray:
    """The gap symbols (uint16) of sorted flat ``positions``."""
    if not 1 <= gap_bits <= 15:
        raise ValueError(f"gap_bits must be in 1..15, got {gap_bits}")
    filler = (1 << gap_bits) - 1
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    if gaps.size and gaps.min() < 0:
        raise ValueError("gap_symbols: positions must be strictly increasing")
    fillers = gaps // filler
    rest = gaps - fillers * filler
    out = np.full(int(fillers.sum()) + gaps.size, filler, dtype=np.uint16)
    ends = np.cumsum(fillers + 1) - 1  # each weight's symbol comes after its fillers
    out[ends] = rest
    return out


def positions_from_gaps(symbols: np.ndarray, gap_bits: int, numel: int) -> np.ndarray:
    """Inverse of :func:`gap_symbols`; checks every position lies inside ``numel``."""
    filler = (1 << gap_bits) - 1
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size and symbols.max() > filler:
        raise ValueError(f"gap symbol {int(symbols.max())} exceeds the {gap_bits}-bit alphabet")
    advance = np.where(symbols == filler, filler, symbols + 1)
    cursor = np.cumsum(advance)
    positions = cursor[symbols != filler] - 1
    if positions.size and positions[-1] >= numel:
        raise ValueError(f"sparse indices run past the tensor's {numel} elements")
    return positions


def fixed_gap_bits(positions: np.ndarray, choices=range(1, 9)) -> tuple[int, int]:
    """The gap width with the fewest bits at fixed width, and that many bits."""
    best = min(((gap_symbols(positions, b).size * b, b) for b in choices))
    return best[1], best[0]


# ---- canonical Huffman -------------------------------------------------------------------------
def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol (0 for unused symbols; a lone symbol gets 1 bit)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (int64) of every symbol with a length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > 62:
        raise ValueError(f"Huffman code length {int(lengths.max())} exceeds 62 bits")
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        codes[s], previous = code, int(lengths[s])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """``(packed bytes, number of bits)`` of ``symbols`` under the canonical code of ``lengths``."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths[symbols] == 0).any():
        raise ValueError("huffman_encode: a symbol has no code (its count was zero)")
    codes = canonical_codes(lengths)
    n, width = lengths[symbols], int(lengths.max())
    shift = n[:, None] - 1 - np.arange(width)[None, :]  # bit j of each code, MSB first
    bits = (codes[symbols][:, None] >> np.maximum(shift, 0)) & 1
    valid = shift >= 0
    flat = bits[valid].astype(np.uint8)
    return np.packbits(flat).tobytes(), int(flat.size)


def huffman_decode(data: bytes, nbits: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """``count`` symbols from the first ``nbits`` bits of ``data``; fails on a bit pattern no
    code has or a stream that ends early (a corrupt file)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if nbits > len(data) * 8:
        raise ValueError(f"Huffman stream claims {nbits} bits in {len(data)} bytes")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits].tolist()
    codes = canonical_codes(lengths)
    table = {(int(lengths[s]), int(codes[s])): int(s) for s in np.flatnonzero(lengths)}
    top = int(lengths.max()) if lengths.size else 0
    out, code, size, position = [], 0, 0, 0
    for bit in bits:
        code, size = (code << 1) | bit, size + 1
        symbol = table.get((size, code))
        if symbol is not None:
            out.append(symbol)
            code = size = 0
            if len(out) == count:
                position += 1
                break
        elif size >= top:
            raise ValueError("Huffman stream holds a bit pattern no code has")
        position += 1
    if len(out) != count or position != nbits:
        raise ValueError(f"Huffman stream decoded {len(out)} of {count} symbols in {position} of {nbits} bits")
    return np.asarray(out, dtype=np.int64)


def best_gap_bits(positions: np.ndarray, choices=range(2, 11)) -> int:
    """The gap width whose Huffman-coded stream plus its code table (a byte per symbol) is
    smallest: wider gaps need fewer fillers but a bigger table."""
    def size(b):
        symbols = gap_symbols(positions, b)
        lengths = huffman_lengths(np.bincount(symbols, minlength=1 << b)) if symbols.size else np.zeros(1)
        return int((lengths * np.bincount(symbols, minlength=lengths.size)).sum()) + 8 * (1 << b)
    return min(choices, key=size)
