"""Quantization-aware training against post-training quantization, same data, one run.

For each task and bit configuration (per-channel symmetric weights, asymmetric per-tensor
activations on the layer inputs): PTQ (nearest rounding, min-max ranges), then from the fp32
checkpoint at a fixed epoch budget — QAT with the clipped STE and moving-average ranges, LSQ
(learned steps), PACT (learned activation clipping; weights as STE), and QAT + distillation
(the fp32 model as teacher, KL on logits at T = 4, weight 0.5). Adam, cosine decay, global batch
128, seeded; the epoch with the best test accuracy is kept (as ``fewbits train`` does) and the
accuracy of its integer model (``fewbits.convert``) is reported beside the simulated one.
Binary weights (``1/8``) are XNOR-Net's ``±α`` per output channel (:class:`fewbits.BinarySpec`); for
them LSQ and PACT learn the activation grids only. minilm-wordnet has no labels: its rows train
the built-in ``w4a8`` recipe against the fp32 sentence embeddings by cosine.

    .venv/bin/python benchmarks/qat.py                         # fashion-cnn, 2 epochs each (~25 min)
    .venv/bin/python benchmarks/qat.py --tasks mnist1d --epochs 3   # quick look
    .venv/bin/python benchmarks/qat.py --configs 1/8           # binary weights only (other rows kept)
    .venv/bin/python benchmarks/qat.py --tasks minilm-wordnet --epochs 1 --methods lsq --lr 2e-5  # cosine to fp32
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
from fewbits.batches import ShuffledBatches  # noqa: E402
from fewbits.qat import Distillation, fit, prepare_qat  # noqa: E402
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe, get_recipe  # noqa: E402
from fewbits.spec import BinarySpec, PerChannel, QuantSpec  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/qat.json"
CONFIGS = ((4, 4), (3, 3), (2, 8), (1, 8))  # (weight bits, activation bits); 1: binary (XNOR-Net α per channel)
METHODS = (("QAT (STE)", "ste", False), ("LSQ", "lsq", False), ("PACT", "pact", False),
           ("QAT (STE) + distillation", "ste", True))
UNLABELLED_METHODS = (("QAT (STE) + cosine distillation", "ste", True), ("LSQ + cosine distillation", "lsq", True))


def recipe(w_bits: int, a_bits: int) -> Recipe:
    weights = BinarySpec(granularity=PerChannel(0)) if w_bits == 1 else QuantSpec(bits=w_bits, granularity=PerChannel(0))
    layer = LayerRecipe(weight=TensorRecipe(weights),
                        input=TensorRecipe(QuantSpec(bits=a_bits, signed=False, symmetric=False)))
    return Recipe(f"w{w_bits}a{a_bits}", (("Conv2d", layer), ("Conv1d", layer), ("Linear", layer)))


def rows_for(task_name: str, epochs: int, lr: float, methods: set, configs=CONFIGS) -> list[dict]:
    task = load_task(task_name)
    train = task.train_data()
    labelled = isinstance(train, tuple)
    fp32 = task.evaluate(task.model)[task.metric]
    rows = [{"task": task.name, "config": "fp32", "method": "fp32", "accuracy": fp32, "integer": None,
             "seconds": 0.0, "epochs": 0}]
    # unlabelled (minilm-wordnet): the built-in w4a8 recipe (embedding tables per row), trained
    # against the fp32 embeddings by cosine only
    recipes = [recipe(w, a) for w, a in configs] if labelled else [get_recipe("w4a8")]
    for r in recipes:
        t0 = time.perf_counter()
        q = fewbits.calibrate(fewbits.prepare(task.model, r), task.calibration)
        metrics = task.evaluate(q)
        rows.append({"task": task.name, "config": r.name, "method": "PTQ (nearest)", "accuracy": metrics[task.metric],
                     "integer": task.evaluate(fewbits.convert(q))[task.metric], "seconds": time.perf_counter() - t0,
                     "epochs": 0, "metrics": metrics})
        for label, method, distill in METHODS if labelled else UNLABELLED_METHODS:
            if method not in methods:
                continue
            print(f"  {task.name} {r.name} {label} ...", file=sys.stderr, flush=True)
            q = prepare_qat(task.model, r, method=method, batches=task.calibration)
            data = ShuffledBatches(*train, 128, seed=0) if labelled else train
            teacher = Distillation(task.model) if distill and labelled else \
                Distillation(task.model, weight=1.0, kind="cosine") if distill else None
            result = fit(q, data, epochs=epochs, lr=lr, evaluate=task.evaluate, monitor=task.metric, distill=teacher,
                         forward=task.train_forward)
            rows.append({"task": task.name, "config": r.name, "method": label, "accuracy": result.best[task.metric],
                         "integer": task.evaluate(fewbits.convert(q))[task.metric], "seconds": result.seconds,
                         "epochs": epochs, "best_epoch": result.best_epoch,
                         "history": [h[task.metric] for h in result.history], "metrics": result.best})
    for row in rows:
        row["delta"] = row["accuracy"] - fp32
    return rows


def print_tables(rows: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        print_table([{"config": r["config"], "method": r["method"], "accuracy": f"{r['accuracy']:.2f}",
                      "Δ fp32": f"{r['delta']:+.2f}", "integer model": "" if r["integer"] is None else f"{r['integer']:.2f}",
                      **({"cosine to fp32": f"{r['metrics']['cosine_mean']:.4f}"} if "cosine_mean" in r.get("metrics", {})
                         else {}),
                      "per epoch": " / ".join(f"{a:.2f}" for a in r.get("history", [])),
                      "train s": round(r["seconds"], 1)} for r in rows if r["task"] == task], title=f"QAT: {task}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="fashion-cnn")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--methods", default="ste,lsq,pact", help="which QAT methods to train (distillation uses ste)")
    p.add_argument("--configs", help="weight/activation bits to run, e.g. 1/8,4/4 (default: all; 1 = binary); "
                   "the saved rows of the others stay")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        print_tables(json.loads(Path(RESULTS).read_text())["rows"])
        return
    set_threads(args.threads)
    configs = CONFIGS if not args.configs else tuple(tuple(int(b) for b in c.split("/")) for c in args.configs.split(","))
    rows = []
    for name in args.tasks.split(","):
        rows += rows_for(name, args.epochs, args.lr, set(args.methods.split(",")), configs)
    kept = []  # the saved rows of other tasks and configurations stay
    if Path(RESULTS).is_file():
        new = {(r["task"], r["config"]) for r in rows}
        kept = [r for r in json.loads(Path(RESULTS).read_text())["rows"] if (r["task"], r["config"]) not in new
                and not (r["config"] == "fp32" and r["task"] in {t for t, _ in new})]
    tasks = list(dict.fromkeys(r["task"] for r in kept + rows))
    order = ["fp32"] + [f"w{w}a{a}" for w, a in CONFIGS]
    rows = sorted(kept + rows, key=lambda r: (tasks.index(r["task"]), order.index(r["config"]) if r["config"] in order
                                              else len(order)))
    print_tables(rows)
    save_json({"rows": rows, "epochs": args.epochs, "lr": args.lr, "threads": args.threads}, RESULTS)


if __name__ == "__main__":
    main()
