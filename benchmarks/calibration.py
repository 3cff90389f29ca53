"""Time and peak memory of every fewbits range estimator vs ONNX Runtime's calibrators.

Two data sets, streamed batch by batch exactly as calibration sees them:

* ``laplace``: 10^7 Laplace(0, 1) samples in 100 batches of 10^5;
* ``minilm``: the inputs of every ``nn.Linear`` of all-MiniLM-L6-v2 (37 tensors) on WordNet
  noun definitions, real tokens only, batches of 32 sentences (cached in benchmarks/.cache).

Each (data set, calibrator) runs in a fresh process: time covers observing the whole stream
and estimating every range; peak memory is the rise of the process's resident-set high-water
mark over its size once the data is loaded. ONNX Runtime's calibrators (MinMax, Entropy,
Percentile, default options) see the same tensors as inputs of a graph that only takes their
shape, so each tensor is calibrated once. fewbits targets uint8 asymmetric activations.

    .venv/bin/python benchmarks/calibration.py [--sentences 512] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
FEWBITS_METHODS = ["minmax", "ema", "percentile", "mse", "entropy", "aciq", "octav"]
ORT_METHODS = ["MinMax", "Entropy", "Percentile"]
COUNTERPART = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# ---- data ------------------------------------------------------------------------------------
def laplace_batches(n=10**7, batches=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    x = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    return [{"x": part} for part in x.chunk(batches)]


def minilm_batches(sentences: int, tokens_per_batch: int = 1024):
    """Equal-sized batches of real tokens: ONNX Runtime's histogram calibrators stack batches
    with numpy and fail on ragged ones, so both sides get the same fixed-size chunks."""
    streams = {name: torch.cat(parts) for name, parts in _by_name(_minilm_capture(sentences)).items()}
    n_batches = max(1, len(streams["encoder.layer.0.attention.self.query"]) // tokens_per_batch)
    batches = [{} for _ in range(n_batches)]
    for name, stream in streams.items():  # the pooler's stream (a row per sentence) is shorter
        size = len(stream) // n_batches
        for i, batch in enumerate(batches):
            batch[name] = stream[i * size:(i + 1) * size]
    return batches


def _by_name(batches):
    return {name: [b[name] for b in batches] for name in batches[0]}


def _minilm_capture(sentences: int, batch_size: int = 32):
    path = CACHE / f"minilm_linear_inputs_{sentences}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from fewbits.tasks.data.wordnet import read_glosses
    from fewbits.tasks.models.minilm import load_minilm

    model, tokenizer = load_minilm()
    texts = [d for d, _ in read_glosses("noun", limit=sentences)]
    captured, out = {}, []
    mask_holder = {}

    def hook(name):
        def fn(_module, args):
            x = args[0]  # [batch, tokens, features]; the pooler sees [batch, features]
            captured[name] = (x[mask_holder["mask"]] if x.dim() == 3 else x).detach().clone()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        mask_holder["mask"] = enc["attention_mask"].bool()  # real tokens only, no padding
        with torch.no_grad():
            model(**enc)
        out.append(dict(captured))
        captured.clear()
    for h in handles:
        h.remove()
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def load(dataset: str, sentences: int):
    return laplace_batches() if dataset == "laplace" else minilm_batches(sentences)


# ---- measurement (runs in a fresh process) ---------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def run_fewbits(batches, method):
    from fewbits import QuantSpec, calibrate_qparams, make_observer

    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    observers = {}
    for batch in batches:
        for name, x in batch.items():
            if name not in observers:
                observers[name] = make_observer(method, name=name)
            observers[name].update(x)
    return {name: [float(v) for v in calibrate_qparams(method, obs.state(), spec)] for name, obs in observers.items()}


def _identity_shape_model(batches, path: Path):
    import onnx
    from onnx import TensorProto, helper

    names = list(batches[0])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", batches[0][n].shape[-1]]) for n in names]
    nodes = [helper.make_node("Shape", [n], [f"{n}__shape"]) for n in names]
    outputs = [helper.make_tensor_value_info(f"{n}__shape", TensorProto.INT64, [2]) for n in names]
    graph = helper.make_graph(nodes, "calibration_inputs", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def prepare_ort(batches, workdir: Path):
    import numpy as np

    flat = [{n: t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1) for n, t in b.items()} for b in batches]
    _identity_shape_model(flat, workdir / "inputs.onnx")
    return [{n: np.ascontiguousarray(t.numpy()) for n, t in b.items()} for b in flat]


def run_ort(np_batches, method, workdir: Path):
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(np_batches)

        def get_next(self):
            return next(self.it, None)

    calibrator = create_calibrator(workdir / "inputs.onnx", None, str(workdir / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method))
    calibrator.collect_data(Reader())
    data = calibrator.compute_data()
    return {name: [float(np.ravel(v)[0]) for v in data[name].range_value] for name in data.data}


def worker(dataset, engine, method, sentences, workdir):
    set_threads()
    batches = load(dataset, sentences)
    if engine == "ort":
        batches = prepare_ort(batches, Path(workdir))
    base = _rss_kib("VmRSS")
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    ranges = run_fewbits(batches, method) if engine == "fewbits" else run_ort(batches, method, Path(workdir))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_kib("VmHWM") - base
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak / 1024, "tensors": len(ranges),
                      "example": next(iter(ranges.values()))}))


# ---- driver ----------------------------------------------------------------------------------
def measure(dataset, engine, method, sentences, repeats):
    import tempfile

    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--worker", dataset, engine, method, "--sentences", str(sentences), "--workdir", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["seconds"])
    return runs[len(runs) // 2]  # the median run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="laplace,minilm")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--json", default="benchmarks/results/calibration.json")
    p.add_argument("--worker", nargs=3, metavar=("DATASET", "ENGINE", "METHOD"))
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.sentences, args.workdir)
    result = {"sentences": args.sentences, "datasets": {}}
    for dataset in args.datasets.split(","):
        load(dataset, args.sentences)  # build the cache once, outside the timed workers
        rows = []
        jobs = [("fewbits", m) for m in FEWBITS_METHODS] + ([] if args.no_ort else [("ort", m) for m in ORT_METHODS])
        for engine, method in jobs:
            print(f"  {dataset}: {engine} {method} ...", file=sys.stderr, flush=True)
            r = measure(dataset, engine, method, args.sentences, args.repeats)
            rows.append({"engine": engine, "method": method, **r})
        by_key = {(r["engine"], r["method"]): r for r in rows}
        table = []
        for r in rows:
            row = {"calibrator": f"{r['engine']} {r['method']}"}
            if "error" in r:
                row.update({"seconds": "failed", "peak MiB": r["error"][:60]})
            else:
                row.update({"seconds": round(r["seconds"], 2), "cpu s": round(r["cpu_seconds"], 2),
                            "peak MiB": round(r["peak_mib"], 1)})
                ort = by_key.get(("ort", COUNTERPART.get(r["method"], "")))
                if r["engine"] == "fewbits" and ort and "error" not in ort:
                    row["speed-up vs ORT"] = f"{ort['seconds'] / r['seconds']:.1f}x"
                    row["memory vs ORT"] = f"{r['peak_mib'] / max(ort['peak_mib'], 1e-3):.2f}x"
            table.append(row)
        print_table(table, title=f"{dataset}: calibration of every tensor, time and peak memory")
        result["datasets"][dataset] = rows
    save_json(result, args.json)


if __name__ == "__main__":
    main()
