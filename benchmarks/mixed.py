"""Mixed precision: which sensitivity score predicts the damage of a mixed configuration.

Per task: every layer's sensitivity in every candidate format by each method (sqnr, loss,
hessian, fisher) on a few calibration batches; then random mixed configurations (each layer in a
random format, a random share of the layers below 8 bits), each quantized and measured — the
task metric's drop and the output's relative squared error to fp32 on the calibration batches
the scores did not use. The Spearman rank correlation between a method's predicted damage (the
sum of its layers' scores) and the measured one says which score to trust.

    .venv/bin/python benchmarks/mixed.py                          # fashion-cnn and the MobileNetV2 probe, ~12 min
    .venv/bin/python benchmarks/mixed.py --tasks fashion-cnn --configs 12
    .venv/bin/python benchmarks/mixed.py --tables                 # reprint from the JSON
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, save_json, set_threads  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.decide import METHODS, layer_costs, sensitivity  # noqa: E402
from fewbits.decide.search import Choice, solve  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402
from fewbits.wrap import as_call  # noqa: E402

RESULTS = "benchmarks/results/mixed.json"
CANDIDATES = ("float", "w8a8", "w4a8", "w8", "w4-g128", "w3")
LOW = ("w4a8", "w4-g128", "w3")


def _relative_error(model, reference, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for i, (batch, ref) in enumerate(zip(batches, reference)):
            args, kwargs = as_call(batch, i)
            out = model(*args, **kwargs)
            out = out if isinstance(out, torch.Tensor) else out[0]
            total += float((out - ref).pow(2).sum() / ref.pow(2).sum())
    return total / len(batches)


def _random_configs(sens, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    configs = []
    for _ in range(n):
        low_share = rng.uniform(0.05, 0.6)
        formats = {}
        for layer, scores in sens.scores.items():
            usable = [c for c, s in scores.items() if s is not None]
            low = [c for c in usable if c in LOW]
            high = [c for c in usable if c not in LOW]
            formats[layer] = rng.choice(low if low and rng.random() < low_share else high)
        configs.append(formats)
    return configs


def _spearman(a: list, b: list) -> float:
    from scipy.stats import spearmanr

    return round(float(spearmanr(a, b).statistic), 3)


def bench(name: str, n_configs: int, score_batches: int, seed: int) -> dict:
    print(f"  {name}: loading", file=sys.stderr, flush=True)
    task = load_task(name)
    scored, held = task.calibration[:score_batches], task.calibration[score_batches:score_batches + 4]
    fp32 = task.evaluate(task.model)[task.metric]
    with torch.no_grad():
        reference = []
        for i, batch in enumerate(held):
            args, kwargs = as_call(batch, i)
            out = task.model(*args, **kwargs)
            reference.append(out if isinstance(out, torch.Tensor) else out[0])
    scores, seconds = {}, {}
    for method in METHODS:
        print(f"  {name}: sensitivity {method}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        scores[method] = sensitivity(task.model, scored, CANDIDATES, method, cache_dir=False)
        seconds[method] = round(time.perf_counter() - t0, 1)
    costs = layer_costs(task.model, scored[0], CANDIDATES)
    configs = _random_configs(scores["sqnr"], n_configs, seed)
    rows = []
    for k, formats in enumerate(configs):
        print(f"  {name}: configuration {k + 1}/{len(configs)}", file=sys.stderr, flush=True)
        q = fewbits.calibrate(fewbits.prepare(task.model, Choice(formats, 0.0, {}).recipe()), task.calibration)
        metric = task.evaluate(q)[task.metric]
        rows.append({"formats": formats, "metric": metric, "drop": round(fp32 - metric, 3),
                     "output_error": _relative_error(q, reference, held),
                     "bytes": costs.total(formats, "bytes"),
                     "predicted": {m: sum(scores[m].scores[l][c] for l, c in formats.items()) for m in METHODS}})
    # the HAWQ claim: at the size of each uniform format, the exact mixed choice (loss scores)
    uniform = []
    for cand in ("w8", "w4a8", "w4-g128", "w3"):
        formats = {l: (cand if scores["loss"].scores[l].get(cand) is not None else "float") for l in scores["loss"].scores}
        budget = costs.total(formats, "bytes")
        mixed = solve(scores["loss"], costs, {"bytes": budget}).formats
        row = {"uniform": cand, "bytes": budget}
        for label, f in (("uniform", formats), ("mixed", mixed)):
            print(f"  {name}: {label} at the size of {cand}", file=sys.stderr, flush=True)
            q = fewbits.calibrate(fewbits.prepare(task.model, Choice(f, 0.0, {}).recipe()), task.calibration)
            row[f"{label}_metric"] = task.evaluate(q)[task.metric]
            row[f"{label}_bytes"] = costs.total(f, "bytes")
        uniform.append(row)
    print(f"  {name}: fewbits.auto max_drop 1.0", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    chosen = fewbits.auto(task.model, task.calibration, metric_fn=task.evaluate, metric=task.metric, max_drop=1.0,
                          candidates=CANDIDATES, cache_dir=False)
    auto_row = {"seconds": round(time.perf_counter() - t0, 1), "metric": chosen.metric, "drop": round(chosen.drop, 3),
                "bytes": chosen.choice.costs["bytes"], "trials": len(chosen.trials)}
    correlation = {m: {"drop": _spearman([r["predicted"][m] for r in rows], [r["drop"] for r in rows]),
                       "output_error": _spearman([r["predicted"][m] for r in rows], [r["output_error"] for r in rows])}
                   for m in METHODS}
    return {"task": name, "metric": task.metric, "fp32": fp32, "layers": len(scores["sqnr"].scores),
            "candidates": list(CANDIDATES), "score_batches": score_batches, "seconds": seconds,
            "correlation": correlation, "configs": rows, "uniform_vs_mixed": uniform, "auto": auto_row}


def tables(data: dict) -> None:
    rows = []
    for t in data["tasks"]:
        for m in METHODS:
            rows.append({"task": t["task"], "method": m, "layers": t["layers"], "configs": len(t["configs"]),
                         "ρ vs metric drop": t["correlation"][m]["drop"],
                         "ρ vs output error": t["correlation"][m]["output_error"], "seconds": t["seconds"][m]})
    for t in data["tasks"]:
        if "uniform_vs_mixed" in t:
            print_table([{"task": t["task"], "size of": r["uniform"], "MB": round(r["bytes"] / 1e6, 4),
                          f"uniform {t['metric']}": r["uniform_metric"], f"mixed {t['metric']}": r["mixed_metric"],
                          "mixed MB": round(r["mixed_bytes"] / 1e6, 4), "fp32": t["fp32"]} for r in t["uniform_vs_mixed"]],
                        "mixed (exact choice, loss scores) against uniform formats at equal size")
            a = t["auto"]
            print_table([{"task": t["task"], "auto max-drop 1.0": f"{a['metric']} (drop {a['drop']})",
                          "MB": round(a["bytes"] / 1e6, 4), "trials": a["trials"], "seconds": a["seconds"]}])
    print_table(rows, f"mixed: Spearman ρ of predicted vs measured damage of random mixed configurations "
                      f"({data['environment']['cpu']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="fashion-cnn,mobilenetv2-probe")
    p.add_argument("--configs", type=int, default=20, help="random mixed configurations per task")
    p.add_argument("--score-batches", type=int, default=2, help="calibration batches the scores use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        tables(json.loads(Path(RESULTS).read_text()))
        return
    set_threads()
    start = time.perf_counter()
    tasks = [bench(n, args.configs, args.score_batches, args.seed) for n in args.tasks.split(",")]
    data = {"tasks": tasks, "seconds": round(time.perf_counter() - start, 1)}
    save_json(data, RESULTS)
    tables({"environment": environment(), **data})
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
