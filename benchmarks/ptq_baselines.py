"""Post-training quantization: fewbits recipes vs what a user would pick instead, same data.

On fashion-cnn, mobilenetv2-probe and minilm-wordnet: fp32; fewbits w8a8 (each calibration
method), w8a8-dynamic, w8a8-smoothquant, w8a8-bc, w8, w4-g128; ONNX Runtime ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations; MinMax / Entropy / Percentile on the task's calibration batches)
and ``quantize_dynamic`` (per-channel); torch.ao ``quantize_dynamic`` (int8 Linear). Reports
the task's metrics, size in bytes and quantization time (simulated accuracy for fewbits; ONNX
Runtime and torch.ao run their real int8 kernels).

    .venv/bin/python benchmarks/ptq_baselines.py [--tasks ...] [--small]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiniLMHidden, MobileNetOutputs, print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.report.summary import calib_label  # noqa: E402
from fewbits.recipe import get_recipe, with_calibration  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402

FEWBITS = [("w8a8", "minmax"), ("w8a8", "percentile"), ("w8a8", "entropy"), ("w8a8", "mse"),
           ("w8a8-dynamic", None), ("w8a8-smoothquant", None), ("w8a8-bc", None), ("w8", None),
           ("w4-g128", None)]
ORT_STATIC = ["MinMax", "Entropy", "Percentile"]


# ---- ONNX export of each task's model, and ONNX Runtime sessions that stand in for it ----------
def export(task, path: Path) -> list[str]:
    example = task.calibration[0]
    if task.name == "minilm-wordnet":
        names = ["input_ids", "attention_mask", "token_type_ids"]
        args = tuple(example[n] for n in names)
        dyn = {n: {0: "batch", 1: "tokens"} for n in names}
        torch.onnx.export(MiniLMHidden(task.model), args, path, input_names=names, output_names=["hidden"],
                          dynamic_axes={**dyn, "hidden": {0: "batch", 1: "tokens"}}, opset_version=17, dynamo=False)
        return names
    wrapped = MobileNetOutputs(task.model) if task.name == "mobilenetv2-probe" else task.model
    outputs = ["features", "logits"] if task.name == "mobilenetv2-probe" else ["logits"]
    torch.onnx.export(wrapped, (example[:1],), path, input_names=["x"], output_names=outputs,
                      dynamic_axes={"x": {0: "n"}, **{o: {0: "n"} for o in outputs}}, opset_version=17, dynamo=False)
    return ["x"]


class OrtModel:
    """Calls an ONNX Runtime session the way the task's metric calls a torch model."""

    def __init__(self, path: Path, task_name: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.task_name = task_name

    def __call__(self, x=None, **kwargs):
        if self.task_name == "minilm-wordnet":
            feeds = {k: kwargs[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
            return SimpleNamespace(last_hidden_state=torch.from_numpy(self.session.run(None, feeds)[0]))
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[-1])

    def features_and_logits(self, x, batch=100):
        outs = [self.session.run(None, {"x": x[i:i + batch].numpy()}) for i in range(0, len(x), batch)]
        return torch.from_numpy(np.concatenate([o[0] for o in outs])), torch.from_numpy(np.concatenate([o[1] for o in outs]))


def _reader(task, names):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(task.calibration)

        def get_next(self):
            batch = next(self.batches, None)
            if batch is None:
                return None
            if isinstance(batch, dict):
                return {n: batch[n].numpy() for n in names}
            return {"x": batch.numpy()}

    return Reader()


# ---- the candidates --------------------------------------------------------------------------
def run_fewbits(task, recipe_name, calib):
    recipe = get_recipe(recipe_name)
    if calib:
        recipe = with_calibration(recipe, calib)
    t0 = time.perf_counter()
    q = fewbits.prepare(task.model, recipe)
    fewbits.calibrate(q, task.calibration)
    seconds = time.perf_counter() - t0
    report = fewbits.evaluate(q, task.model, metric_fn=task.evaluate, metric=task.metric, batches=task.calibration[:2])
    return {"engine": "fewbits", "config": f"{recipe.name} {calib_label(recipe)}", "metrics": report.quantized,
            "size_bytes": report.size_bytes["quantized"], "seconds": seconds}


def run_ort(task, fp32_path, names, kind, method, workdir):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    out = workdir / f"{kind}_{method or 'dyn'}.onnx"
    t0 = time.perf_counter()
    if kind == "static":
        quantize_static(str(fp32_path), str(out), _reader(task, names), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    else:
        quantize_dynamic(str(fp32_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - t0
    metrics = task.evaluate(OrtModel(out, task.name))
    return {"engine": "onnxruntime", "config": f"quantize_{kind} {method or 'per-channel'}", "metrics": metrics,
            "size_bytes": out.stat().st_size, "seconds": seconds}


def run_torch_ao(task):
    from torch.ao.quantization import quantize_dynamic

    t0 = time.perf_counter()
    q = quantize_dynamic(task.model, {nn.Linear}, dtype=torch.qint8)
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    return {"engine": "torch.ao", "config": "quantize_dynamic Linear", "metrics": task.evaluate(q),
            "size_bytes": buf.getbuffer().nbytes, "seconds": seconds}


def bench_task(name, small):
    task = load_task(name, small=small)
    fp32 = task.evaluate(task.model)
    rows = [{"engine": "fp32", "config": "", "metrics": fp32, "size_bytes": fewbits.report.model_bytes(task.model), "seconds": 0.0}]
    for recipe_name, calib in FEWBITS:
        print(f"  {name}: fewbits {recipe_name} {calib or ''}", file=sys.stderr, flush=True)
        rows.append(run_fewbits(task, recipe_name, calib))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fp32_path = workdir / "fp32.onnx"
        names = export(task, fp32_path)
        for kind, method in [("static", m) for m in ORT_STATIC] + [("dynamic", None)]:
            print(f"  {name}: onnxruntime {kind} {method or ''}", file=sys.stderr, flush=True)
            try:
                rows.append(run_ort(task, fp32_path, names, kind, method, workdir))
            except Exception as err:  # an anchor that fails is reported, not fatal
                rows.append({"engine": "onnxruntime", "config": f"quantize_{kind} {method or ''}", "error": str(err)[:120]})
    if any(isinstance(m, nn.Linear) for m in task.model.modules()):
        rows.append(run_torch_ao(task))
    return task.metric, rows


def table_rows(task_name, metric, rows):
    fp32 = rows[0]["metrics"]
    out = []
    for r in rows:
        row = {"task": task_name, "engine": r["engine"], "config": r["config"]}
        if "error" in r:
            # numpy's message when ORT's Entropy/Percentile calibrators stack batches of different lengths
            ragged = "setting an array element with a sequence" in r["error"]
            row["error"] = "failed: ORT cannot stack ragged calibration batches" if ragged else r["error"]
            out.append(row)
            continue
        m = r["metrics"]
        row[metric] = round(m[metric], 2)
        row["delta"] = round(m[metric] - fp32[metric], 2)
        for extra in ("cosine_mean", "cosine_min", "top10_overlap", "top1_agreement", "feature_cosine"):
            if extra in m:
                row[extra] = round(m[extra], 4 if "cos" in extra or "overlap" in extra else 2)
        row["size MB"] = round(r["size_bytes"] / 1e6, 3)
        row["quantize s"] = round(r["seconds"], 2)
        out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="fashion-cnn,mobilenetv2-probe,minilm-wordnet")
    p.add_argument("--small", action="store_true")
    p.add_argument("--json", default="benchmarks/results/ptq_baselines.json")
    p.add_argument("--tables", action="store_true", help="only print the tables of the saved --json")
    args = p.parse_args(argv)
    if args.tables:
        for name, saved in json.loads(Path(args.json).read_text())["tasks"].items():
            print_table(table_rows(name, saved["metric"], saved["rows"]), title=f"{name}")
        return
    set_threads()
    result = {"small": args.small, "tasks": {}}
    for name in args.tasks.split(","):
        metric, rows = bench_task(name, args.small)
        print_table(table_rows(name, metric, rows), title=f"{name}: fp32 vs fewbits vs ONNX Runtime / torch.ao")
        result["tasks"][name] = {"metric": metric, "rows": rows}
    save_json(result, args.json)


if __name__ == "__main__":
    main()
