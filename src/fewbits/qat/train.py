"""Quantization-aware training: prepare a trainable quantized model, train it, fix its grids.

    qmodel = fewbits.qat.prepare_qat(model, "w4a8", method="lsq")    # train mode, grids learn
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-4)
    for x, y in data:                                               # any ordinary loop
        loss = F.cross_entropy(qmodel(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    fewbits.qat.finish(qmodel)                                      # calibrated, like a PTQ model
    fewbits.convert(qmodel); fewbits.export_onnx(qmodel, x, "m.onnx")

or ``fewbits.qat.fit(qmodel, data, epochs=…, evaluate=…)`` for the loop with progress,
evaluation each epoch, the best epoch kept, distillation and data-parallel ranks.

The fp32 master weights train; every forward pass quantizes them (and the activations) as
the deployed model will (the seeds: "keep full-precision weights, simulate quantization at
forward, compute gradients in full precision"). BatchNorm is folded at preparation with its
running statistics, which then stay frozen: the folded layer is exactly what deploys, at every
step.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..wrap.fold import fold_batchnorm
from ..wrap.levels import LevelQuantizer
from ..wrap.modules import QUANT_MODULES
from ..flow import calibrate, prepare
from ..recipe import get_recipe
from ..steps import step_to_dict
from ..wrap.handle import QuantizedModel, Status
from ..wrap.quantizer import TensorQuantizer
from .batchnorm import QATConvBn, attach_batchnorm
from .estimators import check_estimator
from .quantizers import QATQuantizer, check_method


def _swap_quantizers(root: nn.Module, make: Callable[[TensorQuantizer], Optional[nn.Module]]) -> None:
    for parent in list(root.modules()):
        for key, child in list(parent.named_children()):
            if isinstance(child, TensorQuantizer):
                new = make(child)
                if new is not None:
                    setattr(parent, key, new)


def prepare_qat(model: nn.Module, recipe="w8a8", *, method: str = "ste", estimator: str = "clipped",
                batches: Optional[Iterable] = None, momentum: float = 0.01, temperature: float = 4.0,
                batchnorm: str = "fold") -> QuantizedModel:
    """A quantized copy of ``model`` whose grids train with it (``model`` is not modified).

    ``method``: ``ste`` (weights' qparams from themselves each step, activation ranges by moving
    average), ``lsq`` (learned steps) or ``pact`` (learned activation clipping); ``estimator``:
    the rounding's gradient for ``ste`` grids (see :mod:`fewbits.qat.estimators`). ``batches``,
    if given, calibrate the ranges first (and run the recipe's steps, e.g. bias correction);
    otherwise the first training batch sets them. Dynamic activation grids stay dynamic.
    ``batchnorm``: ``fold`` folds each BatchNorm with its running statistics, frozen from the
    start; ``train`` keeps it learning on batch statistics, its folded weight quantized, until
    :func:`freeze_batchnorm` (see :mod:`fewbits.qat.batchnorm`).
    """
    check_method(method)
    check_estimator(estimator)
    if batchnorm not in ("fold", "train"):
        raise ValueError(f"prepare_qat batchnorm must be 'fold' or 'train', got {batchnorm!r}")
    recipe, left_out = _steps_without_data(get_recipe(recipe), batches)
    qmodel = prepare(model, recipe, fold_bn=batchnorm == "fold")
    if batches is not None:
        calibrate(qmodel, batches)
    elif qmodel.recipe.steps:
        names = ", ".join(type(s).__name__ for s in qmodel.recipe.steps)
        raise ValueError(f"recipe '{qmodel.recipe.name}' has calibration steps ({names}): "
                         "give prepare_qat the batches to run them on")
    if batchnorm == "train":
        paired = attach_batchnorm(qmodel.model, tuple(QUANT_MODULES.values()))
        qmodel.left_float = [lf for lf in qmodel.left_float if lf.name not in paired]
        qmodel.training_bn = paired
        for m in qmodel.model.modules():  # weight grids fitted to the folded weights
            if isinstance(m, QATConvBn) and m.layer.weight_quantizer is not None:
                w = m.folded_weight()[0].detach()
                m.layer.weight_quantizer.set_from(w.reshape(w.shape[0], -1))
    for name, layer in qmodel.quantized_layers().items():  # non-uniform weights follow the weight
        wq = getattr(layer, "weight_quantizer", None)
        if isinstance(wq, LevelQuantizer) and batchnorm == "train":
            raise ValueError(f"prepare_qat: batchnorm='train' trains uniform weight grids only, layer '{name}' has "
                             f"{wq.spec.kind} weights: use batchnorm='fold'")
        if isinstance(wq, LevelQuantizer):
            wq.start_training(layer.weight_view())
    _swap_quantizers(qmodel.model, lambda q: None if q.recipe.dynamic or isinstance(q, LevelQuantizer) else
                     QATQuantizer(q, method, estimator, momentum, temperature))
    qmodel.start_training({"method": method, "estimator": estimator, "momentum": momentum,
                           "temperature": temperature, "batchnorm": batchnorm, "left_out_steps": left_out})
    return qmodel.train()


def _steps_without_data(recipe, batches) -> tuple:
    """Without calibration batches, a recipe's optional steps (``required=False``: the default's
    bias correction, which training does better by learning the biases) are left out and named."""
    if batches is not None:
        return recipe, []
    left_out = [step_to_dict(s) for s in recipe.steps if not getattr(s, "required", True)]
    return replace(recipe, steps=tuple(s for s in recipe.steps if getattr(s, "required", True))), left_out


def qat_quantizers(qmodel: QuantizedModel) -> dict[str, QATQuantizer]:
    return {q.name: q for q in qmodel.model.modules() if isinstance(q, QATQuantizer)}


def quantizer_parameters(qmodel: QuantizedModel) -> list[nn.Parameter]:
    """The learned steps (LSQ) and clipping levels (PACT): give them their own optimizer group
    (no weight decay)."""
    levels = [q.learned_levels for q in qmodel.model.modules() if isinstance(q, LevelQuantizer) and q.learned]
    return [q.learned_value for q in qat_quantizers(qmodel).values() if q.learned] + levels


def pact_penalty(qmodel: QuantizedModel) -> torch.Tensor:
    """``Σ α²`` over the PACT clipping levels (the loss adds ``λ`` times this)."""
    alphas = [q.learned_value for q in qat_quantizers(qmodel).values() if q.learned and q.method == "pact"]
    return sum((a * a).sum() for a in alphas) if alphas else torch.zeros(())


def freeze_ranges(qmodel: QuantizedModel, frozen: bool = True) -> None:
    """Stop (or restart) the moving averages of the activation ranges."""
    for q in qat_quantizers(qmodel).values():
        q.ranges_frozen = frozen


def finish(qmodel: QuantizedModel) -> QuantizedModel:
    """Fix every grid at its trained value: the model becomes an ordinary calibrated one that
    ``convert`` / ``export_onnx`` / ``save`` take (in place; returns it, in eval mode)."""
    if qmodel.status is not Status.TRAINING:
        raise ValueError(f"finish: the model is {qmodel.status.value}, not in quantization-aware training")
    quantizers = qat_quantizers(qmodel).values()
    disabled = [q.name for q in quantizers if not q.enabled]
    if disabled:  # checked before anything changes: a refused model stays as it was
        raise ValueError(f"finish: {len(disabled)} quantizers are disabled (e.g. '{disabled[0]}'; a layer-wise stage "
                         "not reached?): enable them, or train through the last stage")
    missing = [q.name for q in quantizers if q.role != "weight" and q.scale is None
               and not (q.learned and bool(q.initialized))]
    if missing:
        raise ValueError(f"finish: {len(missing)} activation grids never saw data (e.g. '{missing[0]}'): "
                         "run at least one training or calibration batch through the model")
    qmodel.eval()
    _fold_trained_batchnorm(qmodel)
    for layer in qmodel.quantized_layers().values():  # weights' grids from the final weights
        wq = getattr(layer, "weight_quantizer", None)
        if isinstance(wq, QATQuantizer) and not wq.learned:
            wq.set_from(layer.weight_view())
        elif isinstance(wq, LevelQuantizer):  # k-means: the layer now holds its shared weights
            shared = wq.stop_training(layer.weight_view())
            if shared is not None:
                with torch.no_grad():
                    layer.weight.copy_(layer.weight_from_view(shared))
    _swap_quantizers(qmodel.model, lambda q: q.frozen() if isinstance(q, QATQuantizer) else None)
    qmodel.mark_calibrated()
    return qmodel


def progressive_bits(widths: list[int], epochs: int, roles: tuple[str, ...] = ("weight",)) -> Callable:
    """A ``fit`` schedule that trains the ``roles`` grids at each width in turn (e.g. 8 → 4 → 2
    over equal shares of the epochs): each stage starts from the weights the wider grid
    trained, which eases the low-bit optimisation (progressive quantization, Zhuang et al. 2018).
    Only grids whose recipe width is the last one are scheduled (an 8-bit embedding table in a
    4-bit recipe stays at 8)."""
    widths = [int(w) for w in widths]
    if not widths or epochs < len(widths):
        raise ValueError(f"progressive bit widths {widths} need at least one epoch each, got {epochs} epochs")
    if widths != sorted(widths, reverse=True):
        raise ValueError(f"progressive bit widths must not grow, got {widths}")
    scheduled: dict[str, bool] = {}

    def schedule(epoch: int, qmodel: QuantizedModel) -> None:
        stage = min(epoch * len(widths) // epochs, len(widths) - 1)
        for q in qat_quantizers(qmodel).values():
            if q.name not in scheduled:  # decided once, from the width the recipe gave
                scheduled[q.name] = q.role in roles and q.spec.bits == widths[-1]
            if scheduled[q.name] and q.spec.bits != widths[stage]:
                q.set_bits(widths[stage])
        if not any(scheduled.values()):
            raise ValueError(f"progressive bit widths {widths}: no {'/'.join(roles)} grid is {widths[-1]}-bit")

    return schedule


def _fold_trained_batchnorm(qmodel: QuantizedModel) -> None:
    """Fold every still-separate BatchNorm into its layer (running statistics), in the model and
    in the fp32 reference, so both have the layers that deploy."""
    paired = qmodel.training_bn
    if not paired:
        return
    for parent in list(qmodel.model.modules()):
        for key, child in list(parent.named_children()):
            if isinstance(child, QATConvBn):
                setattr(parent, key, child.folded())
    stats: dict = {}
    fold_batchnorm(qmodel.float_model, stats)
    qmodel.folded_bn = sorted(set(qmodel.folded_bn) | set(paired))
    qmodel.bn_stats.update(stats)
    qmodel.training_bn = []


def progressive_layers(stages: int, epochs: int) -> Callable:
    """A ``fit`` schedule that quantizes the layers in ``stages`` groups, in module order (the
    order the model defines them, usually the order data flows): in the first share of the
    epochs only the first group trains quantized, the rest float; each stage adds the next
    group, until every layer is quantized for the last share (layer-wise staging)."""
    if stages < 1 or epochs < stages:
        raise ValueError(f"layer-wise staging in {stages} stages needs at least one epoch each, got {epochs} epochs")

    def schedule(epoch: int, qmodel: QuantizedModel) -> None:
        stage = min(epoch * stages // epochs, stages - 1)
        layers = list(qmodel.quantized_layers().values())
        enabled = math.ceil(len(layers) * (stage + 1) / stages)
        for i, layer in enumerate(layers):
            for slot in ("weight_quantizer", "input_quantizer", "output_quantizer"):
                quantizer = getattr(layer, slot, None)
                if quantizer is not None:
                    quantizer.enabled = i < enabled

    return schedule


def chain(*schedules: Optional[Callable]) -> Optional[Callable]:
    """One ``fit`` schedule running the given ones in order (``None`` entries skipped)."""
    active = [s for s in schedules if s is not None]
    if not active:
        return None

    def schedule(epoch: int, qmodel: QuantizedModel) -> None:
        for s in active:
            s(epoch, qmodel)

    return schedule
