"""Bit packing: ``bits``-wide integers stored back to back in a byte stream.

Element ``i`` occupies bits ``[i·bits, (i+1)·bits)`` of the stream, least-significant bit first
(little-endian within and across bytes); the last byte is zero-padded. Signed values are stored
in two's complement and sign-extended on unpacking.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_MAX_PACK_BITS = 8


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _MAX_PACK_BITS:
        raise ValueError(f"pack bits must be an integer in 1..{_MAX_PACK_BITS}, got {bits!r}")


def pack(q: torch.Tensor, bits: int, *, signed: bool = False) -> torch.Tensor:
    """Pack the integers of ``q`` (any shape, flattened in C order) into a uint8 tensor.

    Values must lie in ``[0, 2^bits)`` (or ``[-2^(bits-1), 2^(bits-1))`` when ``signed``).

    >>> pack(torch.tensor([1, 2, 3]), 2).tolist()
    [57]
    """
    _check_bits(bits)
    if torch.is_floating_point(q) or q.dtype == torch.bool:
        raise ValueError(f"pack expects an integer tensor, got {q.dtype}")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    flat = q.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < lo or flat.max() > hi):
        raise ValueError(
            f"pack: values in [{flat.min().item()}, {flat.max().item()}] do not fit "
            f"{'signed' if signed else 'unsigned'} {bits}-bit range [{lo}, {hi}]"
        )
    codes = (flat.numpy() & (2**bits - 1)).astype(np.uint8)  # two's complement for negatives
    if bits == 8:
        return torch.from_numpy(codes.copy())
    bit_planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack(data: torch.Tensor, bits: int, shape, *, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 (signed) / uint8 (unsigned) tensor of ``shape``."""
    _check_bits(bits)
    shape = tuple(shape)
    numel = math.prod(shape)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"unpack expects a 1-D uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
    if data.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"unpack: {data.numel()} bytes cannot hold exactly {numel} values of {bits} bits "
            f"(expected {packed_nbytes(numel, bits)} bytes)"
        )
    raw = data.numpy()
    if bits == 8:
        codes = raw.astype(np.int16)
    else:
        planes = np.unpackbits(raw, bitorder="little", count=numel * bits).reshape(numel, bits)
        weights = (1 << np.arange(bits, dtype=np.int16))
        codes = (planes.astype(np.int16) * weights).sum(axis=1, dtype=np.int16)
    if signed:
        codes = np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
        return torch.from_numpy(codes.astype(np.int8)).reshape(shape)
    return torch.from_numpy(codes.astype(np.uint8)).reshape(shape)
