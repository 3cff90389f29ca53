"""Post-training algorithms on the real tasks, same data, one run.

Sections (``--sections``, each re-runnable alone: the JSON keeps the other sections' rows):

* ``dfq`` — the data-free quantization experiment (Nagel et al. 2019, table 1 / 6) on
  ``mobilenetv2-probe``: 8-bit weights with ONE scale per tensor, 8-bit activations. Naive
  per-tensor quantization, cross-layer equalization (CLE, with high-bias absorption), CLE + analytic
  (data-free) bias correction, CLE + empirical bias correction, against per-channel weight scales
  and fp32. MobileNetV2's depthwise layers mix channels whose weight ranges differ by orders of
  magnitude: one scale per tensor rounds the small channels to zero, which CLE fixes by moving
  range between consecutive layers.
* ``rounding`` — weights at 4 bits on ``mobilenetv2-probe`` (w4a8 and weight-only w4) and at 3 and
  2 bits on ``fashion-cnn`` (with 8-bit activations), per-channel: nearest vs stochastic vs bias
  correction vs AdaRound (``--adaround-iterations``, default 1,000 per layer; the paper's 10,000
  take ~50 min on MobileNetV2 here) vs AdaRound + bias correction.
* ``compare`` — the same recipes through Qualcomm AIMET and AMD's Brevitas (``pip install
  ".[compare]"``; each skipped with a note when it is not installed), timed in the same run:
  AIMET's QuantSim with nearest rounding and with its AdaRound at the same number of iterations;
  Brevitas' PTQ flow with nearest rounding, its GPTQ and its learned rounding (AdaRound's
  parameterisation) at the same iterations; fewbits nearest, GPTQ, and AdaRound on the min-max
  and on the MSE weight range. AIMET quantizes layer outputs and the model input where fewbits
  and Brevitas quantize layer inputs: the same tensors up to where the ReLUs sit.
* ``compare-dfq`` — the ``dfq`` experiment through AIMET (its ``equalize_model``: BatchNorm
  folding, CLE, high-bias absorption; QuantSim per-tensor) and Brevitas (its graph
  equalization and bias correction, per-tensor), beside fewbits' nearest / CLE / CLE + bias
  correction, in one run.
* ``grids`` — the weight range fit under nearest rounding on ``fashion-cnn`` at 3 and 2 bits:
  min-max (PyTorch's symmetric convention), MSE, narrow range.
* ``llm`` — ``minilm-wordnet``: 4-bit weight-only with groups of 128 (``w4-g128``): nearest vs GPTQ vs
  AWQ vs AWQ + GPTQ; and w8a8 with and without SmoothQuant.

Reports the task's metrics and the wall time of each algorithm step (fewbits' simulated model;
``fewbits.convert`` / ``export_onnx`` deploy the same numbers, see docs/deploy.md).

    .venv/bin/python benchmarks/ptq_algorithms.py [--sections dfq,rounding,compare,compare-dfq,grids,llm] [--small]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_json, set_threads  # noqa: E402

import fewbits  # noqa: E402
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe, get_recipe  # noqa: E402
from fewbits.spec import PerChannel, PerTensor, QuantSpec  # noqa: E402
from fewbits.steps import AWQ, GPTQ, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant, StochasticRounding  # noqa: E402,E501
from fewbits.tasks import load_task  # noqa: E402

RESULTS = "benchmarks/results/ptq_algorithms.json"
_ACT = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")


def w8a8(granularity, steps=(), name="") -> Recipe:
    return weights_at(8, granularity, steps, name)


def weights_at(bits: int, granularity=PerChannel(0), steps=(), name="", activations=True) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=granularity)),
                        input=_ACT if activations else None)
    base = get_recipe("w8a8")
    return Recipe(name or f"w{bits}{'a8' if activations else ''}", (("Conv2d", layer), ("Linear", layer)), base.by_name,
                  steps=steps)


def run(task, label: str, recipe: Recipe, section: str, extra: dict) -> dict:
    print(f"  {section}: {task.name} {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    q = fewbits.calibrate(fewbits.prepare(task.model, recipe), task.calibration)
    seconds = time.perf_counter() - start
    steps = {r.step["name"]: round(r.seconds, 2) for r in q.applied}
    return {"section": section, "task": task.name, "method": label, **extra, **task.evaluate(q), "seconds": seconds,
            "steps": steps}


def dfq_rows(small: bool, _iterations: int) -> list[dict]:
    task = load_task("mobilenetv2-probe", small=small)
    rows = [{"section": "dfq", "task": task.name, "method": "fp32", "weights": "fp32", **task.evaluate(task.model),
             "seconds": 0.0}]
    cases = [("nearest", w8a8(PerTensor()), "per-tensor"),
             ("CLE", w8a8(PerTensor(), (CrossLayerEqualization(),)), "per-tensor"),
             ("CLE + analytic bias correction (data-free DFQ)",
              w8a8(PerTensor(), (CrossLayerEqualization(), BiasCorrection(mode="analytic"))), "per-tensor"),
             ("CLE + bias correction", w8a8(PerTensor(), (CrossLayerEqualization(), BiasCorrection())), "per-tensor"),
             ("nearest", w8a8(PerChannel(0)), "per-channel"),
             ("bias correction", w8a8(PerChannel(0), (BiasCorrection(),)), "per-channel")]
    return rows + [run(task, label, recipe, "dfq", {"weights": w}) for label, recipe, w in cases]


def rounding_rows(small: bool, iterations: int) -> list[dict]:
    ada = AdaRound(iterations=iterations)
    methods = [("nearest", ()), ("stochastic", (StochasticRounding(),)), ("bias correction", (BiasCorrection(),)),
               (f"AdaRound ({iterations} it.)", (ada,)), (f"AdaRound ({iterations} it.) + bias correction", (ada, BiasCorrection()))]
    rows = []
    for name, configs in (("mobilenetv2-probe", [(4, True), (4, False)]), ("fashion-cnn", [(3, True), (2, True)])):
        task = load_task(name, small=small)
        rows.append({"section": "rounding", "task": name, "method": "fp32", "weights": "fp32",
                     **task.evaluate(task.model), "seconds": 0.0})
        for bits, acts in configs:
            for label, steps in methods:
                if not acts and "bias correction" in label:
                    continue  # bias correction needs a calibrated input grid: w4a8 only
                recipe = weights_at(bits, steps=steps, activations=acts)
                rows.append(run(task, label, recipe, "rounding", {"weights": recipe.name}))
    return rows


def _stub_torchvision() -> None:
    """AIMET imports names from torchvision, whose PyPI build fails to import beside torch 2.13:
    stand in a module whose every attribute is a placeholder (AIMET's paths used here need none)."""
    import importlib.machinery
    import types

    class Placeholder(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {})
            setattr(self, name, value)
            return value

    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.models",
                 "torchvision.ops", "torchvision.io"):
        module = Placeholder(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        if "." in name:
            setattr(sys.modules["torchvision"], name.split(".")[1], module)


_AIMET_CONFIG = {"defaults": {"ops": {"is_output_quantized": "True"},
                              "params": {"is_quantized": "True", "is_symmetric": "True"},
                              "per_channel_quantization": "True"},
                 "params": {"bias": {"is_quantized": "False"}}, "op_type": {}, "supergroups": [],
                 "model_input": {"is_input_quantized": "True"}, "model_output": {}}


SLOW_BASELINES = False  # --slow-baselines
_COMPARE_CASES = (("fashion-cnn", 3), ("fashion-cnn", 2), ("mobilenetv2-probe", 4))


def compare_rows(small: bool, iterations: int) -> list[dict]:
    import importlib.util

    have = {lib: importlib.util.find_spec(mod) is not None for lib, mod in (("AIMET", "aimet_torch"), ("Brevitas", "brevitas"))}
    if not any(have.values()):
        print("  compare: neither aimet-torch nor brevitas is installed (pip install '.[compare]'): section skipped",
              file=sys.stderr)
        return [{"section": "compare", "task": "-", "method": "skipped: aimet-torch, brevitas not installed",
                 "weights": "", "seconds": 0.0}]
    rows = [{"section": "compare", "task": "-", "method": f"skipped: {lib} not installed", "weights": "", "seconds": 0.0}
            for lib, ok in have.items() if not ok]
    for name, bits in _COMPARE_CASES:
        task = load_task(name, small=small)
        if have["AIMET"]:
            rows += _aimet_rows(task, bits, iterations)
        if have["Brevitas"]:
            rows += _brevitas_rows(task, bits, iterations, SLOW_BASELINES)
        extra = {"weights": f"w{bits}a8"}
        mse = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=PerChannel(0)), "mse"), input=_ACT)
        rows += [run(task, "fewbits nearest", weights_at(bits), "compare", extra),
                 run(task, "fewbits GPTQ", weights_at(bits, steps=(GPTQ(),)), "compare", extra),
                 run(task, f"fewbits AdaRound ({iterations} it.)",
                     weights_at(bits, steps=(AdaRound(iterations=iterations),)), "compare", extra),
                 run(task, f"fewbits AdaRound ({iterations} it.), MSE weight range",
                     Recipe(f"w{bits}a8", (("Conv2d", mse), ("Linear", mse)), get_recipe("w8a8").by_name,
                            steps=(AdaRound(iterations=iterations),)), "compare", extra)]
    return rows


def aimet_setup(task, per_channel: bool = True) -> tuple[str, str]:
    """AIMET made importable (:func:`_stub_torchvision`), a work directory and the QuantSim
    config file (``_AIMET_CONFIG``, per-channel or per-tensor weights) in it: ``(workdir, config)``."""
    import json
    import os
    import tempfile

    _stub_torchvision()
    workdir = tempfile.mkdtemp(prefix=f"fewbits-aimet-{task.name}-")
    config = os.path.join(workdir, "config.json")
    with open(config, "w") as f:
        json.dump({**_AIMET_CONFIG, "defaults": {**_AIMET_CONFIG["defaults"],
                                                 "per_channel_quantization": str(per_channel)}}, f)
    return workdir, config


def _aimet_rows(task, bits: int, iterations: int) -> list[dict]:
    """AIMET's QuantSim with nearest rounding and with its AdaRound at ``iterations``."""
    import copy
    import os

    import torch

    workdir, config = aimet_setup(task)
    from aimet_common.defs import QuantScheme
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.quantsim import QuantizationSimModel

    dummy = task.calibration[0][:1]

    def forward(model, _):
        with torch.no_grad():
            for x in task.calibration:
                model(x)

    rows = []
    for ada in (False, True):
        label = f"AIMET AdaRound ({iterations} it.)" if ada else "AIMET nearest"
        print(f"  compare: {task.name} w{bits}a8 {label} ...", file=sys.stderr, flush=True)
        model = copy.deepcopy(task.model).eval()
        fold_all_batch_norms(model, tuple(dummy.shape))
        start = time.perf_counter()
        if ada:
            params = AdaroundParameters(data_loader=[(x, None) for x in task.calibration],
                                        num_batches=len(task.calibration), default_num_iterations=iterations)
            model = Adaround.apply_adaround(model, dummy, params, path=workdir, filename_prefix="ada",
                                            default_param_bw=bits, default_quant_scheme=QuantScheme.post_training_tf,
                                            default_config_file=config)
        ada_seconds = time.perf_counter() - start
        sim = QuantizationSimModel(model, dummy, quant_scheme=QuantScheme.post_training_tf, default_param_bw=bits,
                                   default_output_bw=8, config_file=config)
        if ada:
            sim.set_and_freeze_param_encodings(encoding_path=os.path.join(workdir, "ada.encodings"))
        sim.compute_encodings(forward, None)
        seconds = time.perf_counter() - start
        rows.append({"section": "compare", "task": task.name, "method": label, "weights": f"w{bits}a8",
                     **task.evaluate(sim.model), "seconds": seconds,
                     "steps": {"adaround": round(ada_seconds, 2)} if ada else {}})
    return rows


class _LastLinearFeatures:
    """A traced model (Brevitas' GraphModule) whose classifier is no longer one submodule: the
    probe's features are the input of its last linear layer."""

    def __init__(self, model):
        self.model = model

    def features_and_logits(self, x, batch: int = 100):
        import torch

        last = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        feats = []
        hook = last.register_forward_pre_hook(lambda _m, a: feats.append(getattr(a[0], "value", a[0]).detach()))
        try:
            with torch.no_grad():
                logits = torch.cat([self.model(x[i:i + batch]) for i in range(0, len(x), batch)])
        finally:
            hook.remove()
        return torch.cat(feats), logits


def _brevitas_rows(task, bits: int, iterations: int, slow: bool = False) -> list[dict]:
    """Brevitas' PTQ flow (its ImageNet example's ``quantize_model``, layerwise: weights and layer
    inputs, like fewbits): per-channel symmetric weights from their max, uint8 asymmetric inputs at
    its default 99.999th percentile; nearest, its GPTQ, and its learned rounding (AdaRound's
    rectified sigmoid and regulariser, layer by layer) at ``iterations``, batch 32."""
    import copy
    from argparse import Namespace

    import torch
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import apply_gptq, calibrate, quantize_model

    loader = [(x, None) for x in task.calibration]
    rows = []
    labels = ["Brevitas nearest", "Brevitas GPTQ", f"Brevitas learned round ({iterations} it.)"]
    if task.name == "mobilenetv2-probe" and not slow:
        # measured on 2 cores: 44 of its 53 layers in 55 min (the last ones at 2 it/s), where
        # fewbits' AdaRound takes ~5 min for all; --slow-baselines runs it anyway
        labels.pop()
        rows.append({"section": "compare", "task": task.name, "method": "Brevitas learned round: not run (> 1 h here; "
                     "--slow-baselines)", "weights": f"w{bits}a8", "seconds": 0.0})
    for label in labels:
        print(f"  compare: {task.name} w{bits}a8 {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        model = preprocess_for_quantize(copy.deepcopy(task.model).eval(), relu6_to_relu=False)  # folds BatchNorm
        model = quantize_model(model, backend="layerwise", weight_bit_width=bits, act_bit_width=8, bias_bit_width=None,
                               weight_quant_granularity="per_channel", act_quant_percentile=99.999,
                               act_quant_type="asym", scale_factor_type="float_scale", quant_format="int",
                               layerwise_first_last_bit_width=bits)
        calibrate(loader, model)
        with torch.no_grad():
            model(task.calibration[0])  # its weight quantizers initialise on the first quantized pass
        algo = time.perf_counter()
        if "GPTQ" in label:
            apply_gptq(loader, model, use_quant_activations=True)
        elif "learned" in label:
            from brevitas_examples.imagenet_classification.ptq.learned_round_utils import apply_learned_round

            apply_learned_round(model, loader, Namespace(
                learned_round="hard_sigmoid", learned_round_loss="regularised_mse", learned_round_mode="layerwise",
                learned_round_iters=iterations, learned_round_lr=1e-3, learned_round_batch_size=32,
                learned_round_lr_scheduler=None))
        algo = time.perf_counter() - algo
        view = _LastLinearFeatures(model) if task.name == "mobilenetv2-probe" else model
        with torch.no_grad():
            metrics = task.evaluate(view)
        rows.append({"section": "compare", "task": task.name, "method": label, "weights": f"w{bits}a8", **metrics,
                     "seconds": time.perf_counter() - start,
                     "steps": {"gptq" if "GPTQ" in label else "learned round": round(algo, 2)} if "nearest" not in label
                     else {}})
    return rows


def compare_dfq_rows(small: bool, _iterations: int) -> list[dict]:
    """The DFQ experiment (per-tensor w8a8 MobileNetV2) through AIMET's CLE and Brevitas'
    equalization and bias correction, beside fewbits', in one run."""
    import copy
    import importlib.util

    import torch

    task = load_task("mobilenetv2-probe", small=small)
    rows = []
    if importlib.util.find_spec("aimet_torch") is not None:
        _, config = aimet_setup(task, per_channel=False)
        from aimet_common.defs import QuantScheme
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.quantsim import QuantizationSimModel

        dummy = task.calibration[0][:1]
        for label in ("AIMET nearest", "AIMET CLE"):
            print(f"  compare-dfq: {label} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            model = copy.deepcopy(task.model).eval()
            if label == "AIMET CLE":
                equalize_model(model, tuple(dummy.shape))  # folds BatchNorm, equalizes, absorbs high biases
            else:
                fold_all_batch_norms(model, tuple(dummy.shape))
            sim = QuantizationSimModel(model, dummy, quant_scheme=QuantScheme.post_training_tf, default_param_bw=8,
                                       default_output_bw=8, config_file=config)
            sim.compute_encodings(lambda m, _: [m(x) for x in task.calibration], None)
            rows.append({"section": "compare-dfq", "task": task.name, "method": label, "weights": "per-tensor",
                         **task.evaluate(sim.model), "seconds": time.perf_counter() - start})
    else:
        rows.append({"section": "compare-dfq", "task": "-", "method": "skipped: AIMET not installed", "weights": "",
                     "seconds": 0.0})
    if importlib.util.find_spec("brevitas") is not None:
        from brevitas.graph.quantize import preprocess_for_quantize
        from brevitas_examples.imagenet_classification.ptq.ptq_common import (apply_bias_correction, calibrate,
                                                                               quantize_model)

        loader = [(x, None) for x in task.calibration]
        for label, equalize, bc in (("Brevitas nearest", 0, False), ("Brevitas equalization", 20, False),
                                    ("Brevitas equalization + bias correction", 20, True)):
            print(f"  compare-dfq: {label} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            model = preprocess_for_quantize(copy.deepcopy(task.model).eval(), relu6_to_relu=equalize > 0,
                                            equalize_iters=equalize, equalize_merge_bias=True)
            model = quantize_model(model, backend="layerwise", weight_bit_width=8, act_bit_width=8,
                                   bias_bit_width=None, weight_quant_granularity="per_tensor",
                                   act_quant_percentile=99.999, act_quant_type="asym", scale_factor_type="float_scale",
                                   quant_format="int", layerwise_first_last_bit_width=8)
            calibrate(loader, model)
            if bc:
                apply_bias_correction(loader, model)
            with torch.no_grad():
                metrics = task.evaluate(_LastLinearFeatures(model))
            rows.append({"section": "compare-dfq", "task": task.name, "method": label, "weights": "per-tensor",
                         **metrics, "seconds": time.perf_counter() - start})
    else:
        rows.append({"section": "compare-dfq", "task": "-", "method": "skipped: Brevitas not installed", "weights": "",
                     "seconds": 0.0})
    for label, recipe in (("fewbits nearest", w8a8(PerTensor())), ("fewbits CLE", w8a8(PerTensor(), (CrossLayerEqualization(),))),
                          ("fewbits CLE + bias correction",
                           w8a8(PerTensor(), (CrossLayerEqualization(), BiasCorrection())))):
        rows.append(run(task, label, recipe, "compare-dfq", {"weights": "per-tensor"}))
    return rows


def grid_rows(small: bool, _iterations: int) -> list[dict]:
    task = load_task("fashion-cnn", small=small)
    rows = []
    for bits in (3, 2):
        for label, spec, method in (
                ("min-max", QuantSpec(bits=bits, granularity=PerChannel(0)), "minmax"),
                ("mse", QuantSpec(bits=bits, granularity=PerChannel(0)), "mse"),
                ("narrow range, min-max", QuantSpec(bits=bits, granularity=PerChannel(0), narrow_range=True), "minmax")):
            layer = LayerRecipe(weight=TensorRecipe(spec, method), input=_ACT)
            recipe = Recipe(f"w{bits}a8", (("Conv2d", layer), ("Linear", layer)), get_recipe("w8a8").by_name)
            rows.append(run(task, f"nearest, {label}", recipe, "grids", {"weights": recipe.name}))
    return rows


def llm_rows(small: bool, _iterations: int) -> list[dict]:
    from dataclasses import replace

    task = load_task("minilm-wordnet", small=small)
    rows = [{"section": "llm", "task": task.name, "method": "fp32", "weights": "fp32", **task.evaluate(task.model),
             "seconds": 0.0}]
    g128, w8a8_ = get_recipe("w4-g128"), get_recipe("w8a8")
    cases = [("nearest", g128), ("GPTQ", replace(g128, steps=(GPTQ(),))),
             ("GPTQ, activation order", replace(g128, steps=(GPTQ(act_order=True),))),
             ("AWQ", replace(g128, steps=(AWQ(),))), ("AWQ + GPTQ", replace(g128, steps=(AWQ(), GPTQ()))),
             ("nearest", w8a8_), ("SmoothQuant (α searched)", get_recipe("w8a8-smoothquant")),
             ("SmoothQuant (α = 0.5)", replace(w8a8_, steps=(SmoothQuant(),)))]
    return rows + [run(task, label, recipe, "llm", {"weights": recipe.name.split("-smoothquant")[0]})
                   for label, recipe in cases]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="dfq,rounding,compare,compare-dfq,grids,llm")
    p.add_argument("--adaround-iterations", type=int, default=1000)
    p.add_argument("--small", action="store_true", help="the tasks' small subsets (quick look)")
    p.add_argument("--slow-baselines", action="store_true",
                   help="also run baselines that take over an hour here (Brevitas' learned rounding on MobileNetV2)")
    p.add_argument("--tables", action="store_true", help="reprint the tables from the saved JSON")
    args = p.parse_args()
    set_threads()
    global SLOW_BASELINES
    SLOW_BASELINES = args.slow_baselines
    if args.tables:
        import json

        print_tables(json.loads(Path(RESULTS).read_text())["rows"])
        return
    sections = {"dfq": dfq_rows, "rounding": rounding_rows, "compare": compare_rows, "compare-dfq": compare_dfq_rows,
                "grids": grid_rows, "llm": llm_rows}
    rows = []
    for section in args.sections.split(","):
        if section not in sections:
            p.error(f"unknown section {section!r}; sections: {sorted(sections)}")
        rows += sections[section](args.small, args.adaround_iterations)
    for r in rows:
        r.update(small=args.small, adaround_iterations=args.adaround_iterations)
    print_tables(rows)
    run_sections = {r["section"] for r in rows}
    kept = []  # the other sections' rows of the saved run stay: sections can be re-run one at a time
    if Path(RESULTS).is_file():
        import json

        kept = [r for r in json.loads(Path(RESULTS).read_text()).get("rows", []) if r["section"] not in run_sections]
    save_json({"rows": kept + rows}, RESULTS)


def _quality(r: dict) -> str:
    if "feature_cosine" in r:
        return f"top-1 agreement {r['top1_agreement']:.1f}, feature cosine {r['feature_cosine']:.4f}"
    if "cosine_mean" in r:
        return f"cosine {r['cosine_mean']:.4f} / min {r['cosine_min']:.4f}, top-10 {r['top10_overlap']:.3f}"
    return ""


def print_tables(rows: list[dict]) -> None:
    for section in dict.fromkeys(r["section"] for r in rows):
        table = []
        for r in (r for r in rows if r["section"] == section):
            metric = next((k for k in ("probe_accuracy", "accuracy", "recall@1") if k in r), None)
            table.append({"task": r["task"], "weights": r.get("weights", ""), "method": r["method"],
                          "metric": f"{metric} {r[metric]:.2f}" if metric else "-", "fidelity to fp32": _quality(r),
                          "algorithm s": ", ".join(f"{k} {v}" for k, v in r.get("steps", {}).items()) or "-",
                          "total s": round(r["seconds"], 1)})
        print_table(table, title=section)


if __name__ == "__main__":
    main()
