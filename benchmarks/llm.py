"""LLM: SmolLM2-135M-Instruct (the ``smollm2`` task) quantized the ways an LLM user would, and
deployed on ONNX Runtime beside ONNX Runtime's own 4-bit weight quantizer.

Section ``quality``: per configuration, perplexity on held-out WordNet definitions and on stdlib
docstrings, next-token top-1 and greedy-continuation agreement with fp32, the time to quantize
and the peak resident memory above the loaded model while quantizing (sampled every 20 ms).
Each row is saved as it completes: a second run skips the rows it has (``--force`` redoes them).

Section ``deploy``: the fp32 model and the chosen fewbits configuration exported, ONNX Runtime's
``MatMulNBitsQuantizer`` (RTN, symmetric blocks of 128; and its HQQ mode) applied to the same
fp32 export; each file's size, its perplexity as ONNX Runtime runs it (default session: 4-bit
kernels with int8 activations per block), and latency interleaved against the fp32 file: one
256-token forward (prefill) and one 1-token forward (the exported graph has no key/value
cache yet, so a real decode step after 256 tokens is not measured).

    .venv/bin/python benchmarks/llm.py                       # both sections, ~60 min on 2 cores
    .venv/bin/python benchmarks/llm.py --sections quality --configs gptq-w4-g128
    .venv/bin/python benchmarks/llm.py --sections sizes      # recount the rows' bytes (prepare only)
    .venv/bin/python benchmarks/llm.py --tables              # reprint from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.recipe import get_recipe  # noqa: E402
from fewbits.steps import GPTQ  # noqa: E402

RESULTS = "benchmarks/results/llm.json"
HEAD = ("*lm_head",)  # the LM head (tied to the embedding table here) kept float, as LLM toolkits do
# name: (recipe, post-training step or None, layers kept float)
CONFIGS = {
    "rtn-w4-g128-head4": ("w4-g128", None, ()),
    "rtn-w4-g128": ("w4-g128", None, HEAD),
    "gptq-w4-g128": ("w4-g128", GPTQ(), HEAD),
    "gptq-w4-g128-actorder": ("w4-g128", GPTQ(act_order=True), HEAD),
    "rtn-w4-g128-asym": ("w4-g128-asym", None, HEAD),
    "gptq-w4-g128-asym": ("w4-g128-asym", GPTQ(act_order=True), HEAD),
    "rtn-w4-g32-asym": ("w4-g32-asym", None, HEAD),
    "rtn-w3-g128": ("w3-g128", None, HEAD),
    "gptq-w3-g128": ("w3-g128", GPTQ(act_order=True), HEAD),
    "w8": ("w8", None, HEAD),
    "w8a8-per-token": ("w8a8-per-token", None, HEAD),
    "w8a8-dynamic": ("w8a8-dynamic", None, HEAD),
}
DEPLOY = "gptq-w4-g128-asym"  # the best 4-bit row of the quality section


class PeakMemory:
    """The largest resident set size seen (``/proc/self/statm``, every ``interval`` s) while the
    ``with`` block runs, above the size at its start."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_start_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def quantized(task, config: str):
    recipe_name, step, keep = CONFIGS[config]
    recipe = get_recipe(recipe_name)
    if step is not None:
        recipe = replace(recipe, steps=tuple(recipe.steps) + (step,))
    if keep:
        recipe = replace(recipe, exclude=tuple(recipe.exclude) + keep)
    q = fewbits.prepare(task.model, recipe)
    fewbits.calibrate(q, task.calibration)
    return q


def _rounded(scores: dict) -> dict:
    return {k: round(v, 3) for k, v in scores.items()}


def quality(task, configs: list, rows: dict, force: bool, save) -> None:
    if "fp32" not in rows or force:
        rows["fp32"] = {"config": "fp32", **_rounded(task.evaluate(task.model))}
        save()
    for config in configs:
        if config in rows and not force:
            continue
        print(f"llm: {config}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            q = quantized(task, config)
        seconds = time.perf_counter() - t0
        scores = task.evaluate(q)
        rows[config] = {"config": config, **_rounded(scores), "quantize_s": round(seconds, 1),
                        "peak_mb_above_model": round(memory.above_start_mb), "quantized_layers": len(q.quantized_layers()),
                        "left_float": len(q.left_float), "bytes": fewbits.evaluate(q, task.model).size_bytes["quantized"]}
        save()


def sizes(task, rows: dict) -> None:
    """Each row's deployed bytes again from its recipe (prepare only: the size does not depend on
    the calibration or the rounding an algorithm chose)."""
    for config, row in rows.items():
        if config in CONFIGS:
            recipe_name, _, keep = CONFIGS[config]
            recipe = get_recipe(recipe_name)
            q = fewbits.prepare(task.model, replace(recipe, exclude=tuple(recipe.exclude) + keep))
            row["bytes"] = fewbits.evaluate(q, task.model).size_bytes["quantized"]


def _ort_quantize(fp32: Path, out: Path, algorithm: str) -> float:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t0 = time.perf_counter()
    config = HQQWeightOnlyQuantConfig(block_size=128, bits=4) if algorithm == "hqq" else None
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=128, is_symmetric=True, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return time.perf_counter() - t0


def deploy(task, rows: dict, workdir: Path) -> None:
    from fewbits.export.onnx import OnnxModel, _torch_onnx_bytes
    from fewbits.export.timing import interleaved_medians
    from fewbits.files import write_atomic
    from fewbits.tasks.causal_lm import perplexity

    example = task.calibration[0][:1]
    files, notes = {}, {}
    fp32 = workdir / "fp32.onnx"
    write_atomic(fp32, _torch_onnx_bytes(task.model, (example,), {}))
    files["fp32"] = fp32
    print(f"llm: exporting {DEPLOY}", file=sys.stderr, flush=True)
    q = quantized(task, DEPLOY)
    t0 = time.perf_counter()
    exported = fewbits.export_onnx(q, example, workdir / "fewbits.onnx", batches=[example])
    notes["fewbits " + DEPLOY] = {"export_s": round(time.perf_counter() - t0, 1),
                                  "verify": exported.verification.summary() if exported.verification else None,
                                  "kernels": exported.kernels.describe()}
    files["fewbits " + DEPLOY] = Path(exported.path)
    for algorithm in ("rtn", "hqq"):
        out = workdir / f"ort-{algorithm}.onnx"
        print(f"llm: ONNX Runtime MatMulNBitsQuantizer {algorithm}", file=sys.stderr, flush=True)
        notes[f"ORT MatMulNBits {algorithm}"] = {"quantize_s": round(_ort_quantize(fp32, out, algorithm), 1)}
        files[f"ORT MatMulNBits {algorithm}"] = out
    wordnet, docstrings = task.evaluate.corpora["wordnet"], task.evaluate.corpora["docstrings"]
    engines = {}
    for label, path in files.items():
        session = OnnxModel(path)
        engines[label] = {"bytes": path.stat().st_size, "perplexity": round(perplexity(session, wordnet, 1), 3),
                          "perplexity_docstrings": round(perplexity(session, docstrings, 1), 3), **notes.get(label, {})}
    for tokens in (256, 1):
        x = task.calibration[0][:1, :tokens]
        sessions = {label: OnnxModel(path) for label, path in files.items()}
        feeds = {label: s.feeds(x) for label, s in sessions.items()}
        print(f"llm: timing {tokens}-token forwards", file=sys.stderr, flush=True)
        timed = interleaved_medians({label: (lambda s=s, f=feeds[label]: s.run(f)) for label, s in sessions.items()},
                                    seconds_per_engine=6.0)
        for label in files:
            engines[label][f"ms_{tokens}_tokens"] = round(timed[label]["median_s"] * 1e3, 2)
    base = engines["fp32"]
    for e in engines.values():
        e["size_vs_fp32"] = round(e["bytes"] / base["bytes"], 3)
        for tokens in (256, 1):
            e[f"speedup_{tokens}_tokens"] = round(base[f"ms_{tokens}_tokens"] / e[f"ms_{tokens}_tokens"], 2)
    rows["deploy"] = engines


def tables(data: dict) -> None:
    rows = data.get("quality", {})
    if rows:
        fp32 = rows.get("fp32", {})
        print_table([{"config": r["config"], "ppl wordnet": r["perplexity"],
                      "vs fp32": f"{100 * (r['perplexity'] / fp32['perplexity'] - 1):+.1f}%" if fp32 else "",
                      "ppl docstrings": r["perplexity_docstrings"], "top-1 agree %": r["top1_agreement"],
                      "greedy agree %": r.get("generation_agreement"), "MB": round(r["bytes"] / 1e6, 1) if "bytes" in r else "",
                      "quantize s": r.get("quantize_s", ""), "peak MB": r.get("peak_mb_above_model", "")}
                     for r in rows.values()], "smollm2: quality (simulated in PyTorch)")
    if "deploy" in data:
        print_table([{"file": label, "MB": round(e["bytes"] / 1e6, 1), "size": e["size_vs_fp32"],
                      "ppl wordnet": e["perplexity"], "ppl docstrings": e["perplexity_docstrings"],
                      "256 tokens ms": e["ms_256_tokens"], "x": e["speedup_256_tokens"],
                      "1 token ms": e["ms_1_tokens"], "x ": e["speedup_1_tokens"]}
                     for label, e in data["deploy"].items()], "smollm2 on ONNX Runtime (2 threads, interleaved medians)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="quality,deploy")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--force", action="store_true", help="redo rows already in the JSON")
    p.add_argument("--tables", action="store_true", help="only reprint the tables from the JSON")
    args = p.parse_args()
    data = json.loads(Path(RESULTS).read_text()) if Path(RESULTS).is_file() else {}
    data.pop("environment", None)
    data.pop("schema_version", None)
    if args.tables:
        tables(data)
        return
    set_threads()
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    from fewbits.tasks import load_task

    task = load_task("smollm2")
    data.setdefault("quality", {})

    def save():
        save_json(data, RESULTS)

    sections = args.sections.split(",")
    if "quality" in sections:
        quality(task, configs, data["quality"], args.force, save)
    if "sizes" in sections:
        sizes(task, data["quality"])
        save()
    if "deploy" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            deploy(task, data, Path(tmp))
        save()
    tables(data)


if __name__ == "__main__":
    main()
