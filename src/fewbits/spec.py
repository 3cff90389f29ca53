"""Quantization specs: frozen, validated data describing one integer grid.

A :class:`QuantSpec` says how many bits, signed or not, symmetric or affine, which range
convention (full as in PyTorch/ONNX, or restricted/"narrow" as in TensorFlow/TensorRT), the
granularity (one scale per tensor, per channel, or per group of ``size`` consecutive elements),
and the rounding mode. Specs round-trip through plain dicts/JSON carrying a ``version`` field.

Non-uniform grids (weights) are :class:`LevelSpec` subclasses: a sorted set of real levels per
tensor or per output channel, chosen from the weight itself — powers of two, additive powers
of two, k-means centroids, binary and ternary. :func:`spec_from_dict` reads either kind.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

SPEC_VERSION = 1
MIN_BITS, MAX_BITS = 1, 16


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index of ``axis`` (e.g. output channels of a weight)."""

    axis: int = 0

    def __post_init__(self) -> None:
        _check_int("PerChannel.axis", self.axis)


@dataclass(frozen=True)
class PerGroup:
    """One scale and zero point per ``size`` consecutive elements along ``axis``.

    Every index of the other dimensions gets its own groups, so a ``[out, in]`` weight with
    ``PerGroup(128, axis=-1)`` has ``[out, in // 128]`` scales.
    """

    size: int
    axis: int = -1

    def __post_init__(self) -> None:
        _check_int("PerGroup.size", self.size)
        _check_int("PerGroup.axis", self.axis)
        if self.size < 1:
            raise ValueError(f"PerGroup.size must be a positive integer, got {self.size}")


@dataclass(frozen=True)
class PerToken:
    """One scale and zero point per token: every index of the leading dimensions, over the last
    (features) — an activation ``[batch, length, features]`` has ``[batch, length, 1]``. Computed
    from each batch (dynamic activations only)."""


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]
_GRANULARITIES = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup, "per_token": PerToken}


class Rounding(str, enum.Enum):
    """How a real value lands on the integer grid."""

    NEAREST = "nearest"  # half to even, as torch.round
    FLOOR = "floor"
    CEIL = "ceil"
    STOCHASTIC = "stochastic"  # floor(v + u), u ~ U[0, 1) from a torch.Generator


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: ``bits``, sign, symmetry, range convention, granularity, rounding.

    Ranges (``qmin``, ``qmax``):
      * signed, full range (PyTorch/ONNX): ``[-2^(b-1), 2^(b-1) - 1]``
      * signed, ``narrow_range`` (TensorFlow/TensorRT): ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
      * unsigned: ``[0, 2^b - 1]``, narrow ``[1, 2^b - 1]``

    >>> QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax
    (-8, 7)
    >>> QuantSpec(bits=8, signed=False, symmetric=False).qmax
    255
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    rounding: Rounding = Rounding.NEAREST

    def __post_init__(self) -> None:
        _check_int("bits", self.bits)
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        for name in ("signed", "symmetric", "narrow_range"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup, PerToken)):
            raise ValueError(
                f"granularity must be PerTensor(), PerChannel(axis), PerGroup(size, axis) or PerToken(), "
                f"got {self.granularity!r}"
            )
        try:
            object.__setattr__(self, "rounding", Rounding(self.rounding))
        except ValueError:
            allowed = ", ".join(r.value for r in Rounding)
            raise ValueError(f"rounding must be one of {allowed}; got {self.rounding!r}") from None
        if self.qmin >= self.qmax:
            raise ValueError(
                f"bits={self.bits} with signed={self.signed}, narrow_range={self.narrow_range} "
                f"leaves a single level [{self.qmin}, {self.qmax}]; use narrow_range=False or more bits"
            )

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + int(self.narrow_range)
        return int(self.narrow_range)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return QuantSpec(**{**self.to_dict(as_objects=True), **changes})

    # -- plain data ---------------------------------------------------------------------------
    def to_dict(self, as_objects: bool = False) -> dict:
        fields = {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "granularity": self.granularity,
            "rounding": self.rounding,
        }
        if as_objects:
            return fields
        fields["granularity"] = granularity_to_dict(self.granularity)
        fields["rounding"] = self.rounding.value
        return {"version": SPEC_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        """Inverse of :meth:`to_dict`; unknown keys and unknown versions are rejected."""
        if not isinstance(data, dict):
            raise ValueError(f"a QuantSpec is read from a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != SPEC_VERSION:
            raise ValueError(f"QuantSpec version must be {SPEC_VERSION}, got {version!r}")
        allowed = {"bits", "signed", "symmetric", "narrow_range", "granularity", "rounding"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown QuantSpec keys {unknown}; allowed: {sorted(allowed)}")
        if "granularity" in data:
            data["granularity"] = granularity_from_dict(data["granularity"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        return cls.from_dict(json.loads(text))


def granularity_to_dict(g: Granularity) -> dict:
    if isinstance(g, PerTensor):
        return {"kind": "per_tensor"}
    if isinstance(g, PerChannel):
        return {"kind": "per_channel", "axis": g.axis}
    if isinstance(g, PerToken):
        return {"kind": "per_token"}
    return {"kind": "per_group", "size": g.size, "axis": g.axis}


def granularity_from_dict(data: dict) -> Granularity:
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"granularity must be a dict with a 'kind', got {data!r}")
    data = dict(data)
    kind = data.pop("kind")
    if kind not in _GRANULARITIES:
        raise ValueError(f"granularity kind must be one of {sorted(_GRANULARITIES)}, got {kind!r}")
    cls = _GRANULARITIES[kind]
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} for granularity {kind!r}; allowed: {sorted(allowed)}")
    return cls(**data)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


# ---- non-uniform grids ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelSpec:
    """A non-uniform grid: ``2^bits`` (or fewer) real levels per tensor or per output channel,
    each value stored as the index of its level (see :mod:`fewbits.numerics.levels`)."""

    bits: int = 4
    granularity: Granularity = field(default_factory=PerTensor)

    kind = ""  # the class's name in files and recipes
    min_bits, max_bits = 2, 8

    def __post_init__(self) -> None:
        _check_int(f"{self.kind} bits", self.bits)
        if not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"{self.kind} grids take bits in {self.min_bits}..{self.max_bits}, got {self.bits}")
        g = self.granularity
        if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
            raise ValueError(f"{self.kind} levels are chosen per tensor or per output channel "
                             f"(PerTensor() or PerChannel(0)), got {g!r}")

    def _fields(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_dict(self) -> dict:
        fields = self._fields()
        fields["granularity"] = granularity_to_dict(self.granularity)
        return {"version": SPEC_VERSION, "kind": self.kind, **fields}


@dataclass(frozen=True)
class Pow2Spec(LevelSpec):
    """Logarithmic weights: ``±α·2^-j`` (``j = 0 … 2^(bits-1) − 2``) and 0, ``α = max|w|``; a
    multiply by a level is a shift (Miyashita et al. 2016, "Convolutional neural networks using
    logarithmic data representation")."""

    kind = "pow2"


@dataclass(frozen=True)
class APoTSpec(LevelSpec):
    """Additive powers of two (Li et al. 2020, APoT): each level is a sum of ``⌈(bits − 1)/2⌉``
    power-of-two terms, denser near zero than one power of two yet still shift-and-add only."""

    kind = "apot"
    min_bits = 3


@dataclass(frozen=True)
class CodebookSpec(LevelSpec):
    """k-means weight sharing (Han et al. 2016, Deep Compression): ``k = 2^bits`` centroids,
    initialised evenly between min and max ("linear"), refined by ``iterations`` of Lloyd."""

    iterations: int = 30

    kind = "kmeans"
    min_bits = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("kmeans iterations", self.iterations)
        if self.iterations < 0:
            raise ValueError(f"kmeans iterations must be >= 0, got {self.iterations}")


@dataclass(frozen=True)
class BinarySpec(LevelSpec):
    """Two levels: ``±α`` with ``α = mean|w|`` (XNOR-Net, Rastegari et al. 2016) when ``scaled``,
    ``±1`` (BinaryConnect, Courbariaux et al. 2015) when not. Also an activation grid (sign)."""

    bits: int = 1
    scaled: bool = True

    kind = "binary"
    min_bits = max_bits = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("binary scaled", self.scaled)


@dataclass(frozen=True)
class TernarySpec(LevelSpec):
    """Three levels ``{−α_n, 0, α_p}``. TWN (Li et al. 2016): threshold ``Δ = 0.7·mean|w|`` and
    ``α = mean |w| above Δ``; TTQ (Zhu et al. 2017, ``learned=True``): ``Δ = 0.05·max|w|`` and
    the two scales learned in training. ``threshold`` is that factor (``None``: the paper's)."""

    bits: int = 2
    threshold: Optional[float] = None
    learned: bool = False

    @property
    def factor(self) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return 0.05 if self.learned else 0.7

    kind = "ternary"
    min_bits = max_bits = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("ternary learned", self.learned)
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1.5):
            raise ValueError(f"ternary threshold is a factor in (0, 1.5), got {self.threshold!r}")


LEVEL_SPECS = {cls.kind: cls for cls in (Pow2Spec, APoTSpec, CodebookSpec, BinarySpec, TernarySpec)}
AnySpec = Union[QuantSpec, LevelSpec]


def spec_from_dict(data: dict) -> AnySpec:
    """A :class:`QuantSpec` or, when the dict has a ``kind``, the :class:`LevelSpec` it names."""
    if not isinstance(data, dict) or "kind" not in data:
        return QuantSpec.from_dict(data)
    data = dict(data)
    kind, version = data.pop("kind"), data.pop("version", None)
    if version != SPEC_VERSION:
        raise ValueError(f"{kind} spec version must be {SPEC_VERSION}, got {version!r}")
    if kind not in LEVEL_SPECS:
        raise ValueError(f"spec kind must be one of {sorted(LEVEL_SPECS)}, got {kind!r}")
    cls = LEVEL_SPECS[kind]
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {kind} spec keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
    if "granularity" in data:
        data["granularity"] = granularity_from_dict(data["granularity"])
    return cls(**data)
