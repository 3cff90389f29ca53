"""The quantizer of a tensor while the model trains: its grid follows the weights and the data.

A :class:`QATQuantizer` takes the place of a :class:`~fewbits.wrap.quantizer.TensorQuantizer`
(it is one: ``scale`` / ``zero_point`` always hold the grid of the last forward pass). In
training mode, by ``method``:

* ``ste`` — weights: qparams from the current weight every step (the recipe's method);
  activations: a moving average of each batch's min / max (``r ← r + m·(batch − r)``, ``m`` the
  ``momentum``, torch.ao's 0.01), the seeds' "during training, take an EMA". Gradients pass the
  rounding by the chosen :mod:`estimator <fewbits.qat.estimators>`.
* ``lsq`` — Learned Step size Quantization (Esser et al., ICLR 2020): the step ``s`` is a
  parameter, ``ŷ = s·(clamp(round(x/s + z), qmin, qmax) − z)`` with ``round`` passed straight
  through, so ``∂ŷ/∂s = round(x/s + z) − z − x/s`` inside the range and ``qmin − z`` /
  ``qmax − z`` where clipped; the step's gradient is scaled by ``g = 1/√(N·Qp)`` (``N`` the
  elements per step — per output channel for weights, per sample for activations — and
  ``Qp = qmax − z`` the positive levels). The zero point stays where the initial range put it.
* ``pact`` — PACT (Choi et al. 2018) for activations: a learned clipping level ``α``,
  ``y = clamp(x, lo, α)`` with ``lo = 0`` (or ``−α`` when the tensor was negative at the start),
  quantized on the grid of ``[lo, α]``; ``∂y/∂α = 1`` where ``x ≥ α`` (−1 where ``x ≤ −α``), the
  rounding passed straight through; the L2 penalty ``λ·α²`` is :func:`fewbits.qat.pact_penalty`.
  Weights under ``pact`` follow ``ste``.

In eval mode every method quantizes exactly like the calibrated quantizer (the same
``fake_quantize``), on the grid of the current state. Ranges start from the calibrated
qparams when the model was calibrated, else from the first training batch.

Data-parallel training: batch ranges are all-reduced (min of the minima, max of the maxima)
before they enter the moving average or initialise a step, so every rank holds the ranges a
single process would compute on the global batch; learned steps are parameters (DDP averages
their gradients).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..numerics.affine import choose_qparams
from ..numerics.layout import expand, from_rows, to_rows
from ..observe.stats import row_range
from ..spec import PerTensor
from ..wrap.quantizer import TensorQuantizer
from .estimators import check_estimator, fake_quantize_estimated, grad_scale, round_pass

METHODS = ("ste", "lsq", "pact")
_EPS = float(torch.finfo(torch.float32).eps)


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"QAT method must be one of {list(METHODS)}, got {name!r}")
    return name


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def global_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch range over every data-parallel rank (unchanged in a single process)."""
    if is_distributed():
        lo, hi = lo.clone(), hi.clone()
        torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX)
    return lo, hi


class QATQuantizer(TensorQuantizer):
    """A trainable stand-in for ``base`` (see the module docstring)."""

    def __init__(self, base: TensorQuantizer, method: str = "ste", estimator: str = "clipped",
                 momentum: float = 0.01, temperature: float = 4.0) -> None:
        super().__init__(base.recipe, base.name, base.role)
        if base.recipe.dynamic:
            raise ValueError(f"'{base.name}' has dynamic ranges: it needs no training stand-in")
        self.method = check_method(method)
        self.estimator = check_estimator(estimator)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"QAT momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.temperature = temperature
        self.enabled = base.enabled
        self.ranges_frozen = False  # True: the moving average stops (late in training)
        self.scale = None if base.scale is None else base.scale.detach().clone()
        self.zero_point = None if base.zero_point is None else base.zero_point.detach().clone()
        self.register_buffer("running_min", None)
        self.register_buffer("running_max", None)
        if self.scale is not None and self.role != "weight":
            spec = self.spec
            self.running_min = (self.scale * (spec.qmin - self.zero_point)).double()
            self.running_max = (self.scale * (spec.qmax - self.zero_point)).double()
        self.learned = self.method == "lsq" or (self.method == "pact" and self.role != "weight")
        if self.method == "pact" and self.role != "weight" and not isinstance(self.spec.granularity, PerTensor):
            raise ValueError(f"'{self.name}': PACT learns one clipping level per tensor, the recipe asks "
                             f"{self.spec.granularity}")
        # the learned quantity: LSQ's step (qparam shape), PACT's α (a scalar); shapes are known
        # now for weights and per-tensor activations, values come from the first range
        self.register_buffer("two_sided", torch.tensor(False))
        if self.learned:
            shape = () if self.role != "weight" or self.scale is None else tuple(self.scale.shape)
            if self.method == "lsq" and self.role != "weight" and not isinstance(self.spec.granularity, PerTensor):
                raise ValueError(f"'{self.name}': LSQ learns activation steps per tensor here, the recipe asks "
                                 f"{self.spec.granularity}")
            self.learned_value = nn.Parameter(torch.ones(shape))
            self.register_buffer("initialized", torch.tensor(False))
            if self.scale is not None:
                self._init_learned(self.scale, self.zero_point)

    # ---- state ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_learned(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        spec = self.spec
        if self.method == "lsq":
            self.learned_value.copy_(scale.reshape(self.learned_value.shape))
            self.zero_point = zero_point.detach().clone()
        else:  # pact: α from the range the grid covers
            lo = float((scale * (spec.qmin - zero_point)).min())
            hi = float((scale * (spec.qmax - zero_point)).max())
            self.two_sided.fill_(lo < 0)
            self.learned_value.fill_(max(hi, -lo) if lo < 0 else hi)
        self.initialized.fill_(True)

    def _pact_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.learned_value.detach().clamp_min(_EPS)
        lo = -alpha if bool(self.two_sided) else torch.zeros_like(alpha)
        return choose_qparams(lo, alpha, self.spec)

    @torch.no_grad()
    def sync(self) -> None:
        """``scale`` / ``zero_point`` from the learned value (after an optimizer step)."""
        if self.learned and bool(self.initialized):
            if self.method == "lsq":
                self.scale = self.learned_value.detach().clamp_min(_EPS).clone()
            else:
                self.scale, self.zero_point = self._pact_qparams()

    def frozen(self) -> TensorQuantizer:
        """A plain quantizer holding this one's current grid (what ``fewbits.qat.finish`` keeps)."""
        self.sync()
        plain = TensorQuantizer(self.recipe, self.name, self.role)
        plain.enabled = self.enabled
        if self.scale is not None:
            plain.set_qparams(self.scale.detach().clone(), self.zero_point.detach().clone())
        return plain

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Move to a ``bits``-wide grid (progressive quantization): a learned step is rescaled to
        span the same range on the new number of levels; other grids refit on the next step."""
        from dataclasses import replace

        old = self.spec
        new = replace(old, bits=bits)  # QuantSpec validates the width
        self.recipe = replace(self.recipe, spec=new)
        if self.method == "lsq" and bool(self.initialized):
            self.learned_value.mul_((old.qmax - old.qmin) / (new.qmax - new.qmin))
            if self.zero_point is not None and self.role != "weight":  # keep the zero's real position
                frac = (self.zero_point.float() - old.qmin) / (old.qmax - old.qmin)
                self.zero_point = (new.qmin + torch.round(frac * (new.qmax - new.qmin))).to(torch.int32)
        if self.learned:
            self.sync()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.observer is not None:
            return super().forward(x)
        if not self.training:
            if self.role == "weight" and not self.learned:
                self.set_from(x)  # weights moved since the last step
            self.sync()
            return super().forward(x)
        if self.role == "weight" and not self.learned:
            self.set_from(x)
            return self._estimated(x)
        if self.method == "ste":
            self._track_range(x)
            return self._estimated(x)
        if not bool(self.initialized):
            lo, hi = self._batch_range(x)
            self._init_learned(*choose_qparams(lo.float(), hi.float(), self.spec))
        return self._lsq(x) if self.method == "lsq" else self._pact(x)

    def _estimated(self, x):
        return fake_quantize_estimated(x, self.scale, self.zero_point, self.spec, self.estimator, self.temperature)

    @torch.no_grad()
    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = row_range(to_rows(x.detach(), self.spec.granularity), self.name)
        shape = tuple(x.shape)
        return global_range(from_rows(lo, shape, self.spec.granularity), from_rows(hi, shape, self.spec.granularity))

    @torch.no_grad()
    def _track_range(self, x: torch.Tensor) -> None:
        if not self.ranges_frozen or self.running_min is None:
            lo, hi = self._batch_range(x)
            if self.running_min is None:
                self.running_min, self.running_max = lo, hi
            elif not self.ranges_frozen:
                self.running_min += self.momentum * (lo - self.running_min)
                self.running_max += self.momentum * (hi - self.running_max)
        self.scale, self.zero_point = choose_qparams(self.running_min.float(), self.running_max.float(), self.spec)

    def _lsq(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        shape = tuple(x.shape)
        z = self.zero_point
        per_step = x.numel() / max(self.learned_value.numel(), 1) if self.role == "weight" else x[0].numel()
        positive = float((spec.qmax - z).float().max().clamp_min(1))
        step = grad_scale(self.learned_value.clamp_min(_EPS), 1.0 / math.sqrt(per_step * positive))
        s = expand(step, shape, spec.granularity)
        zf = expand(z.float(), shape, spec.granularity)
        level = round_pass(torch.clamp(x.float() / s + zf, spec.qmin, spec.qmax))
        self.scale = step.detach().clone()
        return ((level - zf) * s).to(x.dtype)

    def _pact(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.learned_value
        lo = -alpha if bool(self.two_sided) else torch.zeros_like(alpha)
        y = torch.minimum(torch.maximum(x, lo), alpha)
        self.scale, self.zero_point = self._pact_qparams()
        # y lies on the grid's range: the rounding passes straight through, α gets its gradient
        # from the clipping alone (PACT's estimator)
        return y + (fake_quantize_estimated(y.detach(), self.scale, self.zero_point, self.spec) - y).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, QAT {self.method}" + (f" ({self.estimator} STE)" if not self.learned else "")
