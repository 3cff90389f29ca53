"""The report data of an automatic recipe (``report.json``, rendered by :mod:`fewbits.report.html`):
what was chosen and why, per layer, against fp32 and the uniform recipes, measured where it can be."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..flow import calibrate, prepare
from ..recipe import Recipe
from ..report.collect import activation_histograms, output_parity
from ..report.evaluate import layer_isolated_sqnr
from ..report.html import REPORT_FORMAT, REPORT_VERSION
from .search import _choice


def uniform_choices(sens, costs) -> dict:
    """Each candidate format on every layer that takes it (the others float): name → formats."""
    found = {}
    for cand in sens.candidates:
        if cand == "float":
            continue
        found[cand] = {l: cand if sens.scores[l].get(cand) is not None and cand in costs.table[l] else "float"
                       for l in sens.scores}
    return found


def _why_float(layer: str, sens) -> str:
    cannot = sens.unavailable.get(layer, {})
    why = "kept float by the choice: no cheaper format fits within the drop at this budget"
    if cannot:
        why += "; cannot take " + ", ".join(f"{c} ({r})" for c, r in cannot.items())
    return why


def auto_report(result, model, qmodel, sens, costs, key: str, calibration: list, example, latency, title: str,
                metric, lower_is_better: bool, threads: int, latency_batch: int = 1) -> dict:
    """The report data of a finished :func:`fewbits.auto` run (``qmodel``: the chosen model)."""
    from .latency import _slice, model_latency

    choice = result.choice
    all_float = {l: "float" for l in sens.scores}
    onnx_file = result.files.get("onnx")
    summary = {"metric": metric or "metric", "fp32": result.fp32, "quantized": result.metric,
               "lower_is_better": lower_is_better, "bytes_fp32": costs.total(all_float, "bytes"),
               "bytes": choice.costs.get("bytes"), "energy_fp32_pj": costs.total(all_float, "energy_pj"),
               "energy_pj": choice.costs.get("energy_pj"), "onnx_integer_gemms": result.files.get("onnx_integer_gemms")}
    notes, check = [], []
    if onnx_file:
        def measured(q) -> float:
            return model_latency(q, _slice(example, latency_batch), threads)[0]

        try:
            summary["latency_s"] = measured(qmodel)
            summary["latency_fp32_s"] = measured(prepare(model, Recipe("float", ())))
            if latency is not None:
                summary["latency_predicted_s"] = choice.costs.get("latency_s")
                check = [{"name": "chosen", "predicted_s": choice.costs["latency_s"], "measured_s": summary["latency_s"]},
                         {"name": "fp32", "predicted_s": costs.total(all_float, "latency_s"),
                          "measured_s": summary["latency_fp32_s"]}]
                uniform = uniform_choices(sens, costs).get("w8a8")
                if uniform:
                    u = _choice(uniform, sens, costs)
                    q = calibrate(prepare(model, u.recipe("uniform-w8a8")), calibration[:2])
                    check.append({"name": "uniform w8a8", "predicted_s": u.costs["latency_s"], "measured_s": measured(q)})
        except Exception as err:  # noqa: BLE001 — the report says what it could not measure
            notes.append(f"deployed latency not measured: {type(err).__name__}: {str(err)[:200]}")
    else:
        notes.append(f"no ONNX file: {result.files.get('onnx_error', 'not exported')}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sqnr = layer_isolated_sqnr(qmodel, calibration[:2]) if qmodel.quantized_layers() else {}
    layers = []
    for layer, scores in sens.scores.items():
        fmt = choice.formats.get(layer, "float")
        cell = costs.table[layer].get(fmt, {})
        layers.append({"name": layer, "type": costs.types.get(layer, sens.layer_types.get(layer)), "format": fmt,
                       "why_float": _why_float(layer, sens) if fmt == "float" else None, "sensitivity": scores,
                       "sqnr_db": sqnr.get(layer), "bytes": cell.get("bytes"), "latency_s": cell.get("latency_s")})
    for left in qmodel.left_float:
        if left.name not in sens.scores:
            layers.append({"name": left.name, "type": left.type, "format": "float",
                           "why_float": left.reason})
    uniform = []
    for name, formats in uniform_choices(sens, costs).items():
        u = _choice(formats, sens, costs)
        if key in u.costs:
            uniform.append({"name": name, "cost": u.costs[key], "damage": u.damage})
    data = {"schema_version": REPORT_VERSION, "format": REPORT_FORMAT, "title": title, "model": type(model).__name__,
            "method": sens.method, "summary": summary, "notes": notes, "layers": layers, "front_key": key,
            "front": [{"cost": c.costs[key], "damage": c.damage} for c in result.front],
            "uniform": uniform, "chosen": {"cost": choice.costs[key], "damage": choice.damage},
            "trials": [{"cost": t["costs"].get(key), "metric": t["metric"], "ok": t["ok"]} for t in result.trials],
            "latency_check": check, "histograms": activation_histograms(qmodel, calibration[:2])}
    if onnx_file and Path(onnx_file).is_file():
        try:
            data["parity"] = output_parity(qmodel, onnx_file, example)
        except Exception as err:  # noqa: BLE001
            notes.append(f"simulated-vs-deployed parity not measured: {type(err).__name__}: {str(err)[:200]}")
    return data
