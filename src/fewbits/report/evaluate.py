"""What quantization cost: task metric fp32 vs quantized, per-layer SQNR, size, time."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..wrap.handle import LeftFloat, QuantizedModel, as_call

REPORT_SCHEMA = 1


@dataclass
class LayerReport:
    name: str
    type: str
    weight_bits: Optional[int]
    weight_sqnr_db: Optional[float]
    output_sqnr_db: Optional[float]  # accumulated: the whole quantized model up to this layer's output
    isolated_sqnr_db: Optional[float] = None  # this layer's own: only it quantized, its input exact


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

    def worst_layers(self, n: int = 5, isolated: bool = False) -> list[LayerReport]:
        """The ``n`` layers with the lowest SQNR, accumulated or (``isolated``) each layer's own."""
        key = "isolated_sqnr_db" if isolated else "output_sqnr_db"
        scored = [x for x in self.layers if getattr(x, key) is not None]
        return sorted(scored, key=lambda x: getattr(x, key))[:n]


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its own dtype."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_bytes(qmodel: QuantizedModel) -> int:
    """Deployed size: quantized weights at their packed bit width plus their scales and zero
    points (:meth:`fewbits.lower.LayerRecord.weight_bytes`); every other parameter and buffer
    (biases, float layers) at its own dtype, an activation's scale in float32 and zero point in
    one byte. A tensor shared by layers counts once per form it is stored in."""
    from ..lower import lower
    from ..wrap.quantizer import TensorQuantizer

    records = lower(qmodel, calibrated=False).layers
    total, counted = 0, set()
    for name, module in qmodel.model.named_modules():
        record = records.get(name)
        if isinstance(module, TensorQuantizer) and module.role == "weight":
            continue  # its scales are counted with the weight
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None:
                continue
            # a tensor shared by layers is stored once per form it deploys in: a tied embedding
            # quantized and the LM head reading it in float are two arrays
            quantized = key == "weight" and record is not None and record.qweight is not None
            form = (id(tensor), repr(record.weight_spec) if quantized else "float")
            if form in counted:
                continue
            counted.add(form)
            if quantized:
                total += record.weight_bytes()
            elif isinstance(module, TensorQuantizer):
                total += tensor.numel() * (4 if key == "scale" else 1)
            else:
                total += tensor.numel() * tensor.element_size()
    return total


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


def layer_isolated_sqnr(qmodel: QuantizedModel, batches: list) -> dict[str, float]:
    """SQNR of every quantized layer's output when only that layer is quantized and its input is
    the exact fp32 one (the fp32 model runs; each layer's quantized twin sees the same input):
    the error the layer itself makes."""
    return {n: _finite(10 * math.log10(s / e)) if e > 0 and s > 0 else None
            for n, (s, e) in layer_isolated_errors(qmodel, batches).items()}


@torch.no_grad()
def layer_isolated_errors(qmodel: QuantizedModel, batches: list) -> dict[str, tuple[float, float]]:
    """``(‖y‖², ‖y − ỹ‖²)`` summed over ``batches`` for every quantized layer alone on its exact
    fp32 input (what :func:`layer_isolated_sqnr` reports in dB)."""
    names = list(qmodel.quantized_layers())
    sums = {n: [0.0, 0.0] for n in names}
    float_model = qmodel.float_model

    def compare(name):
        twin = qmodel.model.get_submodule(name)

        def hook(_m, args, out):
            ref, got = out.detach().double(), twin(*args).detach().double()
            sums[name][0] += ref.pow(2).sum().item()
            sums[name][1] += (ref - got).pow(2).sum().item()
        return hook

    hooks = [float_model.get_submodule(n).register_forward_hook(compare(n)) for n in names]
    try:
        for i, batch in enumerate(batches):
            args, kwargs = as_call(batch, i)
            float_model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: (s, e) for n, (s, e) in sums.items()}


def _finite(v):
    return None if v is None or not math.isfinite(v) else round(v, 3)


def evaluate(qmodel: QuantizedModel, model, *, metric_fn: Optional[Callable[[nn.Module], dict]] = None,
             metric: Optional[str] = None, batches: Optional[list] = None, seconds: Optional[float] = None) -> Report:
    """Compare ``qmodel`` with the fp32 ``model`` it was prepared from.

    ``model`` may be a :class:`fewbits.tasks.Task`, which supplies the model, its metrics and
    calibration batches. Per-layer output SQNR (accumulated, and each layer's own) uses up to 4
    of ``batches``.
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
        some = list(batches)[:4]
        out, own = layer_output_sqnr(qmodel, some), layer_isolated_sqnr(qmodel, some)
        for row in layers:
            row.output_sqnr_db, row.isolated_sqnr_db = out.get(row.name), own.get(row.name)
    sizes = {"fp32": model_bytes(model), "quantized": quantized_bytes(qmodel)}
    report = Report(metric, fp32, quantized, sizes, layers, list(qmodel.left_float), seconds)
    report.extra["float_ops"] = [asdict(x) for x in qmodel.float_ops]
    return report
