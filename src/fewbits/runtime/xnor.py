"""Bit-packed XNOR–popcount products for binary layers (XNOR-Net, Rastegari et al. 2016).

With ``a, b ∈ {−1, +1}^K`` stored as bits (1 for +1, i.e. ``x ≥ 0``), ``a·b = K − 2·popcount(a ⊕ b)``
(the XNOR count minus the XOR count). :func:`xnor_matmul` computes ``sign(A) @ sign(B)ᵀ`` this
way on 64-bit words: with NumPy's vectorised popcount, or with a small C kernel compiled on first
use when a C compiler is present (:func:`compiled_kernel`); both are bit-exact with the float
product of the signs (:func:`sign_matmul`), which the tests check.

Padding bits are 0 in both operands, so they XOR to 0 and never count.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

WORD = 64


def pack_signs(x: torch.Tensor) -> np.ndarray:
    """``[M, K]`` real → ``[M, ⌈K/64⌉]`` uint64, bit ``k`` of the row set when ``x[m, k] ≥ 0``."""
    if x.dim() != 2:
        raise ValueError(f"pack_signs takes a [rows, K] tensor, got shape {tuple(x.shape)}")
    bits = (x.detach() >= 0).numpy()
    words = -(-x.shape[1] // WORD)
    padded = np.zeros((x.shape[0], words * WORD), dtype=bool)
    padded[:, : x.shape[1]] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(x.shape[0], words)


def sign_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float reference: ``sign(a) @ sign(b)ᵀ`` with ``sign(0) = +1``, as int32."""
    sa, sb = torch.where(a >= 0, 1.0, -1.0).double(), torch.where(b >= 0, 1.0, -1.0).double()
    return (sa @ sb.t()).round().to(torch.int32)


def xnor_matmul_numpy(a_bits: np.ndarray, b_bits: np.ndarray, k: int, rows_per_chunk: int = 0) -> np.ndarray:
    """``K − 2·popcount(a ⊕ b)`` for every row pair, int32 ``[M, N]`` (NumPy, chunked so the
    ``[m, N, words]`` XOR stays about 16 MB)."""
    m, n, words = a_bits.shape[0], b_bits.shape[0], a_bits.shape[1]
    step = rows_per_chunk or max(1, (16 << 20) // max(1, n * words * 8))
    out = np.empty((m, n), dtype=np.int32)
    for i in range(0, m, step):
        xor = a_bits[i : i + step, None, :] ^ b_bits[None, :, :]
        out[i : i + step] = k - 2 * np.bitwise_count(xor).sum(-1, dtype=np.int32)
    return out


_C_SOURCE = r"""
#include <stdint.h>
/* out[i*n+j] = k - 2*popcount(a_i XOR b_j); rows of `words` 64-bit words. Blocked over j so a
   block of B rows stays in L1 while every A row streams past it. */
void xnor_matmul(const uint64_t *a, const uint64_t *b, int32_t *out, long m, long n, long words, long k) {
    const long BJ = 64;
    for (long j0 = 0; j0 < n; j0 += BJ) {
        long j1 = j0 + BJ < n ? j0 + BJ : n;
        for (long i = 0; i < m; i++) {
            const uint64_t *ai = a + i * words;
            for (long j = j0; j < j1; j++) {
                const uint64_t *bj = b + j * words;
                long pop = 0;
                for (long w = 0; w < words; w++) pop += __builtin_popcountll(ai[w] ^ bj[w]);
                out[i * n + j] = (int32_t)(k - 2 * pop);
            }
        }
    }
}
"""
_KERNEL: Optional[ctypes.CDLL] = None
_KERNEL_ERROR = ""


def compiled_kernel() -> Optional[ctypes.CDLL]:
    """The C kernel, compiled once (``cc -O3 -march=native``) into ``$XDG_CACHE_HOME/fewbits``;
    ``None`` when no compiler is found or compiling fails (:data:`kernel_error` says why)."""
    global _KERNEL, _KERNEL_ERROR
    if _KERNEL is not None or _KERNEL_ERROR:
        return _KERNEL
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        _KERNEL_ERROR = "no C compiler (cc/gcc) on PATH"
        return None
    digest = hashlib.sha256((_C_SOURCE + cc).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewbits"
    lib = cache / f"xnor_{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "xnor.c", Path(tmp) / "xnor.so"
            src.write_text(_C_SOURCE)
            run = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(out)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                _KERNEL_ERROR = f"{cc} failed: {run.stderr.strip()[:300]}"
                return None
            os.replace(out, lib)  # atomic: a concurrent process sees the whole library or none
    _KERNEL = ctypes.CDLL(str(lib))
    _KERNEL.xnor_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4
    return _KERNEL


def kernel_error() -> str:
    return _KERNEL_ERROR


def xnor_matmul_c(a_bits: np.ndarray, b_bits: np.ndarray, k: int) -> np.ndarray:
    lib = compiled_kernel()
    if lib is None:
        raise RuntimeError(f"the compiled XNOR kernel is unavailable: {_KERNEL_ERROR}")
    a, b = np.ascontiguousarray(a_bits), np.ascontiguousarray(b_bits)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"xnor_matmul: operands have {a.shape[1]} and {b.shape[1]} words per row")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    lib.xnor_matmul(a.ctypes.data, b.ctypes.data, out.ctypes.data, a.shape[0], b.shape[0], a.shape[1], k)
    return out


def xnor_matmul(a_bits: np.ndarray, b_bits: np.ndarray, k: int, kernel: str = "auto") -> np.ndarray:
    """``sign(A) @ sign(B)ᵀ`` from packed signs (int32 ``[M, N]``); ``kernel``: ``numpy``,
    ``c`` or ``auto`` (C when it compiles)."""
    if kernel not in ("auto", "numpy", "c"):
        raise ValueError(f"xnor kernel must be auto, numpy or c, got {kernel!r}")
    if a_bits.shape[1] != b_bits.shape[1] or a_bits.shape[1] * WORD < k:
        raise ValueError(f"xnor_matmul: {a_bits.shape[1]} and {b_bits.shape[1]} words per row cannot hold K={k}")
    if kernel == "c" or (kernel == "auto" and compiled_kernel() is not None):
        return xnor_matmul_c(a_bits, b_bits, k)
    return xnor_matmul_numpy(a_bits, b_bits, k)


def xnor_linear(x: torch.Tensor, weight_bits: np.ndarray, alpha: torch.Tensor, k: int,
                kernel: str = "auto") -> torch.Tensor:
    """XNOR-Net's binary linear layer: ``β_b · α_o · (sign(x_b) · sign(w_o))`` with ``β = mean|x|``
    per row and ``α`` per output channel (bias not added)."""
    beta = x.detach().abs().mean(1, keepdim=True)
    dots = torch.from_numpy(xnor_matmul(pack_signs(x), weight_bits, k, kernel))
    return dots.float() * beta * alpha.reshape(1, -1)
