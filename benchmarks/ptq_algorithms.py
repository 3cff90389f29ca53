"""Post-training algorithms on the real tasks, same data, one run.

Sections (``--sections``; more join as the algorithms land):

* ``dfq`` — the data-free quantization experiment (Nagel et al. 2019, table 1 / 6) on
  ``mobilenetv2-probe``: 8-bit weights with ONE scale per tensor, 8-bit activations. Naive
  per-tensor quantization, cross-layer equalization (CLE, with high-bias absorption), CLE + bias
  correction, against per-channel weight scales and fp32. MobileNetV2's depthwise layers mix
  channels whose weight ranges differ by orders of magnitude: one scale per tensor rounds the
  small channels to zero, which CLE fixes by moving range between consecutive layers.

Reports the task's metrics and the wall time of each algorithm step (fewbits' simulated model;
``fewbits.convert`` / ``export_onnx`` deploy the same numbers, see docs/deploy.md).

    .venv/bin/python benchmarks/ptq_algorithms.py [--sections dfq] [--small]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe, get_recipe  # noqa: E402
from fewbits.spec import PerChannel, PerTensor, QuantSpec  # noqa: E402
from fewbits.steps import BiasCorrection, CrossLayerEqualization  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/ptq_algorithms.json"
_ACT = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")


def w8a8(granularity, steps=(), name="") -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=8, granularity=granularity)), input=_ACT)
    base = get_recipe("w8a8")
    return Recipe(name, (("Conv2d", layer), ("Linear", layer)), base.by_name, steps=steps)


def dfq_rows(small: bool) -> list[dict]:
    task = load_task("mobilenetv2-probe", small=small)
    fp32 = task.evaluate(task.model)
    rows = [{"section": "dfq", "method": "fp32", **fp32, "seconds": 0.0}]
    cases = [("per-tensor, nearest", w8a8(PerTensor())),
             ("per-tensor, CLE", w8a8(PerTensor(), (CrossLayerEqualization(),))),
             ("per-tensor, CLE + bias correction", w8a8(PerTensor(), (CrossLayerEqualization(), BiasCorrection()))),
             ("per-channel, nearest", w8a8(PerChannel(0))),
             ("per-channel, bias correction", w8a8(PerChannel(0), (BiasCorrection(),)))]
    for label, recipe in cases:
        print(f"  dfq: {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        q = fewbits.calibrate(fewbits.prepare(task.model, recipe), task.calibration)
        seconds = time.perf_counter() - start
        steps = {r.step["name"]: round(r.seconds, 2) for r in q.applied}
        rows.append({"section": "dfq", "method": label, **task.evaluate(q), "seconds": seconds, "steps": steps})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="dfq")
    p.add_argument("--small", action="store_true", help="the tasks' small subsets (quick look)")
    args = p.parse_args()
    set_threads()
    rows = []
    for section in args.sections.split(","):
        rows += {"dfq": dfq_rows}[section](args.small)
    table = [{"section": r["section"], "method": r["method"],
              "probe accuracy": round(r["probe_accuracy"], 1), "top-1 agreement": round(r["top1_agreement"], 1),
              "feature cosine": round(r["feature_cosine"], 4),
              "algorithm s": ", ".join(f"{k} {v}" for k, v in r.get("steps", {}).items()) or "-",
              "total s": round(r["seconds"], 1)} for r in rows]
    print_table(table, title="post-training algorithms (mobilenetv2-probe, w8a8)")
    save_json({"rows": rows, "small": args.small}, RESULTS)


if __name__ == "__main__":
    main()
