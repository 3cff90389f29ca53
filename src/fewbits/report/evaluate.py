"""What quantization cost: task metric fp32 vs quantized, per-layer SQNR, size, time."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..spec import LevelSpec
from ..wrap.modules import QUANT_MODULES
from ..wrap.prepare import LeftFloat, QuantizedModel, as_call

REPORT_SCHEMA = 1
_QUANT_TYPES = tuple(QUANT_MODULES.values())


@dataclass
class LayerReport:
    name: str
    type: str
    weight_bits: Optional[int]
    weight_sqnr_db: Optional[float]
    output_sqnr_db: Optional[float]


@dataclass
class Report:
    """The result of :func:`evaluate`; ``to_dict`` is the JSON the command line writes."""

    metric: Optional[str]
    fp32: dict
    quantized: dict
    size_bytes: dict
    layers: list[LayerReport]
    left_float: list[LeftFloat]
    seconds: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema_version": REPORT_SCHEMA, "metric": self.metric, "fp32": self.fp32, "quantized": self.quantized,
                "size_bytes": self.size_bytes, "layers": [asdict(x) for x in self.layers],
                "left_float": [asdict(x) for x in self.left_float], "seconds": self.seconds, **self.extra}

    def worst_layers(self, n: int = 5) -> list[LayerReport]:
        scored = [x for x in self.layers if x.output_sqnr_db is not None]
        return sorted(scored, key=lambda x: x.output_sqnr_db)[:n]


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its own dtype."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_bytes(qmodel: QuantizedModel) -> int:
    """Deployed size: quantized weights at their packed bit width plus their scales and zero
    points; every other parameter and buffer (biases, float layers) at its own dtype."""
    from ..wrap.quantizer import TensorQuantizer

    total, counted = 0, set()
    for module in qmodel.model.modules():
        if isinstance(module, TensorQuantizer) and module.role == "weight":
            continue  # its scales are counted with the weight
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if id(tensor) in counted or tensor is None:
                continue
            counted.add(id(tensor))
            quantizer = getattr(module, "weight_quantizer", None) if name == "weight" else None
            if quantizer is not None and isinstance(module, _QUANT_TYPES) and isinstance(quantizer.spec, LevelSpec):
                total += math.ceil(tensor.numel() * quantizer.spec.bits / 8) + level_table_bytes(quantizer)
            elif quantizer is not None and isinstance(module, _QUANT_TYPES):
                spec = quantizer.spec
                qparams = quantizer.scale.numel()
                zero_point_bytes = 0 if (spec.symmetric and spec.signed) else math.ceil(spec.bits / 8)
                total += math.ceil(tensor.numel() * spec.bits / 8) + qparams * (4 + zero_point_bytes)
            elif isinstance(module, TensorQuantizer):  # an activation's scale (float32) and zero point
                total += tensor.numel() * (4 if name == "scale" else 1)
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def level_table_bytes(quantizer) -> int:
    """A non-uniform grid's table in float32: its levels, and its thresholds when they are not
    the midpoints between levels (TWN's ``±Δ``)."""
    from ..spec import TernarySpec

    extra = quantizer.boundaries.numel() if isinstance(quantizer.spec, TernarySpec) else 0
    return 4 * (quantizer.levels.numel() + extra)


def _weight_rows(qmodel: QuantizedModel) -> list[LayerReport]:
    from .metrics import sqnr_db

    rows = []
    for name, module in qmodel.quantized_layers().items():
        quantizer = module.weight_quantizer
        sqnr = sqnr_db(module.weight, module.quantized_weight()) if quantizer is not None else None
        rows.append(LayerReport(name, type(module).__name__, quantizer.spec.bits if quantizer else None,
                                _finite(sqnr), None))
    return rows


@torch.no_grad()
def layer_output_sqnr(qmodel: QuantizedModel, batches: list) -> dict[str, float]:
    """SQNR of every quantized layer's output against the same layer of the (BN-folded) fp32
    model, both run end to end on ``batches``: the error a layer passes on, accumulated."""
    names = list(qmodel.quantized_layers())
    sums = {n: [0.0, 0.0] for n in names}
    captured: dict[str, torch.Tensor] = {}

    def grab(key):
        return lambda _m, _a, out: captured.__setitem__(key, out.detach().double())

    float_model = qmodel.float_model
    hooks = [qmodel.model.get_submodule(n).register_forward_hook(grab(("q", n))) for n in names]
    hooks += [float_model.get_submodule(n).register_forward_hook(grab(("f", n))) for n in names]
    try:
        for i, batch in enumerate(batches):
            args, kwargs = as_call(batch, i)
            float_model(*args, **kwargs)
            qmodel.model(*args, **kwargs)
            for n in names:
                if ("f", n) in captured and ("q", n) in captured:
                    ref, out = captured.pop(("f", n)), captured.pop(("q", n))
                    sums[n][0] += ref.pow(2).sum().item()
                    sums[n][1] += (ref - out).pow(2).sum().item()
    finally:
        for h in hooks:
            h.remove()
    return {n: _finite(10 * math.log10(s / e)) if e > 0 and s > 0 else None for n, (s, e) in sums.items()}


def _finite(v):
    return None if v is None or not math.isfinite(v) else round(v, 3)


def evaluate(qmodel: QuantizedModel, model, *, metric_fn: Optional[Callable[[nn.Module], dict]] = None,
             metric: Optional[str] = None, batches: Optional[list] = None, seconds: Optional[float] = None) -> Report:
    """Compare ``qmodel`` with the fp32 ``model`` it was prepared from.

    ``model`` may be a :class:`fewbits.tasks.Task`, which supplies the model, its metrics and
    calibration batches. Per-layer output SQNR uses up to 4 of ``batches``.
    """
    from ..tasks.base import Task

    if isinstance(model, Task):
        task = model
        model, metric_fn, metric = task.model, metric_fn or task.evaluate, metric or task.metric
        batches = batches if batches is not None else task.calibration
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("evaluate expects the model returned by fewbits.prepare")
    fp32 = metric_fn(model) if metric_fn else {}
    quantized = metric_fn(qmodel) if metric_fn else {}
    layers = _weight_rows(qmodel)
    if batches:
        out = layer_output_sqnr(qmodel, list(batches)[:4])
        for row in layers:
            row.output_sqnr_db = out.get(row.name)
    sizes = {"fp32": model_bytes(model), "quantized": quantized_bytes(qmodel)}
    return Report(metric, fp32, quantized, sizes, layers, list(qmodel.left_float), seconds)
