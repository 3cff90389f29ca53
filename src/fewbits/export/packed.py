"""The packed model file: weights as integers at their bit width, in safetensors, plus metadata.

    fewbits.save(qmodel, "model.fewbits")        # atomic; ~bits/8 bytes per weight
    qmodel = fewbits.load("model.fewbits", model=MyNet())   # the architecture comes from code
    packed = fewbits.load("model.fewbits")       # without a model: integers, qparams, metadata

Layout: a safetensors file whose ``__metadata__["fewbits"]`` is JSON with the format name and
version (``major.minor``; a newer major is refused), the fewbits version, the recipe, what was
left float and why, the algorithm steps applied, one entry per packed weight (spec, shape) and a
SHA-256 over every tensor. Tensors: ``<layer>.weight.qdata`` (1–8 bits: packed LSB-first by
:func:`fewbits.pack`; 9–16 bits: int16/int32), the quantizers' ``scale`` / ``zero_point``
(zero points of symmetric signed grids are all zero and omitted), and every other parameter and
buffer as it is. Tensors shared between modules are stored once and listed as aliases.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import write_atomic
from ..flow import prepare
from ..lower import lower
from ..numerics.affine import dequantize
from ..numerics.levels import decode
from ..numerics.packing import pack, unpack
from ..recipe import Recipe
from ..spec import LevelSpec, spec_from_dict
from ..wrap.handle import AlgorithmResult, QuantizedModel

FORMAT = "fewbits.packed"
FORMAT_VERSION = (1, 0)
_QDATA = ".weight.qdata"


# ---- save ------------------------------------------------------------------------------------
def _packed_weights(qmodel: QuantizedModel) -> tuple[dict, dict]:
    """Every quantized weight's integers (level indices for non-uniform grids, whose levels are
    the quantizer's buffer), packed, from the lowered records."""
    tensors, entries = {}, {}
    for name, record in lower(qmodel).layers.items():
        if record.qweight is None:
            continue
        spec, q = record.weight_spec, record.qweight
        if isinstance(spec, LevelSpec):
            tensors[name + _QDATA] = pack(q, spec.bits)
        else:
            tensors[name + _QDATA] = pack(q, spec.bits, signed=spec.signed) if spec.bits <= 8 else q.contiguous()
        entries[name] = {"spec": spec.to_dict(), "shape": list(record.weight_shape), "view": list(q.shape)}
    return tensors, entries


def _symmetric_zero(key: str, tensor: torch.Tensor, qmodel: QuantizedModel) -> bool:
    """A weight quantizer's zero point on a symmetric signed grid: all zeros, rebuilt on load."""
    if not key.endswith(".weight_quantizer.zero_point"):
        return False
    spec = qmodel.model.get_submodule(key.rpartition(".")[0]).spec
    return spec.symmetric and spec.signed and not bool(tensor.any())


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(qmodel: QuantizedModel, path) -> Path:
    """Write ``qmodel`` (calibrated) to ``path`` atomically; returns the path."""
    from safetensors.torch import save as st_save

    from .. import __version__

    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("save expects the model returned by fewbits.prepare")
    qmodel.require_calibrated(f"save (recipe '{qmodel.recipe.name}')")
    tensors, weights = _packed_weights(qmodel)
    seen, aliases = {}, {}
    for key, t in qmodel.model.state_dict(keep_vars=False).items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in weights or _symmetric_zero(key, t, qmodel):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().clone()
    meta = {
        "format": FORMAT, "version": "%d.%d" % FORMAT_VERSION, "fewbits_version": __version__,
        "recipe": qmodel.recipe.to_dict(), "fold_bn": qmodel.fold_bn, "folded_bn": qmodel.folded_bn,
        "left_float": [vars(x) for x in qmodel.left_float], "applied": [r.to_dict() for r in qmodel.applied],
        "weights": weights, "aliases": aliases, "sha256": _digest(tensors),
    }
    data = st_save(tensors, metadata={"fewbits": json.dumps(meta, separators=(",", ":"))})
    return write_atomic(path, data)


# ---- load ------------------------------------------------------------------------------------
@dataclass
class PackedFile:
    """A packed file read without a model: metadata, and integer weights in their own shapes."""

    meta: dict
    tensors: dict = field(repr=False)

    def qdata(self, layer: str) -> torch.Tensor:
        entry = self.meta["weights"][layer]
        spec = spec_from_dict(entry["spec"])
        data = self.tensors[layer + _QDATA]
        if isinstance(spec, LevelSpec):  # level indices, unsigned
            return unpack(data, spec.bits, entry["view"])
        return unpack(data, spec.bits, entry["view"], signed=spec.signed) if spec.bits <= 8 else data


def _read(path) -> tuple[dict, dict]:
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed model {path} not found")
    raw = path.read_bytes()
    bad = f"{path}: not a fewbits packed file"
    if len(raw) < 8:
        raise ValueError(f"{bad} (only {len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw) and FORMAT.encode() in raw[8:]:
        raise ValueError(f"{path}: truncated fewbits packed file: its header alone needs {8 + n} bytes, "
                         f"the file has {len(raw)}")
    try:
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header["__metadata__"]["fewbits"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{bad} (no readable fewbits header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{bad} (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    major, minor = (int(v) for v in str(meta.get("version", "0.0")).split("."))
    if major != FORMAT_VERSION[0]:
        raise ValueError(f"{path}: packed format version {major}.{minor} is not readable by this fewbits "
                         f"(reads {FORMAT_VERSION[0]}.x); upgrade fewbits" if major > FORMAT_VERSION[0] else
                         f"{path}: packed format version {major}.{minor} is no longer supported")
    expected = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items()
                            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if len(raw) < expected:
        raise ValueError(f"{path}: truncated fewbits packed file: expected {expected} bytes, found {len(raw)}")
    try:
        tensors = st_load(raw)
    except Exception as err:  # safetensors raises its own error types for truncated data
        raise ValueError(f"{path}: corrupt or truncated packed file ({err})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch: the tensors were changed or damaged after saving")
    return meta, tensors


def load(path, model: nn.Module | None = None):
    """Read a file written by :func:`save`.

    With ``model`` (the float architecture, e.g. a fresh instance of the class that was
    quantized; its weights are not used) returns the :class:`QuantizedModel`, calibrated and
    equal to the saved one. Without it returns a :class:`PackedFile`.
    """
    meta, tensors = _read(path)
    if model is None:
        return PackedFile(meta, tensors)
    qmodel = prepare(model, Recipe.from_dict(meta["recipe"]), fold_bn=meta["fold_bn"])
    if qmodel.folded_bn != meta["folded_bn"] or [vars(x) for x in qmodel.left_float] != meta["left_float"]:
        raise ValueError(f"{path}: the model given does not match the saved one (its layers prepare differently)")
    for key, target in meta["aliases"].items():
        tensors[key] = tensors[target]
    expected = set(qmodel.model.state_dict())
    assigned = set()
    weights = {k: tensors.pop(k) for k in list(tensors) if k.endswith(_QDATA)}
    for key, tensor in tensors.items():
        _assign(qmodel.model, key, tensor, path)
        assigned.add(key)
    for layer, entry in meta["weights"].items():
        zero_in_file = f"{layer}.weight_quantizer.zero_point" in tensors
        _assign_weight(qmodel, layer, entry, weights.pop(layer + _QDATA, None), zero_in_file, path)
        assigned.update({f"{layer}.weight", f"{layer}.weight_quantizer.zero_point"})
    missing = sorted(expected - assigned)
    if missing or weights:
        raise ValueError(f"{path}: the model given does not match the saved one "
                         f"(missing from the file: {missing[:5]}; unused in the file: {sorted(weights)[:5]})")
    qmodel.applied = [AlgorithmResult.from_dict(r) for r in meta["applied"]]
    qmodel.mark_calibrated()
    return qmodel


def _assign(root: nn.Module, key: str, tensor: torch.Tensor, path) -> None:
    owner, _, leaf = key.rpartition(".")
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        raise ValueError(f"{path}: tensor '{key}' has no place in the model given") from None
    if leaf in module._parameters:
        current = module._parameters[leaf]
        if current.shape != tensor.shape:
            raise ValueError(f"{path}: tensor '{key}' has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(current.shape)}")
        with torch.no_grad():
            current.copy_(tensor)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise ValueError(f"{path}: tensor '{key}' has no place in the model given")


def _assign_weight(qmodel: QuantizedModel, layer: str, entry: dict, data, zero_in_file: bool, path) -> None:
    module = qmodel.quantized_layers().get(layer)
    spec = spec_from_dict(entry["spec"])
    if module is None or module.weight_quantizer is None or module.weight_quantizer.spec != spec:
        raise ValueError(f"{path}: packed weight '{layer}' does not match the model given")
    if data is None:
        raise ValueError(f"{path}: packed weight '{layer}' has no data")
    wq = module.weight_quantizer
    if isinstance(spec, LevelSpec):
        q = unpack(data, spec.bits, entry["view"]).long()
        if wq.levels is None or (q.numel() and int(q.max()) >= wq.levels.shape[1]):
            raise ValueError(f"{path}: packed weight '{layer}' has level indices beyond its {spec.kind} levels")
        _assign(qmodel.model, f"{layer}.weight", module.weight_from_view(decode(q, wq.levels)), path)
        return
    if not zero_in_file:
        wq.set_qparams(wq.scale, torch.zeros_like(wq.scale, dtype=torch.int32))
    q = unpack(data, spec.bits, entry["view"], signed=spec.signed) if spec.bits <= 8 else data
    weight = module.weight_from_view(dequantize(q, wq.scale, wq.zero_point, spec))  # the view → the layer's layout
    _assign(qmodel.model, f"{layer}.weight", weight, path)


def ideal_bytes(qmodel: QuantizedModel) -> int:
    """Bits × parameters for packed weights plus every qparam and float tensor at its dtype
    (the all-zero zero points of symmetric weights carry no information and are not counted)."""
    total = 0
    records = lower(qmodel, calibrated=False).layers
    for key, t in qmodel.model.state_dict().items():
        if _symmetric_zero(key, t, qmodel):
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        record = records.get(layer) if layer else None
        if record is not None and record.qweight is not None:
            total += math.ceil(t.numel() * record.weight_bits / 8)
        else:
            total += t.numel() * t.element_size()
    return total
