"""The integer model (fewbits.convert) against the simulated model it came from, on the real tasks.

For each task and its recommended recipe: the task metrics of the simulated (fake-quant) model
and of the integer model, the number of integer chains torch.fx found, and the float islands.

    .venv/bin/python benchmarks/integer_model.py      # ~8 min on 2 cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.convert.layers import IntegerAdd, IntegerAvgPool, IntegerConcat  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

CASES = [("fashion-cnn", "w8a8"), ("mobilenetv2-probe", "w8a8-bc"), ("mobilenetv2-probe", "w8a8-bc-adds"),
         ("mobilenetv2-probe", "w8a8-bc-int"), ("minilm-wordnet", "w8a8-smoothquant")]


def main() -> None:
    set_threads()
    rows = []
    for name, recipe in CASES:
        print(f"  {name} {recipe} ...", file=sys.stderr, flush=True)
        task = load_task(name)
        q = fewbits.prepare(task.model, recipe)
        fewbits.calibrate(q, task.calibration)
        start = time.perf_counter()
        integer = fewbits.convert(q)
        seconds = time.perf_counter() - start
        sim, got = task.evaluate(q), task.evaluate(integer)
        rows.append({"task": name, "recipe": recipe, "metric": task.metric, "simulated": sim, "integer": got,
                     "chains": len(integer.chains), "integer layers": len(integer.integer_layers()),
                     "integer adds": sum(isinstance(m, IntegerAdd) for m in integer.model.modules()),
                     "integer pools / concats": sum(isinstance(m, (IntegerAvgPool, IntegerConcat))
                                                    for m in integer.model.modules()),
                     "float islands": len(integer.float_islands), "convert s": seconds})
    table = [{"task": r["task"], "recipe": r["recipe"], "metric": r["metric"],
              "simulated": round(r["simulated"][r["metric"]], 2), "integer": round(r["integer"][r["metric"]], 2),
              **{f"{k} (sim / int)": f"{r['simulated'][k]:.4f} / {r['integer'][k]:.4f}"
                 for k in ("feature_cosine", "cosine_min") if k in r["simulated"]},
              "integer layers": r["integer layers"], "integer adds": r["integer adds"],
              "integer pools / concats": r["integer pools / concats"], "chains": r["chains"], "float islands": r["float islands"],
              "convert s": round(r["convert s"], 2)} for r in rows]
    print_table(table, title="integer model vs simulated model")
    save_json({"rows": rows}, "benchmarks/results/integer_model.json")


if __name__ == "__main__":
    main()
