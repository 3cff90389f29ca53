"""prepare / calibrate: the first two steps of the data path, and the model they hand over.

    qmodel = fewbits.prepare(model, recipe="w8a8")   # a new model; `model` is never modified
    fewbits.calibrate(qmodel, batches)                # Tensor | tuple of args | dict of kwargs
    y = qmodel(x)                                     # simulated (fake-quant) inference
"""
from __future__ import annotations

import contextlib
import copy
import enum
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..progress import Progress
from ..recipe import Recipe, get_recipe
from .fold import fold_batchnorm
from .modules import QUANT_MODULES, QuantEmbedding
from .quantizer import TensorQuantizer


class Status(enum.Enum):
    PREPARED = "prepared"
    CALIBRATED = "calibrated"
    TRAINING = "training"  # fewbits.qat.prepare_qat: grids follow the weights and data until finish()
    CONVERTED = "converted"


@dataclass(frozen=True)
class LeftFloat:
    """A module fewbits did not quantize, and why."""

    name: str
    type: str
    reason: str


# Modules with parameters of their own that stay float on purpose, and the reason given.
_FLOAT_BY_DESIGN = {
    nn.LayerNorm: "normalization stays float (transformer-aware default)",
    nn.GroupNorm: "normalization stays float",
    nn.MultiheadAttention: "MultiheadAttention uses its projection weights functionally; swap not possible",
}


class QuantizedModel(nn.Module):
    """The prepared model: ``model`` with quantized layers, plus what was left float and why."""

    def __init__(self, model: nn.Module, recipe: Recipe, left_float: list[LeftFloat], folded_bn: list[str],
                 float_model: nn.Module, fold_bn: bool = True) -> None:
        super().__init__()
        self.model = model
        # The fp32 network after BN folding, with the same module names: the reference for
        # per-layer errors. Kept out of the module tree so parameters() and state_dict() skip it.
        self.__dict__["float_model"] = float_model
        self.recipe = recipe
        self.left_float = left_float
        self.folded_bn = folded_bn
        self.fold_bn = fold_bn
        self.status = Status.PREPARED if recipe.needs_calibration else Status.CALIBRATED
        self.applied: list = []  # results of fewbits.apply, in order
        self.additions: list[str] = []  # QuantAdd modules (recipe.adds), by name
        self.ops: list[str] = []  # every quantized op between layers (adds, pools, concats), by name
        # per layer with a folded BatchNorm: its output's (mean, std) per channel by design, (β, |γ|)
        self.bn_stats: dict = {}

    def forward(self, *args, **kwargs):
        if self.status is Status.PREPARED:
            raise RuntimeError(f"recipe '{self.recipe.name}' has static activation ranges: "
                               "run fewbits.calibrate(qmodel, batches) before inference")
        return self.model(*args, **kwargs)

    def require_calibrated(self, what: str) -> None:
        """Raise, naming ``what`` was asked, unless the grids are fixed (calibrated)."""
        if self.status is Status.TRAINING:
            raise ValueError(f"{what}: the model is in quantization-aware training: run fewbits.qat.finish(qmodel) "
                             "first to fix its grids")
        if self.status is not Status.CALIBRATED:
            raise ValueError(f"{what}: the model is not calibrated: run fewbits.calibrate(qmodel, batches) first")

    def quantized_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.model.named_modules() if type(m) in QUANT_MODULES.values()}

    def quantizers(self) -> dict[str, TensorQuantizer]:
        return {q.name: q for q in self.model.modules() if isinstance(q, TensorQuantizer)}


def prepare(model: nn.Module, recipe="w8a8", *, fold_bn: bool = True) -> QuantizedModel:
    """A quantized copy of ``model`` following ``recipe`` (a name, a :class:`Recipe` or a JSON file).

    BatchNorm is folded into the preceding layer first (eval mode), weights get their qparams
    now, and every module with parameters that was not swapped is listed in ``left_float``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe)
    work = copy.deepcopy(model).eval()
    if fold_bn:
        bn_stats: dict = {}
        folded, unfolded = fold_batchnorm(work, bn_stats)
        why_bn = "BatchNorm not directly after a conv/linear in an nn.Sequential: kept float"
    else:
        folded, unfolded = [], [n for n, m in work.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn_stats = {}
        why_bn = "BatchNorm folding disabled (fold_bn=False): kept float"
    left = [LeftFloat(n, type(work.get_submodule(n)).__name__, why_bn) for n in unfolded]
    float_model = copy.deepcopy(work)
    handled = set(unfolded)
    for name, module in list(work.named_modules()):
        if not name or name in handled or any(name.startswith(h + ".") for h in handled):
            continue
        quant_cls = QUANT_MODULES.get(type(module))
        if quant_cls is None:
            reason = _float_reason(module)
            if reason:
                left.append(LeftFloat(name, type(module).__name__, reason))
                handled.add(name)
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
        _replace(work, name, swapped)
    ops = []
    if recipe.adds is not None or recipe.pools is not None or recipe.concats is not None:
        from .ops import quantize_ops

        work, ops, untouched = quantize_ops(work, recipe.adds, recipe.pools, recipe.concats,
                                            skip=tuple(QUANT_MODULES.values()))
        left += [LeftFloat(n, type(work.get_submodule(n)).__name__, why) for n, why in untouched]
    qmodel = QuantizedModel(work, recipe, left, folded, float_model, fold_bn)
    qmodel.ops = ops
    qmodel.bn_stats = bn_stats
    qmodel.additions = [n for n in ops if type(work.get_submodule(n)).__name__ == "QuantAdd"]
    return qmodel


def _float_reason(module: nn.Module) -> str:
    for cls, reason in _FLOAT_BY_DESIGN.items():
        if isinstance(module, cls):
            return reason
    if any(True for _ in module.parameters(recurse=False)):
        return f"fewbits has no quantized {type(module).__name__}"
    return ""


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@contextlib.contextmanager
def quantization_disabled(qmodel: QuantizedModel):
    """Inside the block every quantizer passes values through: the prepared model computes
    its float function (algorithms use this to collect fp32 statistics)."""
    quantizers = list(qmodel.quantizers().values())
    before = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield qmodel.model
    finally:
        for q, was in zip(quantizers, before):
            q.enabled = was


def as_call(batch, index: int) -> tuple[tuple, dict]:
    """A calibration batch as (args, kwargs), checked."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    else:
        raise ValueError(f"calibration batch {index}: expected a Tensor, a tuple of arguments or a dict of "
                         f"keyword arguments, got {type(batch).__name__}")
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if isinstance(value, torch.Tensor) and torch.is_floating_point(value) and not torch.isfinite(value).all():
            raise ValueError(f"calibration batch {index}: {label} has non-finite values (NaN or inf)")
    return args, kwargs


def _pending_steps(qmodel: QuantizedModel) -> list:
    from ..steps import step_to_dict

    done = [r.step for r in qmodel.applied]
    return [s for s in qmodel.recipe.steps if step_to_dict(s) not in done]


def _run_recipe_steps(qmodel: QuantizedModel, batches: list, after_ranges: bool) -> None:
    """Run the recipe's algorithm steps not yet applied: those that need calibrated ranges
    (``needs_ranges``) after the ranges are observed, the others before."""
    from ..algorithms import apply

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
        qmodel.status = Status.CALIBRATED
        _run_recipe_steps(qmodel, batches, after_ranges=True)
        return qmodel
    total = len(batches) if hasattr(batches, "__len__") else None
    for q in static:
        q.start_observing()
    try:
        with Progress("calibrating, batch", total) as progress:
            for index, batch in enumerate(batches):
                args, kwargs = as_call(batch, index)
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
    qmodel.status = Status.CALIBRATED
    _run_recipe_steps(qmodel, batches, after_ranges=True)
    return qmodel
