"""Quantization specs: frozen, validated data describing one integer grid.

A :class:`QuantSpec` says how many bits, signed or not, symmetric or affine, which range
convention (full as in PyTorch/ONNX, or restricted/"narrow" as in TensorFlow/TensorRT), the
granularity (one scale per tensor, per channel, or per group of ``size`` consecutive elements),
and the rounding mode. Specs round-trip through plain dicts/JSON carrying a ``version`` field.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Union

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


Granularity = Union[PerTensor, PerChannel, PerGroup]
_GRANULARITIES = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}


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
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise ValueError(
                f"granularity must be PerTensor(), PerChannel(axis) or PerGroup(size, axis), "
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


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
