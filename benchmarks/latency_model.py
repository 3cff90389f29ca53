"""How well the latency table predicts whole configurations, with and without its groups (layout
regions, siblings sharing an input quantization), and what worker processes buy the sensitivity.

    .venv/bin/python benchmarks/latency_model.py --tasks mobilenetv2-probe,minilm-wordnet,fashion-cnn
    .venv/bin/python benchmarks/latency_model.py --tables

Per task: the latency table (built fresh in a temporary directory unless --table-dir), then every
uniform format and ``--random`` random mixes, each quantized, exported and timed in ONNX Runtime
(batch 1, 2 threads) beside the reference graph; the prediction rescaled by the reference's drift
since the table was read. "without groups and scale" is the same table and costs with the groups
taken out (each integer sibling pays its own input quantization, no layout region saves anything),
the integer neighbours' savings unscaled and each layer's time alone (not scaled to a bank run
whole): the model before fewbits.decide.layout, the integer anchor and the in-model ratios. "mostly integer" mixes are held out from the anchor (every layer integer). Then ``loss`` sensitivity in 1 and 2 worker processes,
alternated, scores compared.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from common import environment, print_table, save_json, set_threads

import fewbits
from fewbits.decide import layer_costs
from fewbits.decide.candidates import CANDIDATES as CANDIDATES_BY_NAME
from fewbits.decide.cost import is_integer
from fewbits.decide.latency import _slice, latency_table, model_latency
from fewbits.decide.search import _choice
from fewbits.tasks import load_task

RESULTS = "benchmarks/results/latency_model.json"
CANDIDATES = ["float", "w8a8", "w4a8", "w8", "w4-g128", "w3"]


def without_groups(costs, lat):
    """The costs as the table priced them before layout regions, siblings, the integer anchor and
    the in-model ratios."""
    old = copy.deepcopy(costs)
    old.groups = []
    scale = costs.calibration.get("integer_savings_scale", 1.0)
    for saving in old.chain_savings:
        if "integer|integer" in saving and scale > 0:
            saving["integer|integer"]["latency_s"] /= scale
    # the fp32 model's float regions and one quantization per sibling group were added to the constant
    old.constant["latency_s"] -= sum(g["latency_s"] for g in lat.groups
                                     if g["why"] == "siblings" or "float" in next(iter(g["members"].values())))
    for n, row in old.table.items():
        for c, cell in row.items():
            if is_integer(c):
                cell["latency_s"] += lat.shared_input.get(n, 0.0)
            # each layer alone again, not scaled to its time inside a bank of its domain's layers
            alone = lat.seconds[n][c] / lat.in_model.get(CANDIDATES_BY_NAME[c].domain, 1.0)
            if c == "float":  # the fp32 model stays exact: the constant takes the difference
                old.constant["latency_s"] += lat.seconds[n][c] - alone
            cell["latency_s"] -= lat.seconds[n][c] - alone
    return old


def bench_latency(name: str, n_random: int, seed: int, table_dir: Path) -> dict:
    task = load_task(name)
    sens = fewbits.sensitivity(task.model, task.calibration[:2], CANDIDATES, "loss")
    t0 = time.perf_counter()
    lat = latency_table(task.model, task.calibration[0], CANDIDATES, path=table_dir / f"latency-{name}.json")
    table_s = time.perf_counter() - t0
    costs = layer_costs(task.model, task.calibration[0], CANDIDATES, latency=lat)
    old = without_groups(costs, lat)
    configs = [(f"uniform {f}", {l: f if f in costs.table[l] else "float" for l in sens.scores}) for f in CANDIDATES]
    rng = random.Random(seed)
    configs += [(f"random {i}", {l: rng.choice([c for c in costs.table[l] if sens.scores[l].get(c) is not None])
                                 for l in sens.scores}) for i in range(n_random)]
    # held out from the integer calibration: mostly integer, each layer w8a8 or w4a8 with probability 0.85
    for i in range(n_random // 2):
        formats = {}
        for l in sens.scores:
            usable = [c for c in costs.table[l] if sens.scores[l].get(c) is not None]
            ints = [c for c in usable if is_integer(c)]
            formats[l] = rng.choice(ints if ints and rng.random() < 0.85 else usable)
        configs.append((f"mostly integer {i}", formats))
    example, rows = _slice(task.calibration[0], 1), []
    for label, formats in configs:
        print(f"  {name}: {label}", file=sys.stderr, flush=True)
        q = fewbits.calibrate(fewbits.prepare(task.model, _choice(formats, sens, costs).recipe()), task.calibration[:4])
        seconds, kernels, ref, empty = model_latency(q, example, reference=True)
        drift = (ref - empty) / lat.reference_s
        rows.append({"task": name, "config": label, "measured_ms": round(seconds * 1e3, 4),
                     "error": round(costs.total(formats, "latency_s") * drift / seconds - 1, 4),
                     "error_without_groups_and_scale": round(old.total(formats, "latency_s") * drift / seconds - 1, 4),
                     "drift": round(drift, 3), "integer_gemms": f"{kernels['integer']}/{kernels['integer'] + kernels['float']}"})
    groups = {w: sum(g["why"] == w for g in lat.groups) for w in ("layout region", "siblings")}
    return {"task": name, "table_seconds": round(table_s, 1), "groups": groups,
            "in_model": {d: round(r, 3) for d, r in lat.in_model.items()},
            "integer_savings_scale": round(costs.calibration.get("integer_savings_scale", 1.0), 3), "configs": rows}


def bench_workers(name: str, repeats: int = 2) -> list:
    task = load_task(name)
    rows, reference = [], None
    for _ in range(repeats):
        for workers in (1, 2):
            t0 = time.perf_counter()
            s = fewbits.sensitivity(task.model, task.calibration[:4], CANDIDATES, "loss", cache_dir=False, workers=workers)
            rows.append({"task": name, "workers": workers, "seconds": round(time.perf_counter() - t0, 1),
                         "equal_scores": reference is None or s.scores == reference})
            reference = reference or s.scores
    return rows


def tables(data: dict) -> None:
    for t in data["latency"]:
        print_table(t["configs"], title=f"{t['task']}: predicted vs measured (groups: {t['groups']}, integer "
                                        f"savings scaled by {t['integer_savings_scale']}, in model {t['in_model']})")
    print_table(data["workers"], title="loss sensitivity: worker processes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="mobilenetv2-probe,minilm-wordnet,fashion-cnn")
    p.add_argument("--random", type=int, default=6, help="random mixes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers-tasks", default="mobilenetv2-probe", help="tasks the worker processes are timed on")
    p.add_argument("--table-dir", help="keep the latency tables here (default: a temporary directory)")
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        tables(json.loads(Path(RESULTS).read_text()))
        return
    set_threads()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.table_dir or tmp)
        latency = [bench_latency(n, args.random, args.seed, where) for n in args.tasks.split(",")]
    workers = [r for n in args.workers_tasks.split(",") if n for r in bench_workers(n)]
    data = {"environment": environment(), "latency": latency, "workers": workers,
            "seconds": round(time.perf_counter() - start, 1)}
    save_json(data, RESULTS)
    tables(data)
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
