"""SQNR of every Conv/Linear weight of the real MobileNetV2 and MiniLM.

Bits × granularity (per-tensor / per-channel / per-group of at most 128 along the input) ×
range estimator (min-max / MSE / OCTAV), symmetric signed grids (the usual weight format).
MobileNetV2 weights are taken with BatchNorm folded in, as they are deployed: folding scales
each output channel by γ/σ, which is what makes per-tensor ranges of depthwise layers so wide.

    .venv/bin/python benchmarks/weights.py            # full table (a few minutes on 2 cores)
    .venv/bin/python benchmarks/weights.py --quick    # 8 and 4 bits, min-max only

Prints a table per model, saves ``benchmarks/results/weights.json`` and a per-layer plot.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

from fewbits import PerChannel, PerGroup, PerTensor, QuantSpec, fake_quantize, weight_qparams  # noqa: E402
from fewbits.report import sqnr_db  # noqa: E402

GROUP = 128


def mobilenetv2_weights() -> dict[str, torch.Tensor]:
    """Conv/Linear weights with the following BatchNorm folded in, flattened to [out, in·k·k]."""
    from fewbits.tasks.models import load_mobilenetv2

    model = load_mobilenetv2()
    modules = list(model.named_modules())
    out = {}
    for (name, mod), (_, nxt) in zip(modules, modules[1:] + [("", None)]):
        if isinstance(mod, torch.nn.Conv2d):
            w = mod.weight.detach()
            if isinstance(nxt, torch.nn.BatchNorm2d):
                w = w * (nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)).detach()[:, None, None, None]
            kind = "depthwise" if mod.groups == mod.in_channels and mod.groups > 1 else "conv"
            out[f"{name} ({kind})"] = w.reshape(w.shape[0], -1)
        elif isinstance(mod, torch.nn.Linear):
            out[f"{name} (linear)"] = mod.weight.detach()
    return out


def minilm_weights() -> dict[str, torch.Tensor]:
    from fewbits.tasks.models.minilm import load_minilm

    model, _ = load_minilm()
    return {f"{n} (linear)": m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def group_size(k: int) -> int:
    """128 where it divides the row; otherwise the largest divisor of the row below 128."""
    return max(d for d in range(1, min(GROUP, k) + 1) if k % d == 0)


def granularity(kind: str, w: torch.Tensor):
    if kind == "per-tensor":
        return PerTensor()
    if kind == "per-channel":
        return PerChannel(0)
    return PerGroup(group_size(w.shape[1]), axis=1)


def layer_sqnr(w: torch.Tensor, bits: int, gran: str, method: str) -> float:
    spec = QuantSpec(bits=bits, granularity=granularity(gran, w))
    scale, zp = weight_qparams(w, spec, method)
    return sqnr_db(w, fake_quantize(w, scale, zp, spec))


def run_model(name, weights, bits_list, grans, methods):
    rows, per_layer = [], {}
    for gran in grans:
        for method in methods:
            t0 = time.perf_counter()
            cells = {}
            for bits in bits_list:
                values = {layer: layer_sqnr(w, bits, gran, method) for layer, w in weights.items()}
                per_layer[f"{gran}/{method}/{bits}"] = values
                cells[bits] = values
            seconds = time.perf_counter() - t0
            row = {"granularity": gran, "method": method}
            for bits in bits_list:
                vals = list(cells[bits].values())
                row[f"w{bits} median"] = round(statistics.median(vals), 2)
                row[f"w{bits} worst"] = round(min(vals), 2)
            row["seconds"] = round(seconds, 1)
            rows.append(row)
            print(f"  {name} {gran} {method}: {seconds:.1f}s", file=sys.stderr, flush=True)
    return rows, per_layer


def depthwise_table(per_layer, bits_list, grans):
    """MobileNetV2 only: median SQNR of depthwise vs other layers, min-max ranges."""
    rows = []
    for gran in grans:
        for kind in ("depthwise", "conv"):
            row = {"granularity": gran, "layers": kind}
            for bits in bits_list:
                vals = [v for k, v in per_layer[f"{gran}/minmax/{bits}"].items() if f"({kind})" in k]
                row[f"w{bits}"] = round(statistics.median(vals), 2)
            rows.append(row)
    return rows


def plot(per_layer, bits, grans, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    layers = list(per_layer[f"{grans[0]}/minmax/{bits}"])
    for gran in grans:
        ax.plot(range(len(layers)), [per_layer[f"{gran}/minmax/{bits}"][k] for k in layers], marker="o", ms=3, label=gran)
    for i, k in enumerate(layers):
        if "(depthwise)" in k:
            ax.axvspan(i - 0.4, i + 0.4, color="0.88", zorder=0)
    ax.set_xlabel("layer (grey: depthwise)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title(f"MobileNetV2 (BN folded), {bits}-bit symmetric weights, min-max ranges")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mobilenetv2,minilm")
    p.add_argument("--bits", default="8,6,4,3,2")
    p.add_argument("--granularities", default="per-tensor,per-channel,per-group")
    p.add_argument("--methods", default="minmax,mse,octav")
    p.add_argument("--quick", action="store_true", help="8 and 4 bits, min-max only")
    p.add_argument("--json", default="benchmarks/results/weights.json")
    p.add_argument("--plot", default="docs/img/weights_sqnr_mobilenetv2.png")
    args = p.parse_args(argv)
    set_threads()
    bits_list = [8, 4] if args.quick else [int(b) for b in args.bits.split(",")]
    methods = ["minmax"] if args.quick else args.methods.split(",")
    grans = args.granularities.split(",")
    loaders = {"mobilenetv2": mobilenetv2_weights, "minilm": minilm_weights}
    result = {"bits": bits_list, "granularities": grans, "methods": methods, "group": GROUP, "models": {}}
    for model in args.models.split(","):
        weights = loaders[model]()
        n_params = sum(w.numel() for w in weights.values())
        print(f"\n{model}: {len(weights)} Conv/Linear weights, {n_params / 1e6:.2f}M parameters")
        rows, per_layer = run_model(model, weights, bits_list, grans, methods)
        print_table(rows, title=f"{model}: weight SQNR in dB over layers (median / worst layer)")
        entry = {"summary": rows, "per_layer": per_layer,
                 "group_sizes": {k: group_size(w.shape[1]) for k, w in weights.items()}}
        if model == "mobilenetv2" and "minmax" in methods:
            dw = depthwise_table(per_layer, bits_list, grans)
            print_table(dw, title="mobilenetv2: median SQNR (dB), depthwise vs other layers, min-max")
            entry["depthwise"] = dw
            if args.plot:
                plot(per_layer, 4 if 4 in bits_list else bits_list[-1], grans, Path(args.plot))
        result["models"][model] = entry
    save_json(result, args.json)


if __name__ == "__main__":
    main()
