"""Non-uniform and extreme quantization, and Deep Compression, measured in one run.

Sections (``--sections``, comma-separated):

* ``deep``: Deep Compression (prune → k-means weight sharing → Huffman file) on fashion-cnn and
  fashion-mlp (LeNet-300-100): bytes, ratio and accuracy after every stage.
* ``quantizers``: weight grids at equal bits — uniform (min-max and MSE ranges), power-of-two,
  APoT, k-means, binary (XNOR-Net α), ternary (TWN, TTQ start) — weight-only PTQ on fashion-cnn
  and mobilenetv2-probe, per output channel; the first and last layer stay at 8-bit uniform in
  every row (the binary/ternary papers' convention). Accuracy, median per-layer weight SQNR, bytes.
* ``qat``: the grids trained, weight-only, ``fewbits.qat.fit``: fashion-cnn 2 epochs on its labels;
  mobilenetv2-probe 3 epochs over 4,096 unlabelled images toward the fp32 pooled features (cosine).
* ``xnor``: bit-packed XNOR–popcount GEMM (C kernel and NumPy) against fp32 GEMM of the same
  shape, one thread each, medians of interleaved repeats; packing the activations included.

    .venv/bin/python benchmarks/compress.py                        # everything (~25 min)
    .venv/bin/python benchmarks/compress.py --sections deep,xnor   # the quick parts
    .venv/bin/python benchmarks/compress.py --tables               # reprint from the saved JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.compress import DeepCompressionConfig, deep_compression  # noqa: E402
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe  # noqa: E402
from fewbits.report.evaluate import quantized_bytes  # noqa: E402
from fewbits.report.metrics import sqnr_db  # noqa: E402
from fewbits.spec import (APoTSpec, BinarySpec, CodebookSpec, PerChannel, Pow2Spec, QuantSpec,  # noqa: E402
                          TernarySpec)
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/compress.json"
SECTIONS = ("deep", "quantizers", "qat", "xnor")
DEEP = {  # the per-task settings of the published run
    "fashion-mlp": DeepCompressionConfig(prune=0.92, bits=5, steps=4, retrain_epochs=4.0, finetune_epochs=1.0),
    "fashion-cnn": DeepCompressionConfig(prune=0.93, bits=5, steps=3, retrain_epochs=2.0, finetune_epochs=1.0),
}
PC = PerChannel(0)


def grids(bits: int) -> list[tuple[str, TensorRecipe]]:
    """Every weight grid of ``bits`` bits (binary at 1, ternary at 2)."""
    out = [(f"uniform {bits}-bit (min-max)", TensorRecipe(QuantSpec(bits, granularity=PC))),
           (f"uniform {bits}-bit (MSE)", TensorRecipe(QuantSpec(bits, granularity=PC), method="mse"))]
    if bits >= 2:
        out.append((f"power-of-two {bits}-bit", TensorRecipe(Pow2Spec(bits, PC))))
    if bits >= 3:
        out.append((f"APoT {bits}-bit", TensorRecipe(APoTSpec(bits, PC))))
    out.append((f"k-means {bits}-bit", TensorRecipe(CodebookSpec(bits, PC))))
    if bits == 2:
        out += [("ternary TWN", TensorRecipe(TernarySpec(granularity=PC))),
                ("ternary TTQ (start)", TensorRecipe(TernarySpec(granularity=PC, learned=True)))]
    if bits == 1:
        out = [("binary XNOR (α = mean|w|)", TensorRecipe(BinarySpec(granularity=PC))),
               ("binary, BinaryConnect (±1)", TensorRecipe(BinarySpec(granularity=PC, scaled=False)))]
    return out


def weight_recipe(name: str, weights: TensorRecipe, ends: list[str]) -> Recipe:
    layer = LayerRecipe(weight=weights)
    keep8 = LayerRecipe(weight=TensorRecipe(QuantSpec(8, granularity=PC)))
    return Recipe(name, (("Conv2d", layer), ("Conv1d", layer), ("Linear", layer)),
                  tuple((n, keep8) for n in ends))


def end_layers(model) -> list[str]:
    names = list(fewbits.prepare(model, "w8").quantized_layers())
    return [names[0], names[-1]]


def median_sqnr(q) -> float:
    """Median over layers: a per-channel codebook can hold a small channel exactly (a depthwise
    3×3 channel has 9 weights), and an infinite SQNR would swamp a mean."""
    return statistics.median(sqnr_db(m.weight, m.quantized_weight()) for m in q.quantized_layers().values())


# ---- sections ----------------------------------------------------------------------------------
def run_deep(tasks: list[str]) -> list[dict]:
    rows = []
    for name in tasks:
        task = load_task(name)
        print(f"  deep compression: {name}", file=sys.stderr, flush=True)
        result = deep_compression(task.model, task.train_data(), task.evaluate, task.metric, DEEP[name])
        for s in result.stages:
            rows.append({"task": name, "stage": s.name, "bytes": s.bytes, "ratio": s.ratio,
                         "accuracy": s.metrics[task.metric], "seconds": s.seconds})
        rows[-1]["layers"] = [{"name": r.name, "params": r.params, "nnz": r.nnz, "bits": r.bits,
                               "file_bytes": r.file_bytes} for r in result.layers]
        rows[-1]["config"] = result.to_dict()["config"]
    return rows


def run_quantizers(tasks: list[str], bits_list=(4, 3, 2, 1)) -> list[dict]:
    rows = []
    for name in tasks:
        task = load_task(name)
        ends = end_layers(task.model)
        fp32 = task.evaluate(task.model)[task.metric]
        rows.append({"task": name, "grid": "fp32", "bits": 32, "accuracy": fp32, "sqnr": None,
                     "bytes": 4 * sum(p.numel() for p in task.model.parameters())})
        for bits in bits_list:
            for label, weights in grids(bits):
                print(f"  {name}: {label}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                q = fewbits.prepare(task.model, weight_recipe(label, weights, ends))
                rows.append({"task": name, "grid": label, "bits": bits, "accuracy": task.evaluate(q)[task.metric],
                             "sqnr": median_sqnr(q), "bytes": quantized_bytes(q), "seconds": time.perf_counter() - t0})
    return rows


def qat_grids(task_name: str) -> list[tuple[str, TensorRecipe]]:
    if task_name == "fashion-cnn":  # the 2-bit grids, APoT at 3, binary
        return ([g for g in grids(2) if "MSE" not in g[0]] + [g for g in grids(3) if "APoT" in g[0]] + grids(1)[:1])
    return [g for g in grids(4) if "MSE" not in g[0]] + [g for g in grids(3) if "uniform" in g[0] and "MSE" not in g[0]
                                                       or "k-means" in g[0]]


def run_qat(task_name: str, epochs: int, lr: float) -> list[dict]:
    """Weight-only QAT of every grid from :func:`qat_grids`: labelled tasks on their labels,
    mobilenetv2-probe toward the fp32 pooled features (cosine distillation, unlabelled images)."""
    from fewbits.batches import ShuffledBatches
    from fewbits.qat import Distillation, fit, prepare_qat

    task = load_task(task_name)
    train = task.train_data()
    labelled = isinstance(train, tuple)
    ends = end_layers(task.model)
    rows = []
    for label, weights in qat_grids(task_name):
        print(f"  QAT {task_name}: {label}", file=sys.stderr, flush=True)
        recipe = weight_recipe(label, weights, ends)
        ptq = task.evaluate(fewbits.prepare(task.model, recipe))[task.metric]
        q = prepare_qat(task.model, recipe)
        data = ShuffledBatches(*train, 128, seed=0) if labelled else train
        teacher = None if labelled else Distillation(task.model, weight=1.0, kind="cosine")
        result = fit(q, data, epochs=epochs, lr=lr, evaluate=task.evaluate, monitor=task.metric, distill=teacher,
                     forward=task.train_forward)
        rows.append({"task": task_name, "grid": label, "ptq": ptq, "qat": result.best[task.metric],
                     "history": [h[task.metric] for h in result.history], "seconds": result.seconds,
                     "epochs": epochs, "lr": lr, "metrics": result.best})
    return rows


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_xnor(repeats: int = 7) -> list[dict]:
    from fewbits.runtime.xnor import compiled_kernel, kernel_error, pack_signs, sign_matmul, xnor_matmul

    if compiled_kernel() is None:
        print(f"  no compiled XNOR kernel ({kernel_error()}): NumPy only", file=sys.stderr)
    shapes = [  # (what, M, K, N)
        ("fc 4096×4096, batch 64", 64, 4096, 4096),
        ("fc 1024×1024, batch 256", 256, 1024, 1024),
        ("fashion-cnn conv2 (im2col, batch 64)", 64 * 14 * 14, 16 * 9, 32),
        ("3×3 conv 64→64 at 56², im2col", 56 * 56, 64 * 9, 64),
        ("3×3 conv 256→256 at 14², im2col", 14 * 14, 256 * 9, 256),
    ]
    torch.set_num_threads(1)
    rows = []
    for what, m, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        b_bits = pack_signs(b)
        exact = bool((xnor_matmul(pack_signs(a), b_bits, k, "numpy") == sign_matmul(a, b).numpy()).all())
        fns = {"fp32": lambda: a @ b.t(), "pack": lambda: pack_signs(a)}
        if compiled_kernel() is not None:
            fns["c"] = lambda: xnor_matmul(pack_signs(a), b_bits, k, "c")
        fns["numpy"] = lambda: xnor_matmul(pack_signs(a), b_bits, k, "numpy")
        times = {key: [] for key in fns}
        for _ in range(repeats):  # interleaved: each repeat times every kernel once
            for key, fn in fns.items():
                times[key].append(_seconds(fn))
        med = {key: statistics.median(v) for key, v in times.items()}
        gmac = m * k * n / 1e9
        rows.append({"shape": what, "M": m, "K": k, "N": n, "exact": exact,
                     "fp32_ms": 1e3 * med["fp32"], "xnor_c_ms": 1e3 * med["c"] if "c" in med else None,
                     "xnor_numpy_ms": 1e3 * med["numpy"], "pack_ms": 1e3 * med["pack"],
                     "speedup_c": med["fp32"] / med["c"] if "c" in med else None,
                     "speedup_numpy": med["fp32"] / med["numpy"],
                     "fp32_gmacs": gmac / med["fp32"], "xnor_c_gmacs": gmac / med["c"] if "c" in med else None})
    return rows


# ---- tables ------------------------------------------------------------------------------------
def print_tables(data: dict) -> None:
    deep = data.get("deep", [])
    for task in dict.fromkeys(r["task"] for r in deep):
        print_table([{"stage": r["stage"], "bytes": r["bytes"], "ratio": f"{r['ratio']:.1f}×",
                      "accuracy": f"{r['accuracy']:.2f}", "seconds": r["seconds"]}
                     for r in deep if r["task"] == task], title=f"Deep Compression: {task}")
    q = data.get("quantizers", [])
    for task in dict.fromkeys(r["task"] for r in q):
        print_table([{"weights": r["grid"], "accuracy": f"{r['accuracy']:.2f}",
                      "median layer weight SQNR dB": "" if r["sqnr"] is None else f"{r['sqnr']:.1f}", "bytes": r["bytes"]}
                     for r in q if r["task"] == task], title=f"weight grids, PTQ (weight-only): {task}")
    qat = data.get("qat", [])
    for task in dict.fromkeys(r["task"] for r in qat):
        mine = [r for r in qat if r["task"] == task]
        print_table([{"weights": r["grid"], "PTQ": f"{r['ptq']:.2f}", "QAT": f"{r['qat']:.2f}",
                      "per epoch": " / ".join(f"{a:.2f}" for a in r["history"]), "train s": round(r["seconds"], 1)}
                     for r in mine], title=f"weight grids, QAT: {task} ({mine[0]['epochs']} epochs)")
    xnor = data.get("xnor", [])
    if xnor:
        print_table([{"shape": r["shape"], "M×K×N": f"{r['M']}×{r['K']}×{r['N']}", "exact": r["exact"],
                      "fp32 ms": f"{r['fp32_ms']:.2f}",
                      "XNOR C ms": "" if r["xnor_c_ms"] is None else f"{r['xnor_c_ms']:.2f}",
                      "C speedup": "" if r["speedup_c"] is None else f"{r['speedup_c']:.1f}×",
                      "NumPy ms": f"{r['xnor_numpy_ms']:.1f}", "NumPy speedup": f"{r['speedup_numpy']:.2f}×",
                      "pack ms": f"{r['pack_ms']:.2f}"} for r in xnor],
                    title="XNOR–popcount GEMM vs fp32 GEMM (1 thread)")


def merged(saved: list[dict], new: list[dict]) -> list[dict]:
    """The new rows, and the saved rows of tasks this run did not redo."""
    redone = {r["task"] for r in new}
    return [r for r in saved if r["task"] not in redone] + new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--deep-tasks", default="fashion-cnn,fashion-mlp")
    p.add_argument("--quantizer-tasks", default="fashion-cnn,mobilenetv2-probe")
    p.add_argument("--qat-tasks", default="fashion-cnn,mobilenetv2-probe")
    p.add_argument("--qat-epochs", type=int, default=2, help="fashion-cnn's epochs")
    p.add_argument("--qat-lr", type=float, default=5e-4, help="fashion-cnn's Adam rate")
    p.add_argument("--qat-epochs-pretrained", type=int, default=3, help="MobileNetV2's epochs (of 4,096 images)")
    p.add_argument("--qat-lr-pretrained", type=float, default=1e-4, help="MobileNetV2's Adam rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    if args.tables:
        print_tables(json.loads(Path(RESULTS).read_text()))
        return
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {SECTIONS}")
    set_threads(args.threads)
    data = json.loads(Path(RESULTS).read_text()) if Path(RESULTS).is_file() else {}
    data.pop("environment", None)
    data.pop("schema_version", None)
    if "deep" in sections:
        data["deep"] = merged(data.get("deep", []), run_deep(args.deep_tasks.split(",")))
    if "quantizers" in sections:
        data["quantizers"] = merged(data.get("quantizers", []), run_quantizers(args.quantizer_tasks.split(",")))
    if "qat" in sections:
        rows = []
        for name in args.qat_tasks.split(","):
            epochs, lr = (args.qat_epochs, args.qat_lr) if name == "fashion-cnn" else \
                (args.qat_epochs_pretrained, args.qat_lr_pretrained)
            rows += run_qat(name, epochs, lr)
        data["qat"] = merged(data.get("qat", []), rows)
    if "xnor" in sections:
        data["xnor"] = run_xnor()
        set_threads(args.threads)
    print_tables(data)
    save_json(data, RESULTS)


if __name__ == "__main__":
    main()
