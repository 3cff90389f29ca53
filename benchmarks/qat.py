"""Quantization-aware training against post-training quantization, same data, one run.

For each task and bit configuration (per-channel symmetric weights, asymmetric per-tensor
activations on the layer inputs): PTQ (nearest rounding, min-max ranges), then from the fp32
checkpoint at a fixed epoch budget — QAT with the clipped STE and moving-average ranges, LSQ
(learned steps), PACT (learned activation clipping; weights as STE), and QAT + distillation
(the fp32 model as teacher, KL on logits at T = 4, weight 0.5). Adam, cosine decay, global batch
128, seeded; the epoch with the best test accuracy is kept (as ``fewbits train`` does) and the
accuracy of its integer model (``fewbits.convert``) is reported beside the simulated one.

    .venv/bin/python benchmarks/qat.py                         # fashion-cnn, 2 epochs each (~25 min)
    .venv/bin/python benchmarks/qat.py --tasks mnist1d --epochs 3   # quick look
    .venv/bin/python benchmarks/qat.py --tables                # reprint from the saved JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.cli import ShuffledBatches  # noqa: E402
from fewbits.qat import Distillation, fit, prepare_qat  # noqa: E402
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe  # noqa: E402
from fewbits.spec import PerChannel, QuantSpec  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/qat.json"
CONFIGS = ((4, 4), (3, 3), (2, 8))  # (weight bits, activation bits)
METHODS = (("QAT (STE)", "ste", False), ("LSQ", "lsq", False), ("PACT", "pact", False),
           ("QAT (STE) + distillation", "ste", True))


def recipe(w_bits: int, a_bits: int) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=w_bits, granularity=PerChannel(0))),
                        input=TensorRecipe(QuantSpec(bits=a_bits, signed=False, symmetric=False)))
    return Recipe(f"w{w_bits}a{a_bits}", (("Conv2d", layer), ("Conv1d", layer), ("Linear", layer)))


def rows_for(task_name: str, epochs: int, lr: float, methods: set) -> list[dict]:
    task = load_task(task_name)
    x, y = task.train_data()
    fp32 = task.evaluate(task.model)[task.metric]
    rows = [{"task": task.name, "config": "fp32", "method": "fp32", "accuracy": fp32, "integer": None,
             "seconds": 0.0, "epochs": 0}]
    for w_bits, a_bits in CONFIGS:
        r = recipe(w_bits, a_bits)
        t0 = time.perf_counter()
        q = fewbits.calibrate(fewbits.prepare(task.model, r), task.calibration)
        rows.append({"task": task.name, "config": r.name, "method": "PTQ (nearest)", "accuracy": task.evaluate(q)[task.metric],
                     "integer": task.evaluate(fewbits.convert(q))[task.metric], "seconds": time.perf_counter() - t0,
                     "epochs": 0})
        for label, method, distill in METHODS:
            if method not in methods:
                continue
            print(f"  {task.name} {r.name} {label} ...", file=sys.stderr, flush=True)
            q = prepare_qat(task.model, r, method=method, batches=task.calibration)
            result = fit(q, ShuffledBatches(x, y, 128, seed=0), epochs=epochs, lr=lr, evaluate=task.evaluate,
                         monitor=task.metric, distill=Distillation(task.model) if distill else None)
            rows.append({"task": task.name, "config": r.name, "method": label, "accuracy": result.best[task.metric],
                         "integer": task.evaluate(fewbits.convert(q))[task.metric], "seconds": result.seconds,
                         "epochs": epochs, "best_epoch": result.best_epoch,
                         "history": [h[task.metric] for h in result.history]})
    for row in rows:
        row["delta"] = row["accuracy"] - fp32
    return rows


def print_tables(rows: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        print_table([{"config": r["config"], "method": r["method"], "accuracy": f"{r['accuracy']:.2f}",
                      "Δ fp32": f"{r['delta']:+.2f}", "integer model": "" if r["integer"] is None else f"{r['integer']:.2f}",
                      "per epoch": " / ".join(f"{a:.2f}" for a in r.get("history", [])),
                      "train s": round(r["seconds"], 1)} for r in rows if r["task"] == task], title=f"QAT: {task}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="fashion-cnn")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--methods", default="ste,lsq,pact", help="which QAT methods to train (distillation uses ste)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        print_tables(json.loads(Path(RESULTS).read_text())["rows"])
        return
    set_threads(args.threads)
    rows = []
    for name in args.tasks.split(","):
        rows += rows_for(name, args.epochs, args.lr, set(args.methods.split(",")))
    print_tables(rows)
    kept = []  # other tasks' rows of the saved run stay
    if Path(RESULTS).is_file():
        kept = [r for r in json.loads(Path(RESULTS).read_text())["rows"] if r["task"] not in {r["task"] for r in rows}]
    save_json({"rows": kept + rows, "epochs": args.epochs, "lr": args.lr, "threads": args.threads}, RESULTS)


if __name__ == "__main__":
    main()
