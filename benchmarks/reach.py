"""Reach: models as users write them (fewbits.tasks.models.zoo, random weights) and every built-in
task, quantized with the default recipe and deployed, beside ONNX Runtime's own quantizer on the
same fp32 export.

Per model: did prepare / calibrate / export work (or the error), how many layers were quantized and
what stayed float, the share of weight GEMMs ONNX Runtime runs on integer kernels (read from its
optimized graph), output cosine to fp32 on held-out batches (the task metric for built-in tasks,
of the deployed files), latency against fp32 (medians, rounds interleaved, 2 threads, no
spinning) and file size.

    .venv/bin/python benchmarks/reach.py                   # ~8 min on 2 cores
    .venv/bin/python benchmarks/reach.py --models vit,gpt2  # some again (the others' rows are kept)
    .venv/bin/python benchmarks/reach.py --models none --tasks fashion-cnn  # built-in tasks only
    .venv/bin/python benchmarks/reach.py --tables           # reprint from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402
from deploy import bench_task, interleaved_medians, ort_static  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.export.kernels import kernel_report  # noqa: E402
from fewbits.export.onnx import OnnxModel, _torch_onnx_bytes, export_onnx  # noqa: E402
from fewbits.files import write_atomic  # noqa: E402
from fewbits.tasks.models.zoo import ZOO  # noqa: E402

RESULTS = "benchmarks/results/reach.json"
RECIPE = "w8a8"
# the built-in tasks at the batch size each is timed at
TASKS = {"fashion-mlp": 64, "fashion-cnn": 64, "mobilenetv2-probe": 8, "minilm-wordnet": 32, "digits": 64,
         "mnist1d": 64}


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _cosine(outs_a: list, outs_b: list) -> float:
    a = torch.cat([o.float().flatten() for o in outs_a])
    b = torch.cat([o.float().flatten() for o in outs_b])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


FAILED = object()


def _step(row: dict, stage: str, fn):
    """Run one stage: its result, or :data:`FAILED` with the stage and message recorded in ``row``."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 — the benchmark reports what broke where
        row.setdefault("errors", []).append(f"{stage}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return FAILED


def bench(name: str, workdir: Path) -> dict:
    case = ZOO[name]()
    print(f"  {name}: {case.note}", file=sys.stderr, flush=True)
    model, calib, held = case.model, case.batches(4, 0), case.batches(2, 100)
    row: dict = {"model": name, "note": case.note}
    with torch.no_grad():
        reference = [_call(model, b) for b in held]
    q = _step(row, "prepare", lambda: fewbits.prepare(model, RECIPE))
    if q is FAILED:
        return row
    row["quantized layers"] = len(q.quantized_layers())
    row["left float"] = [{"name": lf.name, "type": lf.type, "reason": lf.reason} for lf in q.left_float]
    if _step(row, "calibrate", lambda: fewbits.calibrate(q, calib)) is FAILED:
        return row
    with torch.no_grad():
        row["cosine simulated"] = _cosine(reference, [_call(q, b) for b in held])
    files = {}
    fp32 = workdir / f"{name}-fp32.onnx"
    args = ((), calib[0]) if isinstance(calib[0], dict) else ((calib[0],), {})
    if _step(row, "fp32 export", lambda: write_atomic(fp32, _torch_onnx_bytes(model, *args))) is not FAILED:
        files["ORT fp32"] = fp32
    exported = _step(row, "fewbits export", lambda: export_onnx(q, calib[0], workdir / f"{name}-fewbits.onnx",
                                                                batches=calib[:2]))
    if exported is not FAILED:
        files["fewbits " + RECIPE] = Path(exported.path)
        row["verify"] = exported.verification.summary() if exported.verification else None
        row["unfused"] = exported.kernels.to_dict()["unfused_layers"]
    if "ORT fp32" in files:
        ort = workdir / f"{name}-ort.onnx"
        names = OnnxModel(fp32).inputs
        if _step(row, "ORT quantize_static", lambda: ort_static(fp32, ort, calib, names, False)) is not FAILED:
            files["ORT quantize_static"] = ort
    engines = {}
    for label, path in files.items():
        session = OnnxModel(path)
        feeds = [session.feeds(**b) if isinstance(b, dict) else session.feeds(b) for b in held]
        outs = [torch.from_numpy(session.run(f)[0]) for f in feeds]
        k = kernel_report(path)
        engines[label] = {"bytes": path.stat().st_size, "cosine": _cosine(reference, outs),
                          "kernels": {"integer": k.integer, "float": k.float, "share": round(k.share, 4)},
                          "run": (lambda s=session, f=feeds[0]: s.run(f))}
    if engines:
        print(f"  {name}: timing", file=sys.stderr, flush=True)
        latency = interleaved_medians({label: e.pop("run") for label, e in engines.items()}, seconds_per_engine=4.0)
        for label, e in engines.items():
            e["median_s"] = latency[label]["median_s"]
    row["engines"] = engines
    return row


def bench_builtin(name: str, workdir: Path) -> dict:
    """A built-in task through the deploy benchmark's path (fp32, fewbits, ORT static files on
    one export; metrics of the deployed files), summarized as a reach row."""
    case = {"task": name, "recipes": [RECIPE], "batches": [TASKS[name]]}
    if name == "mobilenetv2-probe":
        case["size"] = 224
    if name == "minilm-wordnet":
        case["tokens"] = 128
    row: dict = {"model": name, "note": "built-in task"}
    result = _step(row, "deploy", lambda: bench_task(case, workdir))
    if result is FAILED:
        return row
    latency = result["latency"][TASKS[name]]
    row["metric"] = result["metric"]
    row["engines"] = {}
    for r in result["rows"]:
        label = r["engine"]
        if "error" in r:
            row.setdefault("errors", []).append(f"{label}: {r['error']}")
            continue
        row["engines"][label] = {"bytes": r["bytes"], "metric": r["metrics"][result["metric"]],
                                 "kernels": r["kernels"], "median_s": latency[r["engine"]]["median_s"]}
        if "export" in r:
            row["unfused"] = r["export"]["kernels"]["unfused_layers"]
            row["verify"] = r["export"].get("verification")
    return row


def task_table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        engines = r.get("engines", {})
        base = engines.get("ORT fp32", {})
        mine, ort = engines.get("fewbits " + RECIPE), engines.get("ORT quantize_static")
        entry = {"task": r["model"], "metric": r.get("metric", "—"), "fp32": base.get("metric", "—")}
        for label, e in (("fewbits", mine), ("ORT static", ort)):
            if e is None:
                entry[label] = entry[f"{label} int GEMMs"] = entry[f"{label} ×fp32"] = "—"
                continue
            k = e["kernels"]
            entry[label] = round(e["metric"], 4)
            entry[f"{label} int GEMMs"] = f"{k['integer']}/{k['integer'] + k['float']}"
            entry[f"{label} ×fp32"] = f"{base['median_s'] / e['median_s']:.2f}x" if base else "—"
        entry["fewbits vs ORT"] = f"{ort['median_s'] / mine['median_s']:.2f}x" if mine and ort else "—"
        entry["fp32 ms"] = round(base["median_s"] * 1e3, 2) if base else "—"
        entry["MB fewbits"] = round(mine["bytes"] / 1e6, 2) if mine else "—"
        entry["errors"] = "; ".join(r.get("errors", []))[:120]
        out.append(entry)
    return out


def table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        engines = r.get("engines", {})
        base = engines.get("ORT fp32", {}).get("median_s")
        mine, ort = engines.get("fewbits " + RECIPE), engines.get("ORT quantize_static")
        entry = {"model": r["model"], "quantized": r.get("quantized layers", "—"), "left float": len(r.get("left float", []))}
        for label, e in (("fewbits", mine), ("ORT static", ort)):
            if e is None:
                entry[f"{label} int GEMMs"] = entry[f"{label} ×fp32"] = entry[f"{label} cosine"] = "—"
                continue
            k = e["kernels"]
            entry[f"{label} int GEMMs"] = f"{k['integer']}/{k['integer'] + k['float']}"
            entry[f"{label} ×fp32"] = f"{base / e['median_s']:.2f}x" if base else "—"
            entry[f"{label} cosine"] = round(e["cosine"], 4)
        entry["fewbits vs ORT"] = f"{ort['median_s'] / mine['median_s']:.2f}x" if mine and ort else "—"
        entry["fp32 ms"] = round(base * 1e3, 2) if base else "—"
        entry["errors"] = "; ".join(r.get("errors", []))[:120]
        out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(ZOO), help="zoo models, comma-separated ('none': no zoo model)")
    p.add_argument("--tasks", default=",".join(TASKS), help="built-in tasks, comma-separated ('none': none)")
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        data = json.loads(Path(RESULTS).read_text())
        print_tables(data["rows"], data.get("task_rows", []), data["profile"])
        return
    set_threads()
    names = [n for n in args.models.split(",") if n != "none"]
    tasks = [n for n in args.tasks.split(",") if n != "none"]
    unknown = [n for n in names if n not in ZOO] + [n for n in tasks if n not in TASKS]
    if unknown:
        raise SystemExit(f"unknown models or tasks {unknown}; models: {sorted(ZOO)}, tasks: {sorted(TASKS)}")
    kept, kept_tasks = [], []
    if Path(RESULTS).exists():
        old = json.loads(Path(RESULTS).read_text())
        kept = [r for r in old["rows"] if r["model"] not in names]
        kept_tasks = [r for r in old.get("task_rows", []) if r["model"] not in tasks]
    rows, task_rows = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(bench(name, Path(tmp)))
        for name in tasks:
            print(f"  {name}: built-in task", file=sys.stderr, flush=True)
            task_rows.append(bench_builtin(name, Path(tmp)))
    rows = sorted(kept + rows, key=lambda r: list(ZOO).index(r["model"]))
    task_rows = sorted(kept_tasks + task_rows, key=lambda r: list(TASKS).index(r["model"]))
    profile = fewbits.int8_kernel_profile().describe()
    print_tables(rows, task_rows, profile)
    save_json({"recipe": RECIPE, "profile": profile, "rows": rows, "task_rows": task_rows,
               "seconds": round(time.perf_counter() - t0, 1)}, RESULTS)


def print_tables(rows: list[dict], task_rows: list[dict], profile: str) -> None:
    print_table(table(rows), title=f"reach: zoo models ({RECIPE}; {profile})")
    if task_rows:
        print_table(task_table(task_rows), title=f"reach: built-in tasks ({RECIPE}; metric of the deployed files)")


if __name__ == "__main__":
    main()
