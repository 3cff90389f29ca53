"""The result of one quantization as the command line prints and saves it: the JSON record
(``fewbits quantize --json``) and its one-row summary."""
from __future__ import annotations

CLI_SCHEMA = 1


def calib_label(recipe) -> str:
    """How the recipe sets activation ranges: a method name, 'dynamic', or 'none'."""
    layers = [lr for _, lr in recipe.by_type] + [lr for _, lr in recipe.by_name if lr]
    acts = [t for lr in layers for t in (lr.input, lr.output) if t]
    if not acts:
        return "none"
    if all(t.dynamic for t in acts):
        return "dynamic"
    return ",".join(sorted({t.method for t in acts if not t.dynamic}))


def result_json(name: str, recipe, report, lower_is_better: bool = False) -> dict:
    """The JSON record of one quantization (``report`` from :func:`fewbits.evaluate`);
    ``lower_is_better``: the metric improves downwards (perplexity)."""
    m = report.metric
    return {
        "schema_version": CLI_SCHEMA, "task": name, "recipe": recipe.name, "calib": calib_label(recipe),
        "metric": {"name": m, "fp32": report.fp32.get(m), "quantized": report.quantized.get(m)} if m else None,
        "lower_is_better": lower_is_better,
        "metrics": {"fp32": report.fp32, "quantized": report.quantized},
        "size_bytes": report.size_bytes, "seconds": report.seconds,
        "left_float": [{"name": x.name, "type": x.type, "reason": x.reason} for x in report.left_float],
        "layers": report.to_dict()["layers"], "algorithms": report.extra.get("algorithms", []),
        "float_ops": report.extra.get("float_ops", []),
    }


def _worst(layers: list, key: str):
    scored = [x for x in layers if x.get(key) is not None]
    if not scored:
        return None
    low = min(scored, key=lambda x: x[key])
    return f"{low[key]:.1f} dB ({low['name']})"


def summary_row(result: dict) -> dict:
    """One table row of a :func:`result_json` record. The worst layer is shown twice: by its own
    error (that layer alone quantized, its input exact) and by the error accumulated up to it."""
    row = {"task": result["task"], "recipe": result["recipe"], "calib": result["calib"]}
    if result["metric"]:
        m = result["metric"]
        row.update({"metric": m["name"], "fp32": m["fp32"], "quantized": m["quantized"],
                    "delta": m["quantized"] - m["fp32"]})
    sizes = result["size_bytes"]
    row.update({"size fp32": megabytes(sizes["fp32"]), "size quantized": megabytes(sizes["quantized"]),
                "ratio": f"{sizes['fp32'] / max(sizes['quantized'], 1):.2f}x", "seconds": round(result["seconds"], 1),
                "left float": len(result["left_float"])})
    own, accumulated = _worst(result["layers"], "isolated_sqnr_db"), _worst(result["layers"], "output_sqnr_db")
    if own:
        row["worst layer SQNR, own"] = own
    if accumulated:
        row["worst layer SQNR, accumulated"] = accumulated
    return row


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
