"""Reach: models as users write them (fewbits.tasks.models.zoo, random weights) quantized with the
default recipe and deployed, beside ONNX Runtime's own quantizer on the same fp32 export.

Per model: did prepare / calibrate / export work (or the error), how many layers were quantized and
what stayed float, the share of weight GEMMs ONNX Runtime runs on integer kernels (read from its
optimized graph), output cosine to fp32 on held-out batches, latency against fp32 (medians,
rounds interleaved, 2 threads, no spinning) and file size.

    .venv/bin/python benchmarks/reach.py                   # ~6 min on 2 cores
    .venv/bin/python benchmarks/reach.py --models vit,gpt2  # some again (the others' rows are kept)
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
from deploy import interleaved_medians, ort_static  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.export.kernels import kernel_report  # noqa: E402
from fewbits.export.onnx import OnnxModel, _torch_onnx_bytes, export_onnx  # noqa: E402
from fewbits.files import write_atomic  # noqa: E402
from fewbits.tasks.models.zoo import ZOO  # noqa: E402

RESULTS = "benchmarks/results/reach.json"
RECIPE = "w8a8"


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
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        print_table(table(json.loads(Path(RESULTS).read_text())["rows"]), title=f"reach ({RECIPE})")
        return
    set_threads()
    names = args.models.split(",")
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {sorted(ZOO)}")
    kept = []
    if Path(RESULTS).exists():
        kept = [r for r in json.loads(Path(RESULTS).read_text())["rows"] if r["model"] not in names]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(bench(name, Path(tmp)))
    rows = sorted(kept + rows, key=lambda r: list(ZOO).index(r["model"]))
    print_table(table(rows), title=f"reach ({RECIPE}; {fewbits.int8_kernel_profile().describe()})")
    save_json({"recipe": RECIPE, "profile": fewbits.int8_kernel_profile().describe(), "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}, RESULTS)


if __name__ == "__main__":
    main()
