"""The drivers: hooks, the layer loop and the bookkeeping around each algorithm's math."""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..progress import Progress
from ..spec import PerTensor
from ..steps import STEP_NAMES, BiasCorrection, SmoothQuant, step_to_dict
from ..wrap.modules import QuantConv1d, QuantConv2d, QuantLinear
from ..wrap.prepare import LeftFloat, QuantizedModel, Status, as_call, quantization_disabled
from . import bias_correction, smoothquant


@dataclass
class AlgorithmResult:
    """What one ``apply`` did: per-layer details, the layers it could not treat and why, time."""

    step: dict
    layers: dict = field(default_factory=dict)
    skipped: list[LeftFloat] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "layers": self.layers, "skipped": [asdict(s) for s in self.skipped],
                "seconds": round(self.seconds, 3)}


def apply(qmodel: QuantizedModel, step, batches) -> AlgorithmResult:
    """Run the algorithm ``step`` (e.g. ``fewbits.SmoothQuant()``) on ``qmodel`` with calibration ``batches``.

    Algorithms that change what a layer's input quantizer sees clear those ranges: run
    :func:`fewbits.calibrate` afterwards (a recipe's ``steps`` are run by ``calibrate`` itself).
    Bad batches are rejected before anything changes.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("apply expects the model returned by fewbits.prepare")
    driver = _DRIVERS.get(type(step))
    if driver is None:
        raise ValueError(f"apply: {step!r} is not an algorithm step; known: {sorted(STEP_NAMES.values())}")
    batches = [as_call(b, i) for i, b in enumerate(batches)]
    if not batches:
        raise ValueError(f"apply {STEP_NAMES[type(step)]}: no calibration batches given")
    start = time.perf_counter()
    result = AlgorithmResult(step_to_dict(step))
    driver(qmodel, step, batches, result)
    result.seconds = time.perf_counter() - start
    qmodel.applied.append(result)
    return result


# ---- SmoothQuant -----------------------------------------------------------------------------
def _smoothable(qmodel: QuantizedModel, pattern: str, result: AlgorithmResult) -> dict[str, QuantLinear]:
    owners: dict[int, int] = {}
    for module in qmodel.model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen = {}
    for name, module in qmodel.quantized_layers().items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        why = ""
        if not isinstance(module, QuantLinear):
            why = f"SmoothQuant smooths linear layers, this is a {type(module).__name__}"
        elif module.input_quantizer is None or module.weight_quantizer is None:
            why = "SmoothQuant needs both an input and a weight quantizer"
        elif not isinstance(module.input_quantizer.spec.granularity, PerTensor):
            why = "SmoothQuant targets per-tensor inputs"
        elif owners.get(id(module.weight), 0) > 1:
            why = "the weight is tied to another module: scaling it would change that module too"
        if why:
            result.skipped.append(LeftFloat(name, type(module).__name__, why))
        else:
            chosen[name] = module
    return chosen


@torch.no_grad()
def _collect_inputs(qmodel: QuantizedModel, layers: dict, batches: list, samples: int) -> dict:
    """Per-channel min/max of every input of ``layers`` over all batches and a seeded row sample,
    with the model computing in float."""
    per_batch = math.ceil(samples / len(batches))
    generator = torch.Generator().manual_seed(0)
    seen: dict[str, list] = {}

    def hook(name):
        def grab(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi = x.amin(0), x.amax(0)
            pick = x[torch.randperm(len(x), generator=generator)[:per_batch]]
            if name in seen:
                old = seen[name]
                seen[name] = [torch.minimum(old[0], lo), torch.maximum(old[1], hi), old[2] + [pick]]
            else:
                seen[name] = [lo, hi, [pick]]
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with quantization_disabled(qmodel) as model, Progress("smoothquant statistics, batch", len(batches)) as p:
            for args, kwargs in batches:
                model(*args, **kwargs)
                p.step()
    finally:
        for h in handles:
            h.remove()
    return {n: smoothquant.LayerInputs(lo, hi, torch.cat(rows)[:samples]) for n, (lo, hi, rows) in seen.items()}


def _run_smoothquant(qmodel: QuantizedModel, step: SmoothQuant, batches: list, result: AlgorithmResult) -> None:
    layers = _smoothable(qmodel, step.layers, result)
    stats = _collect_inputs(qmodel, layers, batches, step.samples)
    with Progress("smoothquant, layer", len(layers)) as progress:
        for name, module in layers.items():
            progress.step(name)
            if name not in stats:
                result.skipped.append(LeftFloat(name, "QuantLinear", "the layer never ran on the batches"))
                continue
            inputs, wq = stats[name], module.weight_quantizer
            specs = (module.input_quantizer.spec, wq.spec, wq.recipe.method)
            w_absmax = module.weight.detach().abs().amax(0).float()
            if step.alpha is None:
                alpha, before, after = smoothquant.choose_alpha(inputs, module.weight, step.alpha_grid, *specs)
            else:  # a fixed strength is applied even where it does not help, as in the paper
                alpha = step.alpha
                before = smoothquant.quantized_output_sqnr(inputs, module.weight, torch.ones_like(w_absmax), *specs)
                after = smoothquant.quantized_output_sqnr(
                    inputs, module.weight, smoothquant.smoothing_scale(inputs.absmax, w_absmax, alpha), *specs)
            if alpha is not None:
                module.smooth(smoothquant.smoothing_scale(inputs.absmax, w_absmax, alpha))
                module.input_quantizer.scale = module.input_quantizer.zero_point = None
            result.layers[name] = {"alpha": alpha, "sqnr_db_before": _db(before), "sqnr_db_after": _db(after)}
    if any(q.role != "weight" and not q.recipe.dynamic and q.scale is None for q in qmodel.quantizers().values()):
        qmodel.status = Status.PREPARED


def _db(v: float):
    return None if not math.isfinite(v) else round(v, 2)


# ---- bias correction -------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


def _channel_means(model, names: list[str], batches: list, stop_after: str | None = None) -> dict:
    sums: dict = {}

    def hook(name):
        def grab(module, _args, out):
            s, n = bias_correction.channel_sum(out, 1 if not isinstance(module, nn.Linear) else out.dim() - 1)
            old = sums.get(name, (0.0, 0))
            sums[name] = (old[0] + s, old[1] + n)
            if name == stop_after:
                raise _Stop
        return grab

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for args, kwargs in batches:
            try:
                model(*args, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: s / c for n, (s, c) in sums.items()}


@torch.no_grad()
def _run_bias_correction(qmodel: QuantizedModel, step: BiasCorrection, batches: list, result: AlgorithmResult) -> None:
    if qmodel.status is not Status.CALIBRATED:
        raise ValueError("bias correction needs calibrated activation ranges: run fewbits.calibrate first "
                         "(a recipe's 'bc' step runs after the ranges are observed)")
    layers = {n: m for n, m in qmodel.quantized_layers().items()
              if fnmatch.fnmatchcase(n, step.layers) and isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d))}
    for name, m in qmodel.quantized_layers().items():
        if fnmatch.fnmatchcase(name, step.layers) and name not in layers:
            result.skipped.append(LeftFloat(name, type(m).__name__, "bias correction treats linear and conv layers"))
    float_means = _channel_means(qmodel.float_model, list(layers), batches)  # insertion order = execution order
    with Progress("bias correction, layer", len(float_means)) as progress:
        for name in float_means:
            progress.step(name)
            module = layers[name]
            quant = _channel_means(qmodel.model, [name], batches, stop_after=name)[name]
            delta = bias_correction.correction(float_means[name], quant)
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(delta.shape[0], dtype=module.weight.dtype))
            module.bias.add_(delta.to(module.bias.dtype))
            result.layers[name] = {"mean_abs_shift": round(delta.abs().mean().item(), 6),
                                   "max_abs_shift": round(delta.abs().max().item(), 6)}


_DRIVERS = {SmoothQuant: _run_smoothquant, BiasCorrection: _run_bias_correction}
