"""What a report shows besides the metric: each quantized layer's input histogram beside the
range its grid clips to, and the simulated model's outputs beside the deployed file's."""
from __future__ import annotations

from typing import Optional

import torch

from ..wrap.handle import QuantizedModel, as_call


@torch.no_grad()
def activation_histograms(qmodel: QuantizedModel, batches: list, bins: int = 48) -> dict:
    """Per quantized layer with a static per-tensor input grid: a histogram of its float input on
    ``batches`` (``edges``, ``counts``) and the grid's clipping range ``[lo, hi]``."""
    layers = {n: m for n, m in qmodel.quantized_layers().items()
              if m.input_quantizer is not None and m.input_quantizer.scale is not None
              and m.input_quantizer.scale.numel() == 1}
    values: dict[str, list] = {n: [] for n in layers}

    def keep(name):
        def hook(_m, args):
            x = args[0].detach().float().flatten()
            step = max(1, x.numel() // 20000)  # a sample is enough for a histogram
            values[name].append(x[::step])
        return hook

    handles = [qmodel.model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in layers]
    try:
        for i, batch in enumerate(batches):
            args, kwargs = as_call(batch, i)
            qmodel.model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    found = {}
    for n, layer in layers.items():
        if not values[n]:
            continue
        q = layer.input_quantizer
        scale, zp = float(q.scale), float(q.zero_point)
        lo, hi = (q.spec.qmin - zp) * scale, (q.spec.qmax - zp) * scale
        x = torch.cat(values[n])
        span = (min(float(x.min()), lo), max(float(x.max()), hi))
        counts = torch.histc(x, bins=bins, min=span[0], max=span[1] if span[1] > span[0] else span[0] + 1)
        edges = torch.linspace(span[0], span[1] if span[1] > span[0] else span[0] + 1, bins + 1)
        found[n] = {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
                    "range": [round(lo, 6), round(hi, 6)],
                    "clipped": round(float(((x < lo) | (x > hi)).float().mean()), 6)}
    return found


@torch.no_grad()
def output_parity(qmodel: QuantizedModel, onnx_path, batch, samples: int = 2000) -> Optional[dict]:
    """The simulated model's outputs and ONNX Runtime's on ``batch`` (first output, a sample of
    ``samples`` values each) and their largest difference."""
    from ..export.verify import OnnxModel

    args, kwargs = as_call(batch, 0)
    simulated = qmodel.model(*args, **kwargs)
    deployed = OnnxModel(onnx_path)(*args, **kwargs)
    first = [v for v in torch.utils._pytree.tree_leaves(simulated) if isinstance(v, torch.Tensor)]
    got = deployed[0] if isinstance(deployed, tuple) else deployed
    if not first or first[0].shape != got.shape:
        return None
    a, b = first[0].float().flatten(), got.float().flatten()
    step = max(1, a.numel() // samples)
    return {"simulated": [round(float(v), 5) for v in a[::step]], "deployed": [round(float(v), 5) for v in b[::step]],
            "max_abs_diff": float((a - b).abs().max()), "values": int(a.numel())}


def quantize_report_data(name: str, qmodel: QuantizedModel, report, calibration: list, onnx: Optional[dict] = None,
                         lower_is_better: bool = False) -> dict:
    """The report data (:mod:`fewbits.report.html`) of one ``fewbits quantize`` run: the metric
    and size against fp32, each layer's recipe and isolated SQNR, the layers left float with
    their reasons, the input histograms, and with ``onnx`` (the export's JSON) the parity."""
    from .html import REPORT_FORMAT, REPORT_VERSION

    metric = report.metric
    summary = {"metric": metric, "fp32": report.fp32.get(metric) if metric else None,
               "quantized": report.quantized.get(metric) if metric else None, "lower_is_better": lower_is_better,
               "bytes_fp32": report.size_bytes.get("fp32"), "bytes": report.size_bytes.get("quantized")}
    layers = [{"name": x.name, "type": x.type, "format": f"{qmodel.recipe.name} (w{x.weight_bits})" if x.weight_bits
               else qmodel.recipe.name, "sqnr_db": x.isolated_sqnr_db, "why_float": None} for x in report.layers]
    layers += [{"name": x.name, "type": x.type, "format": "float", "why_float": x.reason} for x in report.left_float]
    data = {"schema_version": REPORT_VERSION, "format": REPORT_FORMAT, "title": f"fewbits quantize: {name}",
            "model": name, "summary": summary, "layers": layers, "notes": [],
            "histograms": activation_histograms(qmodel, calibration[:2])}
    if onnx:
        k = onnx.get("kernels", {})
        summary["onnx_integer_gemms"] = f"{k.get('integer')}/{k.get('integer', 0) + k.get('float', 0)}" if k else None
        try:
            data["parity"] = output_parity(qmodel, onnx["path"], calibration[0])
        except Exception as err:  # noqa: BLE001 — the page says what it could not show
            data["notes"].append(f"simulated-vs-deployed parity not measured: {type(err).__name__}: {str(err)[:200]}")
    return data
