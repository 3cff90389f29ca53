"""What an ONNX file holds per layer: the export plan read off the lowered records, and the
metadata that records it in the file (format, version, target, records)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..lower import Kind, Lowering, lower
from ..target import KernelProfile, Target
from ..wrap.handle import QuantizedModel

EXPORT_FORMAT, EXPORT_VERSION = "fewbits.onnx", "1.1"  # 1.1: the lowered records beside the plan
_MODES = {Kind.INTEGER: "int8", Kind.INTEGER_DYNAMIC: "int8-dynamic", Kind.WEIGHT_ONLY: "weight-only",
          Kind.DECODED: "decoded", Kind.SIMULATED: "simulated"}


@dataclass
class LayerExport:
    """How one quantized layer went into the ONNX file."""

    name: str
    mode: str  # "int8" | "int8-dynamic" | "weight-only" | "decoded" | "simulated"
    weight_bits: Optional[int] = None
    narrowed_from: Optional[int] = None  # original weight bits when the CPU profile narrowed them
    reason: str = ""


def plan_from(lowering: Lowering) -> list[LayerExport]:
    """Each lowered layer's export mode and weight width."""
    plan = []
    for name, r in lowering.layers.items():
        shown = r.kind in (Kind.INTEGER, Kind.INTEGER_DYNAMIC, Kind.WEIGHT_ONLY, Kind.DECODED)
        plan.append(LayerExport(name, _MODES[r.kind], r.weight_bits if shown else None, r.narrowed_from, r.reason))
    return plan


def plan_layers(qmodel: QuantizedModel, profile: KernelProfile, weights: str = "auto") -> list[LayerExport]:
    """Each quantized layer's export mode and weight width on ``profile`` (changes nothing)."""
    return plan_from(lower(qmodel, Target.onnxruntime(profile, weights)))


def narrowing(plan) -> tuple:
    """``((layer, bits), …)`` of the layers a plan narrowed: ``Target.reference(weight_bits=…)``
    then builds the integer model with the weights the file holds."""
    return tuple((e.name, e.weight_bits) for e in plan if e.narrowed_from is not None)


def read_meta(path: Path) -> tuple:
    """The ONNX model, its export plan and its fewbits metadata; a file fewbits did not write,
    or a newer major version, is refused naming the file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 — any parse failure is a corrupt file
        raise ValueError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "fewbits" not in props:
        raise ValueError(f"{path}: no fewbits export metadata: not written by fewbits.export_onnx")
    try:
        meta = json.loads(props["fewbits"])
    except ValueError:
        raise ValueError(f"{path}: corrupt fewbits export metadata (not JSON)") from None
    if meta.get("format") != EXPORT_FORMAT or str(meta.get("version", "")).split(".")[0] != EXPORT_VERSION.split(".")[0]:
        raise ValueError(f"{path}: export metadata format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this fewbits reads {EXPORT_FORMAT} {EXPORT_VERSION}")
    return model, [LayerExport(**e) for e in meta["layers"]], meta
