"""The drivers: hooks, the layer loop and the bookkeeping around each algorithm's math."""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..progress import Progress
from ..numerics.layout import expand
from ..observe.methods import weight_qparams
from ..spec import LevelSpec, PerChannel, PerGroup, PerTensor
from ..steps import (AWQ, GPTQ, STEP_NAMES, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant,
                     StochasticRounding, step_to_dict)
from ..wrap.modules import QuantConv1d, QuantConv2d, QuantLinear
from ..wrap.prepare import LeftFloat, QuantizedModel, Status, _replace, as_call, quantization_disabled
from . import adaround, awq, bias_correction, cle, gptq, smoothquant


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
    name = STEP_NAMES[type(step)]
    if getattr(step, "needs_ranges", False) and qmodel.status is not Status.CALIBRATED:
        raise ValueError(f"{name} needs calibrated activation ranges: run fewbits.calibrate first "
                         f"(a recipe's '{name}' step runs after the ranges are observed)")
    batches = [as_call(b, i) for i, b in enumerate(batches)]
    if not batches:
        raise ValueError(f"apply {name}: no calibration batches given")
    start = time.perf_counter()
    result = AlgorithmResult(step_to_dict(step))
    driver(qmodel, step, batches, result)
    result.seconds = time.perf_counter() - start
    qmodel.applied.append(result)
    return result


# ---- SmoothQuant -----------------------------------------------------------------------------
def _scalable_linears(qmodel: QuantizedModel, pattern: str, result: AlgorithmResult, algo: str) -> dict:
    """The linear layers ``algo`` may rescale per input channel (``"smoothquant"``: quantized
    per-tensor inputs; ``"awq"``: weight-only), the others listed in ``result`` with the reason."""
    shared = {id(p) for p in _shared_parameters(qmodel.model)}
    chosen = {}
    for name, module in qmodel.quantized_layers().items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        why = ""
        if not isinstance(module, QuantLinear):
            why = (f"SmoothQuant smooths linear layers, this is a {type(module).__name__}" if algo == "smoothquant"
                   else f"AWQ scales linear layers, this is a {type(module).__name__}")
        elif algo == "smoothquant" and (module.input_quantizer is None or module.weight_quantizer is None):
            why = "SmoothQuant needs both an input and a weight quantizer"
        elif algo == "smoothquant" and not isinstance(module.input_quantizer.spec.granularity, PerTensor):
            why = "SmoothQuant targets per-tensor inputs"
        elif algo == "awq" and module.weight_quantizer is None:
            why = "the weights are not quantized"
        elif module.weight_quantizer is not None and isinstance(module.weight_quantizer.spec, LevelSpec):
            why = f"{module.weight_quantizer.spec.kind} weights: scaling is chosen for uniform grids"
        elif algo == "awq" and module.input_quantizer is not None:
            why = "AWQ is for weight-only layers (SmoothQuant balances quantized inputs)"
        elif id(module.weight) in shared:
            why = "the weight is tied to another module: scaling it would change that module too"
        if why:
            result.skipped.append(LeftFloat(name, type(module).__name__, why))
        else:
            chosen[name] = module
    return chosen


@torch.no_grad()
def _collect_inputs(qmodel: QuantizedModel, layers: dict, batches: list, samples: int,
                    label: str = "smoothquant statistics") -> dict:
    """Per-channel min/max and mean magnitude of every input of ``layers`` over all batches and a
    seeded row sample, with the model computing in float."""
    per_batch = math.ceil(samples / len(batches))
    generator = torch.Generator().manual_seed(0)
    seen: dict[str, list] = {}

    def hook(name):
        def grab(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi, mag = x.amin(0), x.amax(0), x.abs().double().sum(0)
            pick = x[torch.randperm(len(x), generator=generator)[:per_batch]]
            if name in seen:
                old = seen[name]
                seen[name] = [torch.minimum(old[0], lo), torch.maximum(old[1], hi), old[2] + [pick], old[3] + mag,
                              old[4] + len(x)]
            else:
                seen[name] = [lo, hi, [pick], mag, len(x)]
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with quantization_disabled(qmodel) as model, Progress(f"{label}, batch", len(batches)) as p:
            for args, kwargs in batches:
                model(*args, **kwargs)
                p.step()
    finally:
        for h in handles:
            h.remove()
    return {n: smoothquant.LayerInputs(lo, hi, torch.cat(rows)[:samples], (mag / count).float())
            for n, (lo, hi, rows, mag, count) in seen.items()}


def _with_inputs(label: str, layers: dict, stats: dict, result: AlgorithmResult):
    """``(name, layer, inputs)`` for each layer whose inputs were collected, with progress; a layer
    that never ran on the batches is listed as skipped."""
    with Progress(f"{label}, layer", len(layers)) as progress:
        for name, layer in layers.items():
            progress.step(name)
            if name not in stats:
                result.skipped.append(LeftFloat(name, "QuantLinear", "the layer never ran on the batches"))
                continue
            yield name, layer, stats[name]


def _run_smoothquant(qmodel: QuantizedModel, step: SmoothQuant, batches: list, result: AlgorithmResult) -> None:
    layers = _scalable_linears(qmodel, step.layers, result, "smoothquant")
    stats = _collect_inputs(qmodel, layers, batches, step.samples)
    for name, module, inputs in _with_inputs("smoothquant", layers, stats, result):
        wq = module.weight_quantizer
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
    _mark_uncalibrated(qmodel)


def _static_activation_quantizers(qmodel: QuantizedModel) -> list:
    return [q for q in qmodel.quantizers().values() if q.needs_range]


def _mark_uncalibrated(qmodel: QuantizedModel) -> None:
    """Back to PREPARED when a step cleared a static activation range (calibrate must run again)."""
    if any(q.scale is None for q in _static_activation_quantizers(qmodel)):
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
        _run_batches(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {n: s / c for n, (s, c) in sums.items()}


def _add_to_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """``b ← b + delta``, creating a zero bias where the layer has none."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    layer.bias.add_(delta.to(layer.bias.dtype))


def _run_batches(model: nn.Module, batches: list) -> None:
    """Every batch through ``model``; a hook raising :class:`_Stop` ends that batch's forward."""
    for args, kwargs in batches:
        try:
            model(*args, **kwargs)
        except _Stop:
            pass


@torch.no_grad()
def _run_bias_correction(qmodel: QuantizedModel, step: BiasCorrection, batches: list, result: AlgorithmResult) -> None:
    layers = {n: m for n, m in qmodel.quantized_layers().items()
              if fnmatch.fnmatchcase(n, step.layers) and isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d))}
    for name, m in qmodel.quantized_layers().items():
        if fnmatch.fnmatchcase(name, step.layers) and name not in layers:
            result.skipped.append(LeftFloat(name, type(m).__name__, "bias correction treats linear and conv layers"))
    if step.mode == "analytic":
        _analytic_bias_correction(qmodel, layers, result)
        return
    float_means = _channel_means(qmodel.float_model, list(layers), batches)  # insertion order = execution order
    with Progress("bias correction, layer", len(float_means)) as progress:
        for name in float_means:
            progress.step(name)
            module = layers[name]
            quant = _channel_means(qmodel.model, [name], batches, stop_after=name)[name]
            delta = bias_correction.correction(float_means[name], quant)
            _add_to_bias(module, delta)
            result.layers[name] = {"mean_abs_shift": round(delta.abs().mean().item(), 6),
                                   "max_abs_shift": round(delta.abs().max().item(), 6)}


def _analytic_bias_correction(qmodel: QuantizedModel, layers: dict, result: AlgorithmResult) -> None:
    sources = {second: (first, through) for first, second, through in
               _layer_chains(qmodel, result, (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout))}
    for name, module in layers.items():
        first, through = sources.get(name, (None, []))
        why = ""
        if module.weight_quantizer is None:
            why = "the weights are not quantized"
        elif first not in qmodel.bn_stats:
            why = "its input does not come from a layer with a folded BatchNorm (through ReLU / ReLU6 / nothing)"
        if why:
            result.skipped.append(LeftFloat(name, type(module).__name__, why))
            continue
        mu, sigma = qmodel.bn_stats[first]
        lo, hi = float("-inf"), float("inf")
        for t in through:
            act = qmodel.model.get_submodule(t)
            if isinstance(act, (nn.ReLU, nn.ReLU6)):
                lo = max(lo, 0.0)
            if isinstance(act, nn.ReLU6):
                hi = min(hi, 6.0)
        mean = bias_correction.clipped_normal_mean(mu, sigma, lo, hi)
        error = (module.quantized_weight() - module.weight).detach()
        if getattr(module, "smooth_scale", None) is not None:
            mean = mean / module.smooth_scale.double()
        shift = bias_correction.expected_output_shift(error, mean, getattr(module, "groups", 1))
        _add_to_bias(module, -shift)
        result.layers[name] = {"mean_abs_shift": round(shift.abs().mean().item(), 6),
                               "max_abs_shift": round(shift.abs().max().item(), 6), "input_from": first}


# ---- cross-layer equalization ----------------------------------------------------------------
_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.Dropout)  # f(s·x) = s·f(x) for s > 0 (dropout: in eval)
_LAYERS = (QuantLinear, QuantConv1d, QuantConv2d)


@dataclass
class _Pair:
    first: str
    second: str
    through: list  # activation module names between them
    relu: bool  # a ReLU between: high-bias absorption applies
    depthwise: bool  # the second layer is a depthwise convolution


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (QuantConv1d, QuantConv2d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _layer_chains(qmodel: QuantizedModel, result: AlgorithmResult, through_types: tuple) -> list[tuple]:
    """``(first, second, through)``: quantized layers where ``first``'s output reaches ``second``'s
    only input through modules of ``through_types`` alone, every module called once (torch.fx on
    the prepared model; an untraceable model has none, noted in ``result``)."""
    from torch import fx

    from ..wrap.ops import QUANT_OPS

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (*_LAYERS, *QUANT_OPS)) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(qmodel.model)
    except Exception as err:  # noqa: BLE001 — no graph, no pairs
        result.skipped.append(LeftFloat("", type(qmodel.model).__name__,
                                        f"not traceable by torch.fx ({type(err).__name__}): no layer pairs found"))
        return []
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls.count(node.target) != 1 or \
                not isinstance(qmodel.model.get_submodule(node.target), _LAYERS):
            continue
        through, cur = [], node
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.op != "call_module" or calls.count(user.target) != 1:
                break
            module = qmodel.model.get_submodule(user.target)
            if isinstance(module, _LAYERS):
                if user.args == (cur,) and not user.kwargs:
                    chains.append((node.target, user.target, through))
                break
            if not isinstance(module, through_types):
                break
            through.append(user.target)
            cur = user
    return chains


def _cle_pairs(qmodel: QuantizedModel, step: CrossLayerEqualization, result: AlgorithmResult) -> list[_Pair]:
    """Consecutive quantized layers joined only through ReLU / ReLU6 / identity / dropout, the
    first layer's output used by the second alone."""
    acts = (*_HOMOGENEOUS, nn.ReLU6) if step.relu6 == "relu" else _HOMOGENEOUS
    shared = _shared_parameters(qmodel.model)
    pairs = []
    for first_name, second, through in _layer_chains(qmodel, result, acts):
        if not (fnmatch.fnmatchcase(first_name, step.layers) and fnmatch.fnmatchcase(second, step.layers)):
            continue
        first = qmodel.model.get_submodule(first_name)
        relu = any(isinstance(qmodel.model.get_submodule(t), (nn.ReLU, nn.ReLU6)) for t in through)
        m2 = qmodel.model.get_submodule(second)
        why = ""
        if type(first) is QuantLinear and type(m2) is not QuantLinear or type(first) is not QuantLinear and type(m2) is QuantLinear:
            why = "a linear layer and a convolution: their channels do not line up one to one"
        elif isinstance(m2, (QuantConv1d, QuantConv2d)) and m2.groups > 1 and not _depthwise(m2):
            why = "grouped (not depthwise) convolution as the second layer"
        elif getattr(first, "smooth_scale", None) is not None or getattr(m2, "smooth_scale", None) is not None:
            why = "already smoothed by SmoothQuant"
        elif any(first.weight is p or m2.weight is p for p in shared):
            why = "a weight tied to another module: rescaling it would change that module too"
        if why:
            result.skipped.append(LeftFloat(f"{first_name} → {second}", "pair", why))
            continue
        pairs.append(_Pair(first_name, second, through, relu, _depthwise(m2)))
    return pairs


@torch.no_grad()
def _run_cle(qmodel: QuantizedModel, step: CrossLayerEqualization, batches: list, result: AlgorithmResult) -> None:
    pairs = _cle_pairs(qmodel, step, result)
    models = (qmodel.model, qmodel.float_model)  # the fp32 reference changes with it: same function
    for pair in pairs:  # ReLU6 → ReLU where it sits between equalized layers (the paper's choice)
        for name in pair.through:
            for model in models:
                if isinstance(model.get_submodule(name), nn.ReLU6):
                    _replace(model, name, nn.ReLU())
                    if model is qmodel.model:
                        result.layers.setdefault("relu6_replaced", []).append(name)

    def spread(name):
        r = cle.output_ranges(qmodel.model.get_submodule(name).weight)
        return round(float(r.max() / r.clamp(min=1e-12).min()), 2)

    before = {p.first: spread(p.first) for p in pairs}
    total = {p.first: torch.ones(qmodel.model.get_submodule(p.first).weight.shape[0], dtype=torch.float64) for p in pairs}
    sweeps = 0
    with Progress("cross-layer equalization, sweep", step.iterations) as progress:
        for sweeps in range(1, step.iterations + 1):
            progress.step()
            change = 0.0
            for pair in pairs:
                w1, w2 = (qmodel.model.get_submodule(n).weight for n in (pair.first, pair.second))
                s = cle.equalization_scale(cle.output_ranges(w1), cle.input_ranges(w2, pair.depthwise))
                change = max(change, float((s - 1).abs().max()))
                total[pair.first] *= s
                for model in models:
                    l1, l2 = model.get_submodule(pair.first), model.get_submodule(pair.second)
                    cle.scale_output_channels(l1.weight, l1.bias, s)
                    cle.scale_input_channels(l2.weight, s, pair.depthwise)
                if pair.first in qmodel.bn_stats:  # the output's BatchNorm statistics scale with it
                    mu, sigma = qmodel.bn_stats[pair.first]
                    qmodel.bn_stats[pair.first] = (mu / s.to(mu.dtype), sigma / s.to(sigma.dtype))
            if change < step.tolerance:
                break
    absorbed = {}
    if step.high_bias_absorption:
        exact = []
        for p in pairs:
            padding = getattr(qmodel.model.get_submodule(p.second), "padding", 0)
            if p.relu and (padding == "valid" or not any(padding if isinstance(padding, tuple) else (padding,))):
                exact.append(p)
            elif p.relu:
                result.skipped.append(LeftFloat(f"{p.first} → {p.second}", "high-bias absorption",
                                                "the second layer pads with zeros: the border outputs would see "
                                                "c only from inside the image; bias kept"))
        absorbed = _absorb_high_biases(qmodel, exact, batches)
    for pair in pairs:
        result.layers[f"{pair.first} → {pair.second}"] = {
            "scale_min": round(float(total[pair.first].min()), 4), "scale_max": round(float(total[pair.first].max()), 4),
            "range_spread_before": before[pair.first], "range_spread_after": spread(pair.first),
            **({"absorbed_mean": round(absorbed[pair.first], 6)} if pair.first in absorbed else {})}
    result.layers["sweeps"] = sweeps
    changed = {n for p in pairs for n in (p.first, p.second)}
    for name in changed:
        layer = qmodel.model.get_submodule(name)
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.set_from(layer._weight_view())
    for q in _static_activation_quantizers(qmodel):  # the activations are rescaled: observe them again
        q.scale = q.zero_point = None
    _mark_uncalibrated(qmodel)


def _shared_parameters(model: nn.Module) -> list:
    """Parameters held by more than one module (tied weights)."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(p)
    return [ps[0] for ps in owners.values() if len(ps) > 1]


def _absorb_high_biases(qmodel: QuantizedModel, pairs: list, batches: list) -> dict:
    """Per pair with a ReLU between: measure the first layer's pre-activations on the batches (fp32
    reference model), absorb ``c = max(0, mean − 3 std)`` into the second layer's bias."""
    stats: dict = {}

    def hook(name):
        def grab(module, _args, out):
            dim = 1 if not isinstance(module, nn.Linear) else out.dim() - 1
            (s1, n), (s2, _) = bias_correction.channel_sum(out, dim), bias_correction.channel_sum(out.double() ** 2, dim)
            old = stats.get(name, (0.0, 0.0, 0))
            stats[name] = (old[0] + s1, old[1] + s2, old[2] + n)
        return grab

    model = qmodel.float_model
    handles = [model.get_submodule(p.first).register_forward_hook(hook(p.first)) for p in pairs]
    try:
        with Progress("high-bias absorption statistics, batch", len(batches)) as progress:
            for args, kwargs in batches:
                model(*args, **kwargs)
                progress.step()
    finally:
        for h in handles:
            h.remove()
    absorbed = {}
    for pair in pairs:
        if pair.first not in stats:
            continue
        s, s2, n = stats[pair.first]
        mean = s / n
        std = (s2 / n - mean.pow(2)).clamp(min=0).sqrt()
        c = cle.absorption_amount(mean, std)
        if not bool((c > 0).any()):
            absorbed[pair.first] = 0.0
            continue
        for m in (qmodel.model, qmodel.float_model):
            l1, l2 = m.get_submodule(pair.first), m.get_submodule(pair.second)
            gain = cle.absorbed_bias(l2.weight, c, pair.depthwise)
            _add_to_bias(l1, -c)
            _add_to_bias(l2, gain)
        if pair.first in qmodel.bn_stats:
            mu, sigma = qmodel.bn_stats[pair.first]
            qmodel.bn_stats[pair.first] = (mu - c.to(mu.dtype), sigma)
        absorbed[pair.first] = float(c.mean())
    return absorbed


# ---- rounding: stochastic and AdaRound -------------------------------------------------------
def _rounding_layers(qmodel: QuantizedModel, pattern: str, result: AlgorithmResult) -> dict:
    chosen = {}
    for name, m in qmodel.quantized_layers().items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        if not isinstance(m, _LAYERS):
            result.skipped.append(LeftFloat(name, type(m).__name__, "rounding is chosen for linear and conv layers"))
        elif m.weight_quantizer is None:
            result.skipped.append(LeftFloat(name, type(m).__name__, "the weights are not quantized"))
        elif isinstance(m.weight_quantizer.spec, LevelSpec):
            result.skipped.append(LeftFloat(name, type(m).__name__, f"{m.weight_quantizer.spec.kind} weights: "
                                            "rounding is chosen on uniform grids"))
        else:
            chosen[name] = m
    return chosen


def _grid_of(layer: nn.Module) -> tuple:
    """(W/s, zero point, qmin, qmax, scale) of the layer's weight view, broadcast to it."""
    wq = layer.weight_quantizer
    view = layer._weight_view().detach().float()
    s, z = (expand(t.float(), tuple(view.shape), wq.spec.granularity) for t in (wq.scale, wq.zero_point))
    return view * torch.reciprocal(s), z, wq.spec.qmin, wq.spec.qmax, s


def _write_levels(layer: nn.Module, levels: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> None:
    """Put the weight on the chosen grid points: nearest rounding (the quantizer, its qparams
    unchanged) then gives exactly these levels."""
    layer.weight.data.copy_(((levels - z) * s).reshape(layer.weight.shape).to(layer.weight.dtype))


@torch.no_grad()
def _run_stochastic(qmodel: QuantizedModel, step: StochasticRounding, batches: list, result: AlgorithmResult) -> None:
    generator = torch.Generator().manual_seed(step.seed)
    for name, layer in _rounding_layers(qmodel, step.layers, result).items():
        scaled, z, qmin, qmax, s = _grid_of(layer)
        levels = adaround.stochastic_levels(scaled, z, qmin, qmax, generator)
        result.layers[name] = {"changed_from_nearest": round(adaround.flips(levels, scaled, z, qmin, qmax), 4)}
        _write_levels(layer, levels, z, s)


def _execution_order(model: nn.Module, names: list, batch) -> list:
    order = []

    def seen(name):
        def hook(_module, _args, _out):
            if name not in order:
                order.append(name)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(seen(n)) for n in names]
    try:
        args, kwargs = batch
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def _feed_until(model: nn.Module, name: str, batches: list, take) -> None:
    """Run ``batches`` through ``model`` up to layer ``name``: ``take(input)`` sees its input each
    time and the rest of the forward is skipped."""
    def grab(_module, args):
        take(args[0].detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(grab)
    try:
        _run_batches(model, batches)
    finally:
        handle.remove()


def _layer_inputs(model: nn.Module, name: str, batches: list) -> torch.Tensor:
    """The input of layer ``name`` on every batch, concatenated along the first dimension."""
    seen = []
    _feed_until(model, name, batches, seen.append)
    return torch.cat(seen)


def _layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(layer, QuantLinear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def _run_adaround(qmodel: QuantizedModel, step: AdaRound, batches: list, result: AlgorithmResult) -> None:
    layers = _rounding_layers(qmodel, step.layers, result)
    order = _execution_order(qmodel.float_model, list(layers), batches[0])
    generator = torch.Generator().manual_seed(step.seed)
    with Progress("adaround, layer", len(order)) as progress:
        for name in order:
            progress.step(name)
            start = time.perf_counter()
            layer = layers[name]
            with torch.no_grad():
                x_fp = _layer_inputs(qmodel.float_model, name, batches)
                target = qmodel.float_model.get_submodule(name)(x_fp)
                del x_fp
                x_q = _layer_inputs(qmodel.model, name, batches)  # the earlier layers already rounded
                if getattr(layer, "smooth_scale", None) is not None:
                    x_q = x_q / layer.smooth_scale
                x_q = layer._in(x_q)
                bias = layer.quantized_bias()
                bias = None if bias is None else bias.detach()
            result.layers[name] = _adaround_layer(layer, x_q, target, bias, step, generator)
            result.layers[name]["seconds"] = round(time.perf_counter() - start, 2)


def _adaround_layer(layer, x_q, target, bias, step: AdaRound, generator) -> dict:
    scaled, z, qmin, qmax, s = _grid_of(layer)
    floor = torch.floor(scaled)
    channel = -1 if isinstance(layer, QuantLinear) else 1

    def weight_of(levels):
        return ((levels - z) * s).reshape(layer.weight.shape)

    def error(levels) -> float:  # the reconstruction loss on (up to) 256 samples, in float64
        with torch.no_grad():
            out = _layer_forward(layer, x_q[:256], weight_of(levels), bias)
            return float((out - target[:256]).double().pow(2).sum(channel).mean())

    nearest = torch.clamp(torch.round(scaled) + z, qmin, qmax)
    v = adaround.initial_v(scaled).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=step.lr)
    n = x_q.shape[0]
    with torch.enable_grad():  # calibrate runs recipe steps under no_grad
        for it in range(step.iterations):
            idx = torch.randint(n, (min(step.batch_size, n),), generator=generator)
            out = _layer_forward(layer, x_q[idx], weight_of(adaround.soft_levels(floor, v, z, qmin, qmax)), bias)
            loss = (out - target[idx]).pow(2).sum(channel).mean()
            b = adaround.beta(it, step.iterations, step.warmup, step.beta_start, step.beta_end)
            if b is not None and step.reg_weight > 0:
                loss = loss + step.reg_weight * adaround.regularizer(v, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    levels = adaround.hard_levels(floor, v.detach(), z, qmin, qmax)
    before, after = error(nearest), error(levels)
    with torch.no_grad():
        _write_levels(layer, levels, z, s)
    return {"error_nearest": before, "error_adaround": after,
            "changed_from_nearest": round(adaround.flips(levels, scaled, z, qmin, qmax), 4)}


# ---- GPTQ ------------------------------------------------------------------------------------
def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies, one row per product: the (smoothed, quantized) input,
    unfolded into patches for a convolution (columns in the order of ``weight.reshape(out, -1)``)."""
    if getattr(layer, "smooth_scale", None) is not None:
        x = x / layer.smooth_scale
    x = layer._in(x)
    if isinstance(layer, QuantLinear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _layer_hessian(model: nn.Module, name: str, layer: nn.Module, batches: list) -> tuple[torch.Tensor, int]:
    acc = {"h": None, "n": 0}

    def take(x):
        h, n = gptq.hessian(_input_rows(layer, x))
        acc["h"] = h if acc["h"] is None else acc["h"] + h
        acc["n"] += n

    _feed_until(model, name, batches, take)
    return acc["h"], acc["n"]


@torch.no_grad()
def _run_gptq(qmodel: QuantizedModel, step: GPTQ, batches: list, result: AlgorithmResult) -> None:
    layers = {}
    for name, m in _rounding_layers(qmodel, step.layers, result).items():
        if isinstance(m, QuantConv1d) or (isinstance(m, QuantConv2d) and m.groups != 1):
            result.skipped.append(LeftFloat(name, type(m).__name__, "GPTQ here handles linear layers and ungrouped "
                                                                    "2-d convolutions"))
        elif isinstance(m.weight_quantizer.spec.granularity, PerGroup) and \
                m.weight_quantizer.spec.granularity.axis % 2 != 1:
            result.skipped.append(LeftFloat(name, type(m).__name__, "groups must run along the input dimension"))
        else:
            layers[name] = m
    order = _execution_order(qmodel.float_model, list(layers), batches[0])
    with Progress("gptq, layer", len(order)) as progress:
        for name in order:
            progress.step(name)
            start = time.perf_counter()
            layer = layers[name]
            h, n = _layer_hessian(qmodel.model, name, layer, batches)
            result.layers[name] = _gptq_layer(layer, h, n, step)
            result.layers[name]["seconds"] = round(time.perf_counter() - start, 2)


def _gptq_layer(layer: nn.Module, h: torch.Tensor, n: int, step: GPTQ) -> dict:
    wq = layer.weight_quantizer
    spec = wq.spec
    view = layer._weight_view().detach()
    rows = view.shape[0]
    group = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None

    def per_group(t: torch.Tensor) -> torch.Tensor:  # qparams as [rows, groups]; one group without groups
        t = t.detach().double()
        return t.reshape(rows, -1) if group else t.reshape(-1).expand(rows).reshape(rows, 1)

    scale, zero = per_group(wq.scale), per_group(wq.zero_point)
    per_row = replace(spec, granularity=PerChannel(0))
    refit = (lambda cols: weight_qparams(cols.float(), per_row, wq.recipe.method, wq.name)) if group else None
    levels, scale, zero = gptq.gptq(view, h, scale, zero, spec.qmin, spec.qmax, group_size=group,
                                    block_size=step.block_size, damp=step.damp, act_order=step.act_order, refit=refit)
    cols = torch.arange(view.shape[1]) // (group or view.shape[1])
    deq = (levels - zero[:, cols]) * scale[:, cols]
    nearest = wq(view).detach().double()  # round-to-nearest with the qparams prepare fitted
    before = gptq.output_error(view.double() - nearest, h, n)
    after = gptq.output_error(view.double() - deq, h, n)
    layer.weight.data.copy_(deq.reshape(layer.weight.shape).to(layer.weight.dtype))
    if group:
        wq.scale = scale.reshape(wq.scale.shape).to(wq.scale.dtype)
        wq.zero_point = zero.reshape(wq.zero_point.shape).to(wq.zero_point.dtype)
    return {"error_nearest": before, "error_gptq": after}


# ---- AWQ -------------------------------------------------------------------------------------
def _run_awq(qmodel: QuantizedModel, step: AWQ, batches: list, result: AlgorithmResult) -> None:
    layers = _scalable_linears(qmodel, step.layers, result, "awq")
    stats = _collect_inputs(qmodel, layers, batches, step.samples, label="awq statistics")
    grid = [i / step.grid for i in range(step.grid)]
    for name, layer, inputs in _with_inputs("awq", layers, stats, result):
        wq = layer.weight_quantizer
        if layer.smooth_scale is not None:
            inputs = smoothquant.LayerInputs(inputs.lo, inputs.hi, inputs.rows / layer.smooth_scale,
                                             inputs.absmean / layer.smooth_scale)
        alpha, before, after = awq.search_alpha(inputs.rows, inputs.absmean, layer.weight, wq.spec, grid,
                                                wq.recipe.method)
        if alpha > 0:
            with torch.no_grad():
                layer.smooth(awq.awq_scale(inputs.absmean, alpha))
        result.layers[name] = {"alpha": alpha, "error_before": before, "error_after": after}


_DRIVERS = {SmoothQuant: _run_smoothquant, AWQ: _run_awq, BiasCorrection: _run_bias_correction, CrossLayerEqualization: _run_cle,
            StochasticRounding: _run_stochastic, AdaRound: _run_adaround, GPTQ: _run_gptq}
