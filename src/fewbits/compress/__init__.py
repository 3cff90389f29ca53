"""Extreme compression: magnitude pruning, k-means weight sharing and Huffman coding — the Deep
Compression pipeline (Han et al. 2016) — beside the non-uniform grids of :mod:`fewbits.spec`
(powers of two, APoT, k-means codebooks, binary, ternary) that recipes use like uniform ones."""
from .coding import gap_symbols, huffman_decode, huffman_encode, huffman_lengths, positions_from_gaps
from .pipeline import CompressionResult, DeepCompressionConfig, deep_compression, load_compressed
from .prune import magnitude_masks, sparsity_schedule

__all__ = ["deep_compression", "DeepCompressionConfig", "CompressionResult", "load_compressed", "magnitude_masks",
           "sparsity_schedule", "huffman_lengths", "huffman_encode", "huffman_decode", "gap_symbols",
           "positions_from_gaps"]
