"""Deployed speed: ONNX Runtime fp32 vs fewbits' int8 QDQ export vs ONNX Runtime's own quantize_static.

For each task, in one process: the fp32 model exported with torch.onnx, fewbits' export of its
recommended recipe (``fewbits.export_onnx``, hardware-aware weights, verified against the
integer model; MiniLM also with dynamic activation ranges) — on a CPU whose int8 kernels saturate, also the recipe prepared with 7-bit
weights from the start (``--fit-cpu``) — and ``onnxruntime.quantization.quantize_static`` on the fp32 file (QDQ,
per-channel s8 weights, u8 activations, MinMax; with and without ``reduce_range``, ORT's 7-bit
weight option for CPUs without VNNI; for MiniLM also ``quantize_dynamic``, per-channel). Every file is run by ONNX Runtime with 2 intra-op threads
and ``session.intra_op.allow_spinning=0``; latencies are medians over repeats taken
round-robin (engines interleaved, order rotated each round), speed-ups are ratios within the
run. The task metric is measured by running the file itself on the task's test data.

    .venv/bin/python benchmarks/deploy.py            # ~20 min on 2 cores
    .venv/bin/python benchmarks/deploy.py --tasks minilm-wordnet   # re-run one task, keep the others
    .venv/bin/python benchmarks/deploy.py --tables   # reprint from the saved JSON

MobileNetV2: latency at 224 px (the ImageNet size); the probe metric at the task's 64 px (the
same file: spatial sizes are dynamic). MiniLM: eager attention for all files; latency on 32
WordNet definitions padded to 128 tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiniLMHidden, MobileNetOutputs, print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.export.kernels import kernel_report  # noqa: E402
from fewbits.export.timing import interleaved_medians  # noqa: E402
from fewbits.export.onnx import NARROW_BITS, OnnxModel, _torch_onnx_bytes, export_onnx  # noqa: E402
from fewbits.recipe import get_recipe, with_weight_bits_at_most  # noqa: E402
from fewbits.files import write_atomic  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/deploy.json"
CASES = [
    {"task": "fashion-cnn", "recipes": ["w8a8"], "batches": [1, 64]},
    {"task": "mobilenetv2-probe", "recipes": ["w8a8-bc", "w8a8-bc-adds", "w8a8-bc-int"], "batches": [1, 8], "size": 224},
    {"task": "minilm-wordnet", "recipes": ["w8a8-dynamic", "w8a8-smoothquant"], "batches": [32], "tokens": 128,
     "ort_dynamic": True},
]
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---- how each task's metric calls a file -------------------------------------------------------
def wrapper(task_name):
    return {"mobilenetv2-probe": MobileNetOutputs, "minilm-wordnet": MiniLMHidden}.get(task_name)


class TaskView:
    """An ONNX Runtime session that the task's ``evaluate`` can call like the torch model."""

    def __init__(self, path, task_name):
        self.onnx, self.task_name = OnnxModel(path), task_name

    def __call__(self, x=None, **kwargs):
        if self.task_name == "minilm-wordnet":
            return SimpleNamespace(last_hidden_state=self.onnx(**{k: kwargs[k] for k in MINILM_INPUTS}))
        return self.onnx(x)

    def features_and_logits(self, x, batch=100):
        outs = [self.onnx(x[i:i + batch]) for i in range(0, len(x), batch)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def example_and_feeds(task, case):
    """The export example, the calibration batches in call form, and the timing inputs per batch size."""
    if task.name == "minilm-wordnet":
        from fewbits.tasks.data.wordnet import read_glosses
        from fewbits.tasks.models.minilm import load_minilm

        _, tokenizer = load_minilm()
        texts = [d for d, _ in read_glosses("noun")][:max(case["batches"])]
        calib = [{k: b[k] for k in MINILM_INPUTS} for b in task.calibration]
        timing = {n: {k: v.numpy() for k, v in tokenizer(texts[:n], padding="max_length", truncation=True,
                                                         max_length=case["tokens"], return_tensors="pt").items()
                      if k in MINILM_INPUTS} for n in case["batches"]}
        return calib[0], calib, timing
    if not task.name.startswith(("fashion", "mobilenetv2")):  # another task: its own calibration inputs
        first = task.calibration[0]
        return first, task.calibration, {n: first[:n].numpy() for n in case["batches"]}
    from fewbits.tasks.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    if task.name == "mobilenetv2-probe":
        from fewbits.tasks.mobilenet_probe import to_imagenet

        x = to_imagenet(images[:max(case["batches"])], size=case["size"])
    else:
        x = images[:max(case["batches"])].float().unsqueeze(1) / 255.0
    return task.calibration[0], task.calibration, {n: x[:n].numpy() for n in case["batches"]}


def fp32_file(task, example, path: Path, dynamic: str) -> None:
    wrap = wrapper(task.name)
    module = wrap(task.model) if wrap else task.model
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else ((example,), {})
    write_atomic(path, _torch_onnx_bytes(module.eval(), args, kwargs, dynamic))


def ort_static(fp32_path: Path, out: Path, calib: list, input_names: list, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            if b is None:
                return None
            return {k: v.numpy() for k, v in b.items()} if isinstance(b, dict) else {input_names[0]: b.numpy()}

    quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                    calibrate_method=CalibrationMethod.MinMax)


# ---- timing: fewbits.export.timing.interleaved_medians ----------------------------------------
# ---- one task --------------------------------------------------------------------------------
def bench_task(case: dict, workdir: Path) -> dict:
    name = case["task"]
    print(f"  {name}: loading", file=sys.stderr, flush=True)
    task = load_task(name)
    if name == "minilm-wordnet" and hasattr(task.model, "set_attn_implementation"):
        # eager attention exports as MatMul/Softmax; SDPA's export adds mask Where/IsNaN passes
        # (~70 ms of 875 at 32×128 here) to both files alike
        task.model.set_attn_implementation("eager")
    example, calib, timing = example_and_feeds(task, case)
    dynamic = "all" if name == "mobilenetv2-probe" else "auto"
    files = {}
    fp32 = workdir / f"{name}-fp32.onnx"
    fp32_file(task, example, fp32, dynamic)
    files["ORT fp32"] = {"path": fp32}

    recipes = [get_recipe(r) for r in case["recipes"]]
    if fewbits.export.int8_kernel_profile().pair_saturation:  # also prepared at the width that deploys
        recipes.append(with_weight_bits_at_most(recipes[-1], NARROW_BITS))
    for recipe in recipes:
        print(f"  {name}: fewbits {recipe.name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        q = fewbits.prepare(task.model, recipe)
        fewbits.calibrate(q, task.calibration)
        quantize_s = time.perf_counter() - t0
        exported = export_onnx(q, example, workdir / f"{name}-{recipe.name}.onnx", batches=calib[:4],
                               wrap=wrapper(name), dynamic=dynamic)
        files[f"fewbits {recipe.name}"] = {"path": Path(exported.path), "quantize_s": quantize_s,
                                           "export": {k: v for k, v in exported.to_dict().items() if k != "layers"}}

    input_names = OnnxModel(fp32).inputs
    for reduce_range in (False, True):
        label = "ORT quantize_static" + (" reduce_range" if reduce_range else "")
        print(f"  {name}: {label}", file=sys.stderr, flush=True)
        out = workdir / f"{name}-ort{'-rr' if reduce_range else ''}.onnx"
        t0 = time.perf_counter()
        try:
            ort_static(fp32, out, calib, input_names, reduce_range)
            files[label] = {"path": out, "quantize_s": time.perf_counter() - t0}
        except Exception as err:  # an anchor that fails is reported, not fatal
            files[label] = {"error": f"{type(err).__name__}: {str(err)[:150]}"}

    if case.get("ort_dynamic"):  # what transformer users usually pick in ONNX Runtime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = workdir / f"{name}-ort-dynamic.onnx"
        t0 = time.perf_counter()
        quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
        files["ORT quantize_dynamic"] = {"path": out, "quantize_s": time.perf_counter() - t0}

    rows = []
    for label, info in files.items():
        row = {"engine": label, **{k: v for k, v in info.items() if k != "path"}}
        if "error" not in info:
            print(f"  {name}: metric of {label}", file=sys.stderr, flush=True)
            row["bytes"] = info["path"].stat().st_size
            row["metrics"] = task.evaluate(TaskView(info["path"], name))
            k = kernel_report(info["path"])  # what ONNX Runtime's optimized graph runs, for every engine
            row["kernels"] = {"integer": k.integer, "float": k.float, "share": round(k.share, 4)}
        rows.append(row)

    latency = {}
    for n, feed in timing.items():
        print(f"  {name}: timing batch {n}", file=sys.stderr, flush=True)
        runs = {}
        for label, info in files.items():
            if "error" in info:
                continue
            session = OnnxModel(info["path"])  # its own feeds: input names can differ between files
            fd = session.feeds(**feed) if isinstance(feed, dict) else session.feeds(feed)
            runs[label] = lambda s=session, fd=fd: s.run(fd)
        latency[n] = interleaved_medians(runs)
    return {"task": name, "recipe": ", ".join(case["recipes"]), "metric": task.metric, "rows": rows, "latency": latency,
            "shape": {"size": case.get("size"), "tokens": case.get("tokens")}}


def table(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        base = {n: r["latency"][n]["ORT fp32"]["median_s"] for n in r["latency"]}
        for row in r["rows"]:
            if "error" in row:
                out.append({"task": r["task"], "engine": row["engine"], "error": row["error"][:60]})
                continue
            m = row["metrics"]
            entry = {"task": r["task"], "engine": row["engine"]}
            for n in r["latency"]:
                t = r["latency"][n][row["engine"]]["median_s"]
                entry[f"b{n} ms"] = round(t * 1e3, 2)
                entry[f"b{n} speed-up"] = f"{base[n] / t:.2f}x"
            entry["MB"] = round(row["bytes"] / 1e6, 2)
            if "kernels" in row:
                k = row["kernels"]
                entry["int GEMMs"] = f"{k['integer']}/{k['integer'] + k['float']}"
            entry[r["metric"]] = round(m[r["metric"]], 2)
            for extra in ("feature_cosine", "cosine_mean", "cosine_min", "top10_overlap"):
                if extra in m:
                    entry[extra] = round(m[extra], 4)
            if "export" in row:
                v = row["export"]["verification"]
                entry["verify"] = f"{v['max_levels']} lvl, {v['differing']:.0e}"
            out.append(entry)
    return out


def print_tables(results: list[dict]) -> None:
    for r in results:
        shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items() if v)
        print_table([row for row in table([r])], title=f"{r['task']} ({r['recipe']}{'; ' + shape if shape else ''})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(c["task"] for c in CASES))
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        print_tables(json.loads(Path(RESULTS).read_text())["results"])
        return
    set_threads()
    wanted = args.tasks.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if case["task"] in wanted:
                results.append(bench_task(case, Path(tmp)))
    profile = fewbits.export.int8_kernel_profile().describe()
    # a run of some tasks replaces theirs and keeps the others' from the same kind of CPU
    previous = json.loads(Path(RESULTS).read_text()) if Path(RESULTS).is_file() else {}
    if previous.get("profile") == profile:
        kept = [r for r in previous["results"] if r["task"] not in wanted]
        order = [c["task"] for c in CASES]
        results = sorted(kept + results, key=lambda r: order.index(r["task"]))
    print_tables(results)
    save_json({"results": results, "profile": profile}, RESULTS)


if __name__ == "__main__":
    main()
