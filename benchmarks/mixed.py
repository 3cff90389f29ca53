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

``--sections fronts`` (its own JSON, ``benchmarks/results/mixed_fronts.json``, and the plot
``docs/img/mixed_fronts.png``): per task the measured-latency table (built fresh, batch 1),
predicted against measured whole-model latency in ONNX Runtime for every uniform format, the
points of the size and latency fronts and random mixes; each front point's and uniform format's
metric; and ``fewbits.auto`` (size and latency objectives, max drop 1.0 — MiniLM: mean
cosine ≥ 0.995) with its deployed latency against uniform ``w8a8``:

    .venv/bin/python benchmarks/mixed.py --sections fronts --tasks fashion-cnn,mobilenetv2-probe,minilm-wordnet

``--sections auto`` (``benchmarks/results/mixed_auto.json``): per task ``fewbits.auto`` (size,
max drop 1.0 — MiniLM: mean cosine ≥ 0.995 — GPTQ retries and front refinement on) against
every uniform format given the same algorithms (bias correction of convolutions, and the same
GPTQ retry for formats of 4 bits or fewer), and against what a user would pick instead where it
runs here: NNCF's data-aware mixed int4/int8 weight compression (``nncf.compress_weights``,
Hessian-trace criterion, at several int4 ratios) beside fewbits' exact choice at the same size
and on the same candidates (float, w8, w4-g128), both round-to-nearest; and AIMET's automatic
mixed precision (``choose_mixed_precision`` over w8a8 / w4a8 within the drop; needs
``make compare-install``) beside fewbits' exact choice at its size (float, w8a8, w4a8).
``--anchors-only`` runs the two anchors again into the saved JSON:

    .venv/bin/python benchmarks/mixed.py --sections auto --tasks fashion-cnn,mobilenetv2-probe,minilm-wordnet
    .venv/bin/python benchmarks/mixed.py --sections auto --anchors-only --tasks fashion-cnn,mobilenetv2-probe
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, environment, print_table, save_json, set_threads  # noqa: E402

import torch  # noqa: E402

import fewbits  # noqa: E402
from fewbits.decide import METHODS, layer_costs, sensitivity  # noqa: E402
from fewbits.decide.search import _choice, solve  # noqa: E402
from fewbits.tasks import load_task  # noqa: E402
from fewbits.wrap import as_call  # noqa: E402

RESULTS = "benchmarks/results/mixed.json"
FRONTS = "benchmarks/results/mixed_fronts.json"
FRONTS_PLOT = "docs/img/mixed_fronts.png"
AUTO = "benchmarks/results/mixed_auto.json"
NNCF_RATIOS = (0.25, 0.5, 0.75, 1.0)
# the drop auto is allowed, and the metric it reads, per task (MiniLM: the embedding's mean cosine to fp32)
DROPS = {"minilm-wordnet": ("cosine_mean", 0.005)}
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
        q = fewbits.calibrate(fewbits.prepare(task.model, _choice(formats, scores['loss'], costs).recipe()), task.calibration)
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
            q = fewbits.calibrate(fewbits.prepare(task.model, _choice(f, scores['loss'], costs).recipe()), task.calibration)
            row[f"{label}_metric"] = task.evaluate(q)[task.metric]
            row[f"{label}_bytes"] = costs.total(f, "bytes")
        uniform.append(row)
    print(f"  {name}: fewbits.auto max_drop 1.0", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    auto_metric, auto_drop = DROPS.get(name, (task.metric, 1.0))
    chosen = fewbits.auto(task.model, task.calibration, metric_fn=task.evaluate, metric=auto_metric, max_drop=auto_drop,
                          candidates=CANDIDATES, cache_dir=False)
    auto_row = {"seconds": round(time.perf_counter() - t0, 1), "metric": chosen.metric, "drop": round(chosen.drop, 3),
                "bytes": chosen.choice.costs["bytes"], "trials": len(chosen.trials)}
    correlation = {m: {"drop": _spearman([r["predicted"][m] for r in rows], [r["drop"] for r in rows]),
                       "output_error": _spearman([r["predicted"][m] for r in rows], [r["output_error"] for r in rows])}
                   for m in METHODS}
    return {"task": name, "metric": task.metric, "fp32": fp32, "layers": len(scores["sqnr"].scores), "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "candidates": list(CANDIDATES), "score_batches": score_batches, "seconds": seconds,
            "correlation": correlation, "configs": rows, "uniform_vs_mixed": uniform, "auto": auto_row}


def _measure(task, model, choice, example, calibration, reference_s: float) -> dict:
    """A configuration quantized (simulated metric) and deployed (ONNX Runtime latency, integer
    share); the prediction rescaled by the reference graph timed beside it (the machine's clock
    drifts between the table's reading and this measurement)."""
    from fewbits.decide.latency import model_latency

    q = fewbits.calibrate(fewbits.prepare(model, choice.recipe()), calibration)
    seconds, kernels, ref, empty = model_latency(q, example, reference=True)
    return {"metric": task.evaluate(q)[task.metric], "measured_s": seconds, "drift": (ref - empty) / reference_s,
            "integer_gemms": f"{kernels['integer']}/{kernels['integer'] + kernels['float']}"}


def bench_fronts(name: str, n_random: int, points: int, seed: int, workdir: Path) -> dict:
    """The latency table, predicted vs measured latency, the fronts against the uniform formats, auto."""
    from fewbits.decide import pareto_front
    from fewbits.decide.latency import _slice, latency_table
    from fewbits.decide.search import _choice
    from fewbits.decide.summary import uniform_choices

    print(f"  {name}: loading", file=sys.stderr, flush=True)
    task = load_task(name)
    fp32 = task.evaluate(task.model)[task.metric]
    scored = task.calibration[:2]
    sens = sensitivity(task.model, scored, CANDIDATES, "loss")
    print(f"  {name}: latency table", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    lat = latency_table(task.model, scored[0], CANDIDATES, path=workdir / f"latency-{name}.json")
    table_seconds = round(time.perf_counter() - t0, 1)
    costs = layer_costs(task.model, scored[0], CANDIDATES, latency=lat)
    example = _slice(scored[0], 1)
    configs = [(f"uniform {c}", "uniform", _choice(f, sens, costs)) for c, f in uniform_choices(sens, costs).items()]
    configs.append(("fp32", "uniform", _choice({l: "float" for l in sens.scores}, sens, costs)))
    for key in ("bytes", "latency_s"):
        for i, c in enumerate(pareto_front(sens, costs, key, points=points)[:-1]):  # the last point is fp32
            configs.append((f"{key} front {i}", f"{key} front", c))
    rng = random.Random(seed)
    for i in range(n_random):
        formats = {l: rng.choice([c for c, s in sens.scores[l].items() if s is not None and c in costs.table[l]])
                   for l in sens.scores}
        configs.append((f"random {i}", "random", _choice(formats, sens, costs)))
    rows = []
    for label, kind, choice in configs:
        print(f"  {name}: {label}", file=sys.stderr, flush=True)
        row = {"config": label, "kind": kind, "bytes": choice.costs["bytes"], "predicted_s": choice.costs["latency_s"],
               "damage": choice.damage, **_measure(task, task.model, choice, example, task.calibration, lat.reference_s)}
        row["error"] = round(row["predicted_s"] * row["drift"] / row["measured_s"] - 1, 4)
        rows.append(row)
    metric, drop = DROPS.get(name, (task.metric, 1.0))
    autos = {}
    for objective in ("size", "latency"):
        print(f"  {name}: fewbits.auto {objective}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = workdir / f"auto-{name}-{objective}"
        r = fewbits.auto(task.model, task.calibration, metric_fn=task.evaluate, metric=metric, max_drop=drop,
                         objective=objective, candidates=CANDIDATES, out=out, latency_path=workdir / f"latency-{name}.json")
        summary = json.loads((out / "report_data.json").read_text())["summary"]
        autos[objective] = {"seconds": round(time.perf_counter() - t0, 1), "metric": r.metric, "drop": round(r.drop, 5),
                            "bytes": r.choice.costs["bytes"], "latency_s": summary.get("latency_s"),
                            "predicted_s": summary.get("latency_predicted_s"), "trials": len(r.trials),
                            "task_metric": task.evaluate(fewbits.calibrate(fewbits.prepare(
                                task.model, fewbits.get_recipe(str(out / "recipe.json"))), task.calibration))[task.metric],
                            "integer_gemms": r.files.get("onnx_integer_gemms"), "report": str(out / "report.html")}
    return {"task": name, "metric": task.metric, "fp32": fp32, "auto_metric": metric, "max_drop": drop,
            "table_seconds": table_seconds, "layers": len(sens.scores), "configs": rows, "auto": autos,
            "machine": lat.machine}


def _metrics(task, recipe) -> tuple[dict, object]:
    q = fewbits.calibrate(fewbits.prepare(task.model, recipe), task.calibration)
    return task.evaluate(q), q


def _nncf_formats(model, compressed) -> dict:
    """NNCF's per-layer choice read off the compressed model: a uint8 weight of the layer's own
    shape is int8 per channel (``w8``), a packed one int4 in groups (``w4-g128``)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    formats = {}
    for n, p in compressed.state_dict().items():
        if n.endswith(".weight") and p.dtype == torch.uint8:
            formats[n[:-len(".weight")]] = "w8" if tuple(p.shape) == shapes.get(n) else "w4-g128"
    return formats


class _Wrapped(torch.nn.Module):
    """The model one level down: NNCF adds its hook storage as a child of the model it is given,
    and an ``nn.Sequential`` would then call it as a layer (fashion-cnn raised
    ``NotImplementedError: Module [HookStorage] is missing the required "forward" function``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # the name the tasks' metrics look through (as for a QuantizedModel)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _nncf_rows(task, metric: str, fp32: dict) -> list | str:
    """NNCF's mixed int4/int8 weight compression at each ratio beside fewbits' exact choice at the
    same size on the same candidates (both round-to-nearest), or why it could not run."""
    import copy

    try:
        import nncf
    except ImportError as err:
        return f"nncf not importable ({err}): pip install nncf"
    candidates = ("float", "w8", "w4-g128")
    sens = sensitivity(task.model, task.calibration[:4], candidates, "loss")
    costs = layer_costs(task.model, task.calibration[0], candidates)
    rows = []
    for ratio in NNCF_RATIOS:
        print(f"  {task.name}: nncf ratio {ratio}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            compressed = nncf.compress_weights(
                _Wrapped(copy.deepcopy(task.model)), mode=nncf.CompressWeightsMode.INT4_SYM, ratio=ratio, group_size=128,
                dataset=nncf.Dataset(task.calibration[:4]), subset_size=len(task.calibration[:4]),
                sensitivity_metric=nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
                # a layer whose input is no multiple of 128 stays int8, as it cannot take fewbits' w4-g128
                advanced_parameters=nncf.AdvancedCompressionParameters(
                    group_size_fallback_mode=nncf.GroupSizeFallbackMode.IGNORE))
        except Exception as err:  # noqa: BLE001 — the anchor's own failure is the result
            return f"nncf.compress_weights failed: {type(err).__name__}: {str(err)[:300]}"
        seconds = round(time.perf_counter() - t0, 1)
        chosen = _nncf_formats(task.model, compressed.model)
        formats = {l: chosen.get(l, "float") for l in sens.scores}
        formats = {l: (f if f in costs.table[l] else "float") for l, f in formats.items()}
        unknown = sorted(set(chosen) - set(sens.scores))
        budget = costs.total(formats, "bytes")
        ours = solve(sens, costs, {"bytes": budget})
        values, _ = _metrics(task, _choice(ours.formats, sens, costs).recipe())
        theirs = task.evaluate(compressed)
        rows.append({"ratio": ratio, "bytes": budget, "nncf_layers": len(chosen), "nncf_outside_ours": unknown,
                     "nncf_w4": sum(f == "w4-g128" for f in formats.values()), "nncf": theirs[metric],
                     "nncf_task_metric": theirs[task.metric], "nncf_seconds": seconds, "fewbits_bytes": ours.costs["bytes"],
                     "fewbits_w4": sum(f == "w4-g128" for f in ours.formats.values()), "fewbits": values[metric],
                     "fewbits_task_metric": values[task.metric]})
    return rows


def _aimet_amp_rows(task, metric: str, drop: float) -> dict | str:
    """AIMET's automatic mixed precision (``choose_mixed_precision``: per-layer sensitivity, then
    a binary search of its Pareto list) over w8a8 / w4a8 within the drop, beside fewbits' exact
    choice at the same size on the same candidates; or why it could not run."""
    import copy
    import importlib.util
    import os

    if importlib.util.find_spec("aimet_torch") is None:
        return "aimet-torch not installed (make compare-install)"
    if not isinstance(task.calibration[0], torch.Tensor):
        return "not run: AIMET's QuantSim is given one input tensor here (this task's model takes keyword inputs)"
    from ptq_algorithms import aimet_setup

    workdir, config = aimet_setup(task)
    from aimet_common.defs import QuantizationDataType, QuantScheme
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import CallbackFunc
    from aimet_torch.mixed_precision import choose_mixed_precision
    from aimet_torch.quantsim import QuantizationSimModel

    dummy = task.calibration[0][:1]
    model = copy.deepcopy(task.model).eval()
    fold_all_batch_norms(model, tuple(dummy.shape))

    def forward(m, _=None):
        with torch.no_grad():
            for x in task.calibration:
                m(x)

    t0 = time.perf_counter()
    sim = QuantizationSimModel(model, dummy, quant_scheme=QuantScheme.post_training_tf, default_param_bw=8,
                               default_output_bw=8, config_file=config)
    sim.compute_encodings(forward, None)
    evaluate = lambda m, _=None: float(task.evaluate(m)[metric])  # noqa: E731 — AIMET's callback shape
    candidates = [((8, QuantizationDataType.int), (8, QuantizationDataType.int)),
                  ((8, QuantizationDataType.int), (4, QuantizationDataType.int))]
    evaluate, forward = CallbackFunc(evaluate), CallbackFunc(forward)
    choose_mixed_precision(sim, dummy, candidates, evaluate, evaluate, drop, os.path.join(workdir, "amp"), True,
                           forward)
    seconds = round(time.perf_counter() - t0, 1)
    values = task.evaluate(sim.model)
    bits = {}
    for name, m in sim.model.named_modules():
        quantizers = getattr(m, "param_quantizers", None)
        q = quantizers["weight"] if quantizers is not None and "weight" in quantizers else None
        if q is not None:
            bits[name] = int(q.bitwidth)
    candidates_ = ("float", "w8a8", "w4a8")
    sens = sensitivity(task.model, task.calibration[:4], candidates_, "loss")
    costs = layer_costs(task.model, task.calibration[0], candidates_)
    formats = {l: {8: "w8a8", 4: "w4a8"}.get(bits.get(l), "float") for l in sens.scores}
    budget = costs.total(formats, "bytes")
    ours = solve(sens, costs, {"bytes": budget})
    mine, _ = _metrics(task, _choice(ours.formats, sens, costs).recipe())
    return {"bytes": budget, "aimet_w4": sum(f == "w4a8" for f in formats.values()), "aimet_layers": len(bits),
            "aimet_outside_ours": sorted(set(bits) - set(sens.scores)), "aimet": values[metric],
            "aimet_task_metric": values[task.metric], "aimet_seconds": seconds, "fewbits_bytes": ours.costs["bytes"],
            "fewbits_w4": sum(f == "w4a8" for f in ours.formats.values()), "fewbits": mine[metric],
            "fewbits_task_metric": mine[task.metric]}


def _load_before_aimet(names: list) -> dict:
    """Every task loaded first: AIMET's torchvision stand-in, once in place, breaks the import of
    transformers' BERT, so MiniLM must be loaded before any AIMET anchor runs."""
    return {n: load_task(n) for n in names}


def bench_auto(task, workdir: Path) -> dict:
    """``fewbits.auto`` against uniform formats with the same algorithms, and the two anchors."""
    from fewbits.decide.auto import low_bit_layers
    from fewbits.decide.summary import uniform_choices
    from fewbits.recipe import CONV_BIAS_CORRECTION
    from fewbits.steps import GPTQ

    name = task.name
    metric, drop = DROPS.get(name, (task.metric, 1.0))
    fp32 = task.evaluate(task.model)
    print(f"  {name}: fewbits.auto", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = workdir / f"auto-{name}"
    r = fewbits.auto(task.model, task.calibration, metric_fn=task.evaluate, metric=metric, max_drop=drop,
                     candidates=CANDIDATES, out=out, report=False)
    seconds = round(time.perf_counter() - t0, 1)
    values, _ = _metrics(task, fewbits.get_recipe(str(out / "recipe.json")))
    counts: dict = {}
    for f in r.choice.formats.values():
        counts[f] = counts.get(f, 0) + 1
    auto_row = {"bytes": r.choice.costs["bytes"], "metric": values[metric], "task_metric": values[task.metric],
                "drop": round(fp32[metric] - values[metric], 5), "algorithms": r.algorithms, "formats": counts,
                "trials": len(r.trials), "seconds": seconds, "integer_gemms": r.files.get("onnx_integer_gemms")}
    sens = sensitivity(task.model, task.calibration[:4], CANDIDATES, "loss")  # auto's scores, from the cache
    costs = layer_costs(task.model, task.calibration[0], CANDIDATES)
    uniform = []
    for cand, formats in uniform_choices(sens, costs).items():
        base = _choice(formats, sens, costs).recipe(f"uniform-{cand}")
        low = low_bit_layers(formats)
        row = {"uniform": cand, "bytes": costs.total(formats, "bytes")}
        for label, steps in (("plain", (CONV_BIAS_CORRECTION,)),
                             ("gptq", (GPTQ(layers=low), CONV_BIAS_CORRECTION) if low else None)):
            if steps is None:
                continue
            print(f"  {name}: uniform {cand} ({label})", file=sys.stderr, flush=True)
            values, _ = _metrics(task, dataclasses.replace(base, steps=steps))
            row[label] = {"metric": values[metric], "task_metric": values[task.metric],
                          "drop": round(fp32[metric] - values[metric], 5)}
        best = min((row[k] for k in ("plain", "gptq") if k in row), key=lambda v: v["drop"])
        row["within"] = best["drop"] <= drop
        uniform.append(row)
    within = [u for u in uniform if u["within"]]
    smallest = min(within, key=lambda u: u["bytes"]) if within else None
    return {"task": name, "metric": metric, "task_metric": task.metric, "max_drop": drop, "fp32": fp32[metric],
            "fp32_task_metric": fp32[task.metric], "auto": auto_row, "uniform": uniform,
            "smallest_uniform_within": smallest and smallest["uniform"],
            "auto_smaller": bool(smallest is None or auto_row["bytes"] < smallest["bytes"]),
            "auto_over_smallest_uniform": smallest and round(auto_row["bytes"] / smallest["bytes"], 4),
            **anchors(task, metric, drop, fp32)}


def anchors(task, metric: str, drop: float, fp32: dict) -> dict:
    """What a user would pick instead: NNCF's and AIMET's mixed precision on this task."""
    return {"nncf": _nncf_rows(task, metric, fp32), "aimet": _aimet_amp_rows(task, metric, drop)}


def tables_auto(data: dict) -> None:
    for t in data["tasks"]:
        a = t["auto"]
        rows = [{"config": "auto (" + ", ".join(f"{n} {c}" for c, n in a["formats"].items()) + ")",
                 "MB": round(a["bytes"] / 1e6, 4), t["metric"]: round(a["metric"], 4), "drop": a["drop"],
                 t["task_metric"]: a["task_metric"], "algorithms": ", ".join(a["algorithms"]) or "bc",
                 "within": a["drop"] <= t["max_drop"]}]
        for u in t["uniform"]:
            for k in ("plain", "gptq"):
                if k in u:
                    rows.append({"config": f"uniform {u['uniform']}", "MB": round(u["bytes"] / 1e6, 4),
                                 t["metric"]: round(u[k]["metric"], 4), "drop": u[k]["drop"],
                                 t["task_metric"]: u[k]["task_metric"], "algorithms": "bc" if k == "plain" else "gptq, bc",
                                 "within": u[k]["drop"] <= t["max_drop"]})
        print_table(rows, f"{t['task']} (fp32 {t['metric']} {round(t['fp32'], 4)}, {t['task_metric']} "
                          f"{t['fp32_task_metric']}): auto {a['trials']} trials, {a['seconds']} s; smallest uniform "
                          f"within {t['max_drop']}: {t['smallest_uniform_within']}; auto smaller: {t['auto_smaller']} "
                          f"({t['auto_over_smallest_uniform']}× its size)")
        if isinstance(t["nncf"], str):
            print(f"  NNCF: {t['nncf']}")
        else:
            print_table([{"nncf ratio": n["ratio"], "MB": round(n["bytes"] / 1e6, 4), "nncf w4 layers": n["nncf_w4"],
                          f"nncf {t['metric']}": round(n["nncf"], 4), f"nncf {t['task_metric']}": n["nncf_task_metric"],
                          "fewbits MB": round(n["fewbits_bytes"] / 1e6, 4), "fewbits w4 layers": n["fewbits_w4"],
                          f"fewbits {t['metric']}": round(n["fewbits"], 4),
                          f"fewbits {t['task_metric']}": n["fewbits_task_metric"]} for n in t["nncf"]],
                        f"{t['task']}: NNCF mixed int4/int8 (hessian criterion) vs fewbits' exact choice at the same size")
        am = t.get("aimet")
        if isinstance(am, str) or am is None:
            print(f"  AIMET: {am or 'not run'}")
        else:
            print_table([{"AIMET AMP MB": round(am["bytes"] / 1e6, 4), "AIMET w4a8 layers": f"{am['aimet_w4']}/{am['aimet_layers']}",
                          f"AIMET {t['metric']}": round(am["aimet"], 4),
                          "AIMET within": round(t["fp32"] - am["aimet"], 5) <= t["max_drop"],
                          "AIMET seconds": am["aimet_seconds"],
                          "fewbits MB": round(am["fewbits_bytes"] / 1e6, 4), "fewbits w4a8 layers": am["fewbits_w4"],
                          f"fewbits {t['metric']}": round(am["fewbits"], 4)}],
                        f"{t['task']}: AIMET automatic mixed precision (w8a8/w4a8, drop {t['max_drop']}) vs fewbits' "
                        "exact choice at the same size")


def plot_fronts(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.8 * len(tasks)), squeeze=False)
    for (ax_size, ax_lat), t in zip(axes, tasks):
        for ax, x, front, unit in ((ax_size, "bytes", "bytes front", 1e-6), (ax_lat, "measured_s", "latency_s front", 1e3)):
            pts = sorted((r for r in t["configs"] if r["kind"] == front), key=lambda r: r[x])
            ax.plot([r[x] * unit for r in pts], [r["metric"] for r in pts], "o-", label="mixed (front)")
            for r in t["configs"]:
                if r["kind"] == "uniform":
                    ax.plot(r[x] * unit, r["metric"], "s")
                    ax.annotate(r["config"].replace("uniform ", ""), (r[x] * unit, r["metric"]), fontsize=8,
                                xytext=(3, 3), textcoords="offset points")
            for objective, a in t["auto"].items():
                value = a["bytes"] if x == "bytes" else a["latency_s"]
                if value is not None:
                    ax.plot(value * unit, a["task_metric"], "*", ms=14, label=f"auto ({objective})")
            ax.set_xlabel("MB" if x == "bytes" else "measured latency, batch 1 (ms)")
            ax.set_ylabel(t["metric"])
            ax.set_title(f"{t['task']}: {'size' if x == 'bytes' else 'latency'}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tables_fronts(data: dict) -> None:
    for t in data["tasks"]:
        print_table([{"config": r["config"], "MB": round(r["bytes"] / 1e6, 4), t["metric"]: round(r["metric"], 3),
                      "predicted ms": round(r["predicted_s"] * 1e3, 3), "measured ms": round(r["measured_s"] * 1e3, 3),
                      "error": f"{100 * r['error']:+.1f}%", "clock drift": round(r["drift"], 3),
                      "integer GEMMs": r["integer_gemms"]} for r in t["configs"]],
                    f"{t['task']} (fp32 {t['fp32']}): latency table built in {t['table_seconds']} s")
        errors = [abs(r["error"]) for r in t["configs"]]
        print(f"  largest |error| {100 * max(errors):.1f}%, within 15%: {sum(e <= 0.15 for e in errors)}/{len(errors)}")
        print_table([{"auto": k, t["auto_metric"]: round(a["metric"], 4), "drop": a["drop"], t["metric"]: a["task_metric"],
                      "MB": round(a["bytes"] / 1e6, 4), "deployed ms": None if a["latency_s"] is None else
                      round(a["latency_s"] * 1e3, 3), "integer GEMMs": a["integer_gemms"], "trials": a["trials"],
                      "seconds": a["seconds"]} for k, a in t["auto"].items()])


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
    p.add_argument("--sections", default="scores", choices=["scores", "fronts", "auto"],
                   help="scores: rank correlation and equal-size comparison; fronts: latency table, fronts, auto; "
                        "auto: auto against uniform formats with the same algorithms, and NNCF")
    p.add_argument("--anchors-only", action="store_true",
                   help="auto: run only NNCF and AIMET again and put them into the saved JSON")
    p.add_argument("--random", type=int, default=4, help="fronts: random mixes checked for latency")
    p.add_argument("--points", type=int, default=6, help="fronts: points per Pareto front")
    args = p.parse_args()
    if args.tables:
        if args.sections == "auto":
            tables_auto(json.loads(Path(AUTO).read_text()))
        elif args.sections == "fronts":
            tables_fronts(json.loads(Path(FRONTS).read_text()))
        else:
            tables(json.loads(Path(RESULTS).read_text()))
        return
    set_threads()
    if args.sections == "auto" and args.anchors_only:  # the anchors again, into the saved run
        data = json.loads(Path(AUTO).read_text())
        loaded = _load_before_aimet(args.tasks.split(","))
        for t in data["tasks"]:
            if t["task"] in loaded:
                t.update(anchors(loaded[t["task"]], t["metric"], t["max_drop"],
                                 {t["metric"]: t["fp32"], t["task_metric"]: t["fp32_task_metric"]}))
                save_json(data, AUTO)
        tables_auto(data)
        return
    if args.sections == "auto":
        import tempfile

        start, tasks = time.perf_counter(), []
        with tempfile.TemporaryDirectory() as tmp:
            for n, task in _load_before_aimet(args.tasks.split(",")).items():  # saved after each task
                tasks.append(bench_auto(task, Path(tmp)))
                data = {"environment": environment(), "tasks": tasks, "seconds": round(time.perf_counter() - start, 1)}
                save_json(data, AUTO)
        tables_auto(data)
        print(f"results: {AUTO}")
        return
    if args.sections == "fronts":
        import tempfile

        start, tasks = time.perf_counter(), []
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.tasks.split(","):  # saved after each task: a late failure keeps the earlier ones
                tasks.append(bench_fronts(n, args.random, args.points, args.seed, Path(tmp)))
                data = {"environment": environment(), "tasks": tasks, "seconds": round(time.perf_counter() - start, 1)}
                save_json(data, FRONTS)
        plot_fronts(data, FRONTS_PLOT)
        tables_fronts(data)
        print(f"results: {FRONTS}, {FRONTS_PLOT}")
        return
    start = time.perf_counter()
    tasks = [bench(n, args.configs, args.score_batches, args.seed) for n in args.tasks.split(",")]
    if Path(RESULTS).is_file():  # the other tasks of an earlier run stay (each row records its own run)
        kept = [t for t in json.loads(Path(RESULTS).read_text())["tasks"] if t["task"] not in {x["task"] for x in tasks}]
        tasks = kept + tasks
    data = {"tasks": tasks, "seconds": round(time.perf_counter() - start, 1)}
    save_json(data, RESULTS)
    tables({"environment": environment(), **data})
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
