"""The data path on top of the model handle: ``prepare`` → ``calibrate`` (→ the recipe's
algorithm steps), and :func:`quantize_model`, the whole composition the command line runs.

    qmodel = fewbits.prepare(model, recipe="w8a8")   # a new model; `model` is never modified
    fewbits.calibrate(qmodel, batches)                # Tensor | tuple of args | dict of kwargs
    y = qmodel(x)                                     # simulated (fake-quant) inference
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from .progress import Progress
from .recipe import Recipe, fitted_to, get_recipe, with_calibration
from .target import Target
from .wrap.fold import fold_batchnorm
from .wrap.functional import functional_linears
from .wrap.handle import LeftFloat, QuantizedModel, Status, as_call, batch_errors_named, replace_module
from .wrap.modules import QUANT_MODULES, QuantEmbedding
from .wrap.ops import quantize_ops
from .wrap.attention import LinearMultiheadAttention, unsupported as unsupported_attention
from .wrap.standard import holds_layers, is_norm, standardize_layers
from .wrap.trace import torch_builtin
from .wrap.transformer import unfuse_transformers

def prepare(model: nn.Module, recipe="w8a8", *, fold_bn: bool = True, target: Target | None = None) -> QuantizedModel:
    """A quantized copy of ``model`` following ``recipe`` (a name, a :class:`Recipe` or a JSON file).

    BatchNorm is folded into the preceding layer first (eval mode), weights get their qparams
    now, and every module with parameters that was not swapped is listed in ``left_float``.
    ``target``: quantize the weights of integer GEMMs at the widest width its int8 kernels run
    exactly (7 bits on AVX2 without VNNI; the recipe is renamed ``…+w7``), so that calibration
    and the algorithms fit the weights that deploy; ``None`` keeps the recipe's widths.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe) if target is None else fitted_to(get_recipe(recipe), target)
    work = copy.deepcopy(model).eval()
    standardize_layers(work)  # e.g. Hugging Face Conv1D → nn.Linear
    work, _ = functional_linears(work)  # F.linear(x, self.w, self.b) → an nn.Linear child
    bn_stats: dict = {}
    if fold_bn:
        folded, unfolded = fold_batchnorm(work, bn_stats)
        why_bn = ("BatchNorm not directly after a conv/linear whose output only it reads (in an nn.Sequential or "
                  "its parent's traced forward): kept float")
    else:
        folded, unfolded = [], [n for n, m in work.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        why_bn = "BatchNorm folding disabled (fold_bn=False): kept float"
    left = [LeftFloat(n, type(work.get_submodule(n)).__name__, why_bn) for n in unfolded]
    unfuse_transformers(work)  # the fp32 reference too: its layers must run for per-layer errors
    float_model = copy.deepcopy(work)
    handled = set(unfolded)
    for name, module in list(work.named_modules()):
        if name in handled or any(name.startswith(h + ".") for h in handled if h):
            continue
        quant_cls = QUANT_MODULES.get(type(module))
        if quant_cls is None:
            reason = _float_reason(module)
            if not reason:
                continue
            if torch_builtin(module) or not holds_layers(module):
                left.append(LeftFloat(name, type(module).__name__, reason))  # the whole module stays float
                handled.add(name)
            else:  # a block with parameters of its own: its layers still quantize
                own = sorted(n for n, _ in module.named_parameters(recurse=False))
                left.append(LeftFloat(name, type(module).__name__, f"its own parameters {own} are used directly "
                                                                   "in its forward: they stay float"))
            continue
        layer_recipe, why = recipe.for_layer(name, type(module).__name__)
        if layer_recipe is None or not (layer_recipe.weight or layer_recipe.input or layer_recipe.output):
            left.append(LeftFloat(name, type(module).__name__, why or "the recipe quantizes nothing here"))
            continue
        if quant_cls is QuantEmbedding and layer_recipe.input is not None:
            raise ValueError(f"recipe '{recipe.name}' gives embedding '{name}' an input quantizer, "
                             "but its input is integer indices")
        try:
            swapped = quant_cls.from_float(module, layer_recipe, name)
        except ValueError as err:  # e.g. a group size that does not divide this layer
            left.append(LeftFloat(name, type(module).__name__, str(err)))
            continue
        replace_module(work, name, swapped)
    ops, untouched = [], []
    if any(t is not None for t in recipe.ops().values()):
        work, ops, untouched = quantize_ops(work, recipe.ops(), skip=(*QUANT_MODULES.values(), LinearMultiheadAttention))
    qmodel = QuantizedModel(work, recipe, left, folded, float_model, fold_bn)
    qmodel.ops = ops
    qmodel.float_ops = [LeftFloat(n, type(work.get_submodule(n)).__name__, why) for n, why in untouched]
    qmodel.bn_stats = bn_stats
    qmodel.additions = [n for n in ops if type(work.get_submodule(n)).__name__ == "QuantAdd"]
    return qmodel


def _float_reason(module: nn.Module) -> str:
    """Why a module with parameters of its own and no quantized counterpart stays float."""
    if isinstance(module, nn.MultiheadAttention):  # the ones standardize_layers could not rewrite
        return unsupported_attention(module) or ("MultiheadAttention whose weights another module shares (or a "
                                                 "subclass of it): its projections stay float")
    if isinstance(module, nn.LayerNorm):
        return "normalization stays float (transformer-aware default)"
    if is_norm(module):  # any library's: LlamaRMSNorm, nn.RMSNorm, nn.GroupNorm, …
        return "normalization stays float"
    if any(True for _ in module.parameters(recurse=False)):
        return f"fewbits has no quantized {type(module).__name__}"
    return ""


def _pending_steps(qmodel: QuantizedModel) -> list:
    from .steps import step_to_dict

    done = [r.step for r in qmodel.applied]
    return [s for s in qmodel.recipe.steps if step_to_dict(s) not in done]


def _run_recipe_steps(qmodel: QuantizedModel, batches: list, after_ranges: bool) -> None:
    """Run the recipe's algorithm steps not yet applied: those that need calibrated ranges
    (``needs_ranges``) after the ranges are observed, the others before."""
    from .algorithms import apply

    for step in _pending_steps(qmodel):
        if getattr(step, "needs_ranges", False) == after_ranges:
            apply(qmodel, step, batches)


@torch.no_grad()
def calibrate(qmodel: QuantizedModel, batches: Iterable) -> QuantizedModel:
    """Run ``batches`` through the float path, observe every static activation, set its range.

    On any error (a bad batch, a layer that never ran) every quantizer keeps the range it had
    before the call and the error names the batch or layer at fault.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("calibrate expects the model returned by fewbits.prepare")
    if qmodel.status is Status.TRAINING:
        raise ValueError("calibrate: the model is in quantization-aware training, where ranges follow the data; "
                         "give fewbits.qat.prepare_qat the calibration batches instead")
    if _pending_steps(qmodel):  # steps need the batches too: keep them, and check all before any change
        batches = list(batches)
        for i, batch in enumerate(batches):
            as_call(batch, i)
        _run_recipe_steps(qmodel, batches, after_ranges=False)
    static = [q for q in qmodel.quantizers().values() if q.needs_range]
    if not static:
        qmodel.mark_calibrated()
        _run_recipe_steps(qmodel, batches, after_ranges=True)
        return qmodel
    total = len(batches) if hasattr(batches, "__len__") else None
    for q in static:
        q.start_observing()
    try:
        with Progress("calibrating, batch", total) as progress:
            for index, batch in enumerate(batches):
                args, kwargs = as_call(batch, index)
                with batch_errors_named(index, qmodel.model):
                    qmodel.model(*args, **kwargs)
                progress.step()
        if progress.count == 0:
            raise ValueError("calibration got no batches: an empty stream gives no ranges")
        new = {q.name: q.observed_qparams() for q in static}
    except BaseException:
        for q in static:
            q.stop_observing()
        raise
    for q in static:
        q.stop_observing(new[q.name])
    qmodel.mark_calibrated()
    _run_recipe_steps(qmodel, batches, after_ranges=True)
    return qmodel


def excluding(recipe: Recipe, model: nn.Module, patterns) -> Recipe:
    """``recipe`` keeping the layers ``patterns`` name float too; a pattern naming no module of
    ``model`` is an error that names it (a typo would otherwise quantize what the user meant to keep)."""
    import fnmatch

    patterns = tuple(p.strip() for p in patterns if p.strip())
    names = [n for n, _ in model.named_modules() if n]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise ValueError(f"--exclude {', '.join(missing)}: no layer of the model has that name "
                         f"(names look like {', '.join(names[-3:])})")
    return replace(recipe, name=f"{recipe.name} (excluding {', '.join(patterns)})",
                   exclude=tuple(recipe.exclude) + patterns)


def quantize_model(model: nn.Module, calibration, recipe="w8a8", *, metric_fn=None, metric=None, calib=None, algo=None,
             fit_cpu: bool = False, target: Target | None = None, exclude=()):
    """prepare → calibrate (running the recipe's steps and ``algo``) → evaluate, the composition
    ``fewbits quantize`` runs; returns ``(qmodel, report, recipe used)``.

    ``calib``: an activation calibration method for every static grid; ``algo``: post-training
    algorithms, comma-separated (``"cle,bc"``); ``fit_cpu``: cap GEMM weights at the width
    ``target``'s int8 kernels run exactly (default: ONNX Runtime on this CPU; 7 bits on AVX2
    without VNNI) before calibration, so the algorithms fit the deployed weights; ``exclude``:
    layer names or glob patterns kept float beside the recipe's own (each must name a layer).
    """
    from .report.evaluate import evaluate
    from .steps import parse_steps, with_steps

    recipe = get_recipe(recipe)
    if fit_cpu:
        recipe = fitted_to(recipe, target or Target.onnxruntime())
    if calib:
        recipe = with_calibration(recipe, calib)
    if algo:
        recipe = replace(recipe, steps=with_steps(recipe.steps, parse_steps(algo)))
    if any(p.strip() for p in exclude):
        recipe = excluding(recipe, model, exclude)
    t0 = time.perf_counter()
    qmodel = prepare(model, recipe)
    calibrate(qmodel, calibration)
    seconds = time.perf_counter() - t0
    report = evaluate(qmodel, model, metric_fn=metric_fn, metric=metric, batches=calibration, seconds=seconds)
    report.extra["algorithms"] = [r.to_dict() for r in qmodel.applied]
    return qmodel, report, recipe


__all__ = ["prepare", "calibrate", "quantize_model"]
