"""The model handle every step passes along: the quantized network, its status, what stayed float.

    qmodel = fewbits.prepare(model, recipe="w8a8")   # a QuantizedModel, status PREPARED
    fewbits.calibrate(qmodel, batches)                # → CALIBRATED
    y = qmodel(x)                                     # simulated (fake-quant) inference

The handle sits at the bottom: the flow (:mod:`fewbits.flow`), the algorithms, training, the
lowering and the emitters all import it, it imports none of them. Its status changes only
through its own methods.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..recipe import Recipe
from .modules import QUANT_MODULES
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


@dataclass
class AlgorithmResult:
    """What one ``fewbits.apply`` did: per-layer details, the layers it could not treat and why, time."""

    step: dict
    layers: dict = field(default_factory=dict)
    skipped: list[LeftFloat] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "layers": self.layers, "skipped": [asdict(s) for s in self.skipped],
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, d: dict) -> "AlgorithmResult":
        return cls(d["step"], d["layers"], [LeftFloat(**s) for s in d["skipped"]], d["seconds"])


class QuantizedModel(nn.Module):
    """The prepared model: ``model`` with quantized layers, plus what was left float and why.

    ``float_model`` is the fp32 network after BatchNorm folding with the same module names (the
    reference for per-layer errors), kept out of the module tree so ``parameters()`` and
    ``state_dict()`` skip it.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, left_float: list[LeftFloat], folded_bn: list[str],
                 float_model: nn.Module, fold_bn: bool = True) -> None:
        super().__init__()
        self.model = model
        self.__dict__["float_model"] = float_model
        self.recipe = recipe
        self.left_float = left_float
        self.folded_bn = folded_bn
        self.fold_bn = fold_bn
        self._status = Status.PREPARED if recipe.needs_calibration else Status.CALIBRATED
        self.applied: list[AlgorithmResult] = []  # results of fewbits.apply, in order
        self.additions: list[str] = []  # QuantAdd modules (recipe.adds), by name
        self.ops: list[str] = []  # every quantized op between layers (adds, pools, concats, matmuls), by name
        # modules whose ops between layers stay float although the recipe quantizes such ops, and why
        # (a forward torch.fx cannot trace, a transformer's residual stream); not layers: see left_float
        self.float_ops: list[LeftFloat] = []
        # per layer with a folded BatchNorm: its output's (mean, std) per channel by design, (β, |γ|)
        self.bn_stats: dict = {}
        self.qat: dict | None = None  # quantization-aware training: method and options (fewbits.qat)
        self.training_bn: list[str] = []  # BatchNorms still training beside their layer (qat batchnorm='train')

    # ---- status ----------------------------------------------------------------------------------
    @property
    def status(self) -> Status:
        return self._status

    def mark_calibrated(self) -> None:
        """Every grid is fixed: ready for inference, conversion and export."""
        self._status = Status.CALIBRATED

    def mark_ranges_cleared(self) -> None:
        """Back to PREPARED when a step cleared a static activation range (calibrate must run again)."""
        if any(q.scale is None for q in self.quantizers().values() if q.needs_range):
            self._status = Status.PREPARED

    def start_training(self, options: dict) -> None:
        """Quantization-aware training: the grids follow the weights and the data until
        :meth:`mark_calibrated` (``fewbits.qat.finish``)."""
        self._status = Status.TRAINING
        self.qat = dict(options)

    def forward(self, *args, **kwargs):
        if self._status is Status.PREPARED:
            raise RuntimeError(f"recipe '{self.recipe.name}' has static activation ranges: "
                               "run fewbits.calibrate(qmodel, batches) before inference")
        return self.model(*args, **kwargs)

    def require_calibrated(self, what: str) -> None:
        """Raise, naming ``what`` was asked, unless the grids are fixed (calibrated)."""
        if self._status is Status.TRAINING:
            raise ValueError(f"{what}: the model is in quantization-aware training: run fewbits.qat.finish(qmodel) "
                             "first to fix its grids")
        if self._status is not Status.CALIBRATED:
            raise ValueError(f"{what}: the model is not calibrated: run fewbits.calibrate(qmodel, batches) first")

    # ---- contents --------------------------------------------------------------------------------
    def quantized_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.model.named_modules() if type(m) in QUANT_MODULES.values()}

    def quantizers(self) -> dict[str, TensorQuantizer]:
        return {q.name: q for q in self.model.modules() if isinstance(q, TensorQuantizer)}


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
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


@contextlib.contextmanager
def batch_errors_named(index: int, model: nn.Module):
    """Inside the block, an error a batch raises in the forward names the batch index and the
    innermost module running when it happened (e.g. a batch of the wrong shape)."""
    running: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module, _args):
        running.append(names.get(module, type(module).__name__))

    def leave(module, _args, _out):
        if running:
            running.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as err:
        where = f" in layer '{running[-1]}'" if running and running[-1] else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"calibration batch {index}{where}: {first}") from err
    finally:
        for h in hooks:
            h.remove()
