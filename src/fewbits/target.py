"""The deployment target as data: which engine runs the lowered model and what its int8 kernels do.

Read downward by everything that decides a layer's deployed form: the recipes (``--fit-cpu``),
the lowering (:mod:`fewbits.lower`), the integer model and the ONNX exporter. Nothing here
imports the rest of fewbits.

On x86 with AVX2 (or AVX-512BW) but no VNNI, ONNX Runtime's u8×s8 kernels multiply with
``vpmaddubsw``, which adds two neighbouring u8·s8 products in int16 *with saturation*. A sum
``a₁w₁ + a₂w₂`` with ``a ≤ 255`` is exact iff it stays within [-32768, 32767]; for weights in
[-64, 64] it always does (255·128 = 32640). :func:`int8_kernel_profile` detects the instruction
set; the lowering narrows a layer to :data:`NARROW_BITS` where its weights are not provably within
that bound (:func:`pair_sum_bound`).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

NARROW_BITS = 7
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
WEIGHT_MODES = ("auto", "full", "narrow")
ENGINES = ("reference", "onnxruntime")


@dataclass(frozen=True)
class KernelProfile:
    """What the int8 GEMM kernels of ONNX Runtime do on a CPU.

    ``pair_saturation``: u8×s8 products are summed in pairs into int16 with saturation
    (x86 AVX2 / AVX-512BW without VNNI), so weights must be bounded for exact results.
    """

    machine: str
    isa: str
    vnni: bool
    pair_saturation: bool

    def describe(self) -> str:
        if self.pair_saturation:
            return (f"{self.isa} without VNNI: u8×s8 pairs saturate in int16, weights kept within "
                    f"±{2**(NARROW_BITS - 1)} where not provably exact")
        return f"{self.isa}: int8 kernels accumulate exactly, full weight range"


EXACT = KernelProfile("any", "exact", vnni=False, pair_saturation=False)  # integer arithmetic without saturation


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def int8_kernel_profile(flags: Optional[set[str]] = None, machine: Optional[str] = None) -> KernelProfile:
    """Detect the instruction set that decides whether u8×s8 kernels saturate (``flags``:
    the ``/proc/cpuinfo`` flags, read when not given)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return KernelProfile(machine, machine, vnni=False, pair_saturation=False)
    flags = _cpu_flags() if flags is None else set(flags)
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    isa = "avx512bw" if "avx512bw" in flags else "avx2" if "avx2" in flags else "sse4.1" if "sse4_1" in flags else "x86"
    if vnni:
        isa += "+vnni"
    return KernelProfile(machine, isa, vnni, pair_saturation=not vnni and isa in ("avx2", "avx512bw"))


def pair_sum_bound(qweight, x_max_level: int) -> tuple[int, int]:
    """The extreme int16 pair sums ``a₁w₁ + a₂w₂`` any input levels in [0, x_max_level] can make
    with two weights of one output channel (whatever pairs the kernel forms)."""
    import torch

    w = qweight.reshape(qweight.shape[0], -1).to(torch.int64)
    k = min(2, w.shape[1])
    pos = w.clamp_min(0).topk(k, dim=1).values.sum(1).max().item()
    neg = (-w).clamp_min(0).topk(k, dim=1).values.sum(1).max().item()
    return -neg * x_max_level, pos * x_max_level


@dataclass(frozen=True)
class Target:
    """Where a quantized model is deployed.

    ``engine``: ``"reference"`` — fewbits' own integer kernels (:func:`fewbits.convert`): any
    weight width, asymmetric weights, static inputs; ``"onnxruntime"`` — ONNX Runtime's QDQ
    kernels (:func:`fewbits.export_onnx`): uint8 inputs, symmetric int8 weights, dynamic 8-bit
    inputs. ``profile``: the CPU's int8 kernels (:data:`EXACT` never saturates). ``weights``:
    ``"auto"`` narrows to :data:`NARROW_BITS` only where ``profile`` would saturate, ``"full"``
    never, ``"narrow"`` always. ``weight_bits``: explicit per-layer widths ``((name, bits), …)``
    that replace the ``weights`` rule for those layers (a file's recorded narrowing).
    """

    engine: str = "reference"
    profile: KernelProfile = EXACT
    weights: str = "auto"
    weight_bits: tuple = field(default=())

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"target engine must be one of {ENGINES}, got {self.engine!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")

    @classmethod
    def reference(cls, **changes) -> "Target":
        """fewbits' integer model, exact arithmetic (what :func:`fewbits.convert` builds)."""
        return cls("reference", **changes)

    @classmethod
    def onnxruntime(cls, profile: Optional[KernelProfile] = None, weights: str = "auto") -> "Target":
        """ONNX Runtime on ``profile`` (default: this CPU)."""
        return cls("onnxruntime", profile or int8_kernel_profile(), weights)

    def fits_kernels_at(self) -> Optional[int]:
        """The widest weights this target's int8 kernels run exactly without a per-layer proof,
        or None when every width runs exactly (``--fit-cpu`` caps recipes at this)."""
        return NARROW_BITS if self.profile.pair_saturation else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
