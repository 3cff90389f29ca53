"""The Deep Compression file (``.fbdc``): pruned, weight-shared, Huffman-coded tensors.

Layout (little-endian)::

    b"FBDC" | u16 format version | u32 header length | header (zlib-compressed UTF-8 JSON) | payload | sha256

The SHA-256 covers every byte before it. The header lists each tensor with offsets into the
payload: ``float32`` tensors stored raw (biases, layers left dense) and ``shared`` tensors —
a float32 codebook, the canonical Huffman code lengths (one byte per symbol) of the cluster
indices and of the relative-index gaps (:mod:`fewbits.compress.coding`), and the two bit
streams. :func:`read_compressed` checks magic, version, checksum and every count and offset, and
decodes to exactly the tensors that were written.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..compress.coding import (best_gap_bits, gap_symbols, huffman_decode, huffman_encode, huffman_lengths,
                               positions_from_gaps)
from ..files import write_atomic

MAGIC = b"FBDC"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sHI")
_DIGEST = 32


@dataclass
class SharedTensor:
    """A pruned tensor whose surviving values are ``codebook[indices]`` at flat ``positions``."""

    shape: tuple
    positions: np.ndarray  # sorted flat positions of the survivors (int64)
    indices: np.ndarray  # their codebook indices (int64)
    codebook: np.ndarray  # float32
    bits: int  # index width before Huffman coding (the codebook has up to 2^bits entries)

    def dense(self) -> torch.Tensor:
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self.positions] = self.codebook[self.indices]
        return torch.from_numpy(out.reshape(self.shape))


def _stream(symbols: np.ndarray, alphabet: int) -> tuple[bytes, bytes, int]:
    lengths = huffman_lengths(np.bincount(symbols, minlength=alphabet)) if symbols.size else np.zeros(alphabet, np.int64)
    data, nbits = huffman_encode(symbols, lengths)
    return lengths.astype(np.uint8).tobytes(), data, nbits


def encode(tensors: dict, meta: dict) -> bytes:
    """The file's bytes for ``tensors`` (name → float32 tensor or :class:`SharedTensor`)."""
    payload, entries = bytearray(), []

    def put(blob: bytes) -> dict:
        start = len(payload)
        payload.extend(blob)
        return {"offset": start, "nbytes": len(blob)}

    for name, t in tensors.items():
        if isinstance(t, SharedTensor):
            gap_bits = best_gap_bits(t.positions)
            gaps = gap_symbols(t.positions, gap_bits).astype(np.int64)
            i_len, i_data, i_bits = _stream(t.indices, t.codebook.size)
            g_len, g_data, g_bits = _stream(gaps, 1 << gap_bits)
            entries.append({
                "name": name, "kind": "shared", "shape": list(t.shape), "bits": t.bits, "gap_bits": gap_bits,
                "nnz": int(t.positions.size), "gaps": int(gaps.size),
                "codebook": put(t.codebook.astype("<f4").tobytes()),
                "index_lengths": put(i_len), "index_stream": {**put(i_data), "nbits": i_bits},
                "gap_lengths": put(g_len), "gap_stream": {**put(g_data), "nbits": g_bits},
            })
        else:
            array = t.detach().to(torch.float32).contiguous().numpy()
            entries.append({"name": name, "kind": "float32", "shape": list(array.shape),
                            "data": put(array.astype("<f4").tobytes())})
    header = zlib.compress(json.dumps({"format": "fewbits-deep-compression", "version": FORMAT_VERSION,
                                       "meta": meta, "tensors": entries}, separators=(",", ":")).encode(), 9)
    body = _HEAD.pack(MAGIC, FORMAT_VERSION, len(header)) + header + bytes(payload)
    return body + hashlib.sha256(body).digest()


def write_compressed(path, tensors: dict, meta: dict):
    """Write :func:`encode`'s bytes atomically; returns the path."""
    return write_atomic(path, encode(tensors, meta))


def read_compressed(path) -> tuple[dict, dict, dict]:
    """``(dense tensors by name, meta, per-tensor byte counts)``; raises ``ValueError`` naming the
    file and what is wrong for any corrupt, truncated or foreign file."""
    raw = open(path, "rb").read()
    if len(raw) < _HEAD.size + _DIGEST or raw[:4] != MAGIC:
        raise ValueError(f"{path}: not a fewbits Deep Compression file (bad magic or too short)")
    magic, version, header_len = _HEAD.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, this fewbits reads {FORMAT_VERSION}")
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path}: checksum mismatch: the file is corrupt or truncated")
    try:
        header = json.loads(zlib.decompress(body[_HEAD.size:_HEAD.size + header_len]))
        payload = body[_HEAD.size + header_len:]
        tensors, sizes = {}, {}
        for e in header["tensors"]:
            tensors[e["name"]], sizes[e["name"]] = _decode_entry(e, payload)
    except (KeyError, TypeError, ValueError, zlib.error) as err:
        raise ValueError(f"{path}: malformed contents: {err}") from None
    return tensors, header.get("meta", {}), sizes


def _slice(payload: bytes, ref: dict) -> bytes:
    start, n = int(ref["offset"]), int(ref["nbytes"])
    if start < 0 or n < 0 or start + n > len(payload):
        raise ValueError(f"a block at {start}+{n} lies outside the {len(payload)}-byte payload")
    return payload[start:start + n]


def _decode_entry(e: dict, payload: bytes) -> tuple[torch.Tensor, int]:
    shape = tuple(int(s) for s in e["shape"])
    numel = int(np.prod(shape))
    if e["kind"] == "float32":
        blob = _slice(payload, e["data"])
        if len(blob) != 4 * numel:
            raise ValueError(f"tensor '{e['name']}': {len(blob)} bytes for {numel} float32 values")
        return torch.from_numpy(np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(shape)), len(blob)
    if e["kind"] != "shared":
        raise ValueError(f"tensor '{e['name']}': unknown kind {e['kind']!r}")
    codebook = np.frombuffer(_slice(payload, e["codebook"]), dtype="<f4").astype(np.float32)
    i_len = np.frombuffer(_slice(payload, e["index_lengths"]), dtype=np.uint8).astype(np.int64)
    g_len = np.frombuffer(_slice(payload, e["gap_lengths"]), dtype=np.uint8).astype(np.int64)
    if i_len.size != codebook.size or g_len.size != 1 << int(e["gap_bits"]):
        raise ValueError(f"tensor '{e['name']}': code tables do not match its codebook / gap width")
    indices = huffman_decode(_slice(payload, e["index_stream"]), int(e["index_stream"]["nbits"]), i_len, int(e["nnz"]))
    gaps = huffman_decode(_slice(payload, e["gap_stream"]), int(e["gap_stream"]["nbits"]), g_len, int(e["gaps"]))
    positions = positions_from_gaps(gaps, int(e["gap_bits"]), numel)
    if positions.size != indices.size:
        raise ValueError(f"tensor '{e['name']}': {positions.size} positions for {indices.size} values")
    t = SharedTensor(shape, positions, indices, codebook, int(e["bits"]))
    used = sum(int(e[k]["nbytes"]) for k in ("codebook", "index_lengths", "index_stream", "gap_lengths", "gap_stream"))
    return t.dense(), used
