"""Post-training algorithm steps as frozen data: what to run and with which hyperparameters.

A step object is handed to ``fewbits.apply(qmodel, step, batches)`` or listed in a recipe's
``steps`` (run by ``calibrate`` before ranges are observed). Defaults are the papers'. The math
and the drivers live in ``fewbits.algorithms``; this module is plain data so recipes can hold
steps without importing torch.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Optional

# A step's ``layers``: one glob of layer names, or a list of them (a layer is chosen when any
# matches; ``fewbits.auto`` names the layers it gives an algorithm one by one).
Layers = str | tuple


def layer_globs(layers) -> tuple:
    """``layers`` as a tuple of globs, checked (a step's ``layers`` field, a string or a list)."""
    globs = (layers,) if isinstance(layers, str) else tuple(layers) if isinstance(layers, (list, tuple)) else None
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise ValueError(f"a step's layers is a glob of layer names or a non-empty list of them, got {layers!r}")
    return globs


def layer_matches(name: str, layers) -> bool:
    """Whether layer ``name`` is among a step's ``layers``."""
    return any(fnmatch.fnmatchcase(name, g) for g in layer_globs(layers))


def _check_layers(step) -> None:
    """A list of globs is kept as a tuple (steps are frozen and hashable)."""
    globs = layer_globs(step.layers)
    object.__setattr__(step, "layers", globs[0] if isinstance(step.layers, str) else globs)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

    Args:
        alpha: migration strength in [0, 1]; the paper's default 0.5. ``None`` searches
            ``alpha_grid`` per layer for the smallest quantized-output error on calibration rows.
        alpha_grid: candidate strengths for the search.
        samples: input rows kept per layer to score the candidates.
        layers: glob of layer names (or a list of globs) to smooth (linear layers with an input quantizer).
    """

    alpha: Optional[float] = 0.5
    alpha_grid: tuple = tuple(i / 20 for i in range(21))
    samples: int = 2048
    layers: Layers = "*"

    def __post_init__(self) -> None:
        _check_layers(self)
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        for a in ((self.alpha,) if self.alpha is not None else ()) + self.alpha_grid:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"smoothquant alpha must lie in [0, 1], got {a}")
        if not self.alpha_grid:
            raise ValueError("smoothquant alpha_grid is empty")
        if self.samples < 1:
            raise ValueError(f"smoothquant samples must be >= 1, got {self.samples}")


BC_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@dataclass(frozen=True)
class BiasCorrection:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019, section 4.2): after calibration, shift each
    layer's bias by the per-channel mean of ``y_float − y_quantized`` on calibration data, layer
    by layer in execution order with the earlier layers already corrected.

    ``mode="analytic"`` is the paper's data-free variant: the shift ``(W̃ − W)·E[x]`` of the weight
    error, with ``E[x]`` from the folded BatchNorm before the layer (``β``, ``|γ|``) through its
    ReLU / ReLU6; layers whose input has no such BatchNorm are listed and left alone.

    Args:
        layers: glob of layer names (or a list of globs) to correct.
        mode: ``"empirical"`` (calibration data) or ``"analytic"`` (BatchNorm statistics).
        types: the layer types to correct (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
            ``"Conv3d"``); empty: all of them.
        required: ``False`` for a step a recipe adds on its own (the default ``w8a8``'s, for
            convolutions): left out where it cannot run — quantization-aware training started
            without calibration batches, which learns the biases instead — and not listed when it
            found no layer to correct.
    """

    layers: Layers = "*"
    mode: str = "empirical"
    types: tuple = ()
    required: bool = True
    needs_ranges = True  # class attribute: runs after the activation ranges are calibrated

    def __post_init__(self) -> None:
        _check_layers(self)
        if self.mode not in ("empirical", "analytic"):
            raise ValueError(f"bc mode must be 'empirical' or 'analytic', got {self.mode!r}")
        types = (self.types,) if isinstance(self.types, str) else tuple(self.types)
        unknown = [t for t in types if t not in BC_TYPES]
        if unknown:
            raise ValueError(f"bc types must be among {list(BC_TYPES)}, got {unknown}")
        object.__setattr__(self, "types", types)
        if not isinstance(self.required, bool):
            raise ValueError(f"bc required must be true or false, got {self.required!r}")


@dataclass(frozen=True)
class CrossLayerEqualization:
    """Cross-layer equalization with high-bias absorption (Nagel et al., ICCV 2019, section 4.1):
    rescale the channels between consecutive conv / linear layers joined by ReLU, ReLU6 or
    nothing, so both layers' per-channel weight ranges become equal, then move large biases into
    the next layer. Runs before the activation ranges are observed.

    Args:
        iterations: at most this many sweeps over the pairs (chains need several to settle).
        tolerance: stop once no scale of a sweep differs from 1 by more than this.
        high_bias_absorption: absorb ``max(0, mean − 3 std)`` of each ReLU input into the next layer.
        relu6: ``"relu"`` replaces ReLU6 between equalized layers by ReLU (the paper's choice: ReLU6
            is not positively homogeneous); ``"keep"`` leaves such pairs alone.
        layers: glob of layer names (or a list of globs); a pair is equalized when both of its layers match.
    """

    iterations: int = 100
    tolerance: float = 1e-6
    high_bias_absorption: bool = True
    relu6: str = "relu"
    layers: Layers = "*"

    def __post_init__(self) -> None:
        _check_layers(self)
        if self.iterations < 1:
            raise ValueError(f"cle iterations must be >= 1, got {self.iterations}")
        if not self.tolerance > 0:
            raise ValueError(f"cle tolerance must be > 0, got {self.tolerance}")
        if self.relu6 not in ("relu", "keep"):
            raise ValueError(f"cle relu6 must be 'relu' or 'keep', got {self.relu6!r}")


@dataclass(frozen=True)
class AdaRound:
    """AdaRound (Nagel et al., ICML 2020): learn for every weight whether to round up or down by
    reconstructing each layer's fp32 output from the quantized model's inputs, layer by layer in
    execution order. Runs after the activation ranges are calibrated (the inputs are quantized).

    Args:
        iterations: optimisation steps per layer (the paper: 10,000; AIMET's default too).
        batch_size: calibration samples per step (images, or rows for linear layers on sequences).
        lr: Adam's learning rate on ``V``.
        reg_weight: λ, the weight of the rounding regulariser.
        beta_start, beta_end: the annealed exponent β of the regulariser.
        warmup: share of the iterations without the regulariser.
        seed: the sampling of batches.
        layers: glob of layer names (or a list of globs).
    """

    iterations: int = 10000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    seed: int = 0
    layers: Layers = "*"
    needs_ranges = True

    def __post_init__(self) -> None:
        _check_layers(self)
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError(f"adaround iterations and batch_size must be >= 1, got {self.iterations}, {self.batch_size}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"adaround warmup must lie in [0, 1), got {self.warmup}")
        if not (self.lr > 0 and self.reg_weight >= 0 and self.beta_start >= self.beta_end > 0):
            raise ValueError("adaround needs lr > 0, reg_weight >= 0 and beta_start >= beta_end > 0")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al., ICLR 2023): quantize each weight column in turn and spread its
    rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
    layer's calibration inputs; layer by layer in execution order, each layer's inputs coming
    from the already-quantized layers before it. Runs after calibration.

    Args:
        damp: dampening λ, as a share of the mean Hessian diagonal.
        block_size: columns per lazy batch update.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        layers: glob of layer names (or a list of globs) (linear layers and ungrouped 2-d convolutions).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    layers: Layers = "*"
    needs_ranges = True

    def __post_init__(self) -> None:
        _check_layers(self)
        if not self.damp > 0 or self.block_size < 1:
            raise ValueError(f"gptq needs damp > 0 and block_size >= 1, got {self.damp}, {self.block_size}")


@dataclass(frozen=True)
class AWQ:
    """AWQ (Lin et al., MLSys 2024): for weight-only layers, scale the weight columns by the
    activation magnitude to the power α (searched per layer) and divide the input by the same,
    so the salient weights lose less to rounding. Runs before calibration.

    Args:
        grid: number of α values tried in [0, 1] (the paper: 20).
        samples: input rows kept per layer to score the candidates.
        layers: glob of layer names (or a list of globs) (linear layers without an input quantizer).
    """

    grid: int = 20
    samples: int = 2048
    layers: Layers = "*"

    def __post_init__(self) -> None:
        _check_layers(self)
        if self.grid < 1 or self.samples < 1:
            raise ValueError(f"awq grid and samples must be >= 1, got {self.grid}, {self.samples}")


@dataclass(frozen=True)
class StochasticRounding:
    """Round every weight up with probability equal to its fractional part (once, seeded): the
    unbiased baseline the AdaRound paper compares nearest rounding with.

    Args:
        seed: the draw.
        layers: glob of layer names (or a list of globs).
    """

    seed: int = 0
    layers: Layers = "*"

    def __post_init__(self) -> None:
        _check_layers(self)


# Names used in recipe files and on the command line; dispatch elsewhere is by type.
STEPS = {"cle": CrossLayerEqualization, "smoothquant": SmoothQuant, "stochastic": StochasticRounding,
         "adaround": AdaRound, "awq": AWQ, "gptq": GPTQ, "bc": BiasCorrection}
# steps that choose the weights (later steps must not be ones that fit the weights they find)
_SETS_WEIGHTS = {"cle", "smoothquant", "awq", "stochastic", "adaround", "gptq"}
_ROUNDS = ("stochastic", "adaround", "gptq")  # steps that choose each weight's grid point
STEP_NAMES = {cls: name for name, cls in STEPS.items()}


def step_to_dict(step) -> dict:
    return {"name": STEP_NAMES[type(step)], **{k: list(v) if isinstance(v, tuple) else v
                                             for k, v in dataclasses.asdict(step).items()}}


def step_from_dict(data) -> object:
    """A step from ``{"name": ..., **hyperparameters}``; unknown names and keys are errors."""
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a recipe step is a name or a dict with a 'name', got {data!r}")
    name = data["name"]
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; known: {sorted(STEPS)}")
    cls = STEPS[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed - {"name"})
    if unknown:
        raise ValueError(f"step {name!r}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**{k: v for k, v in data.items() if k != "name"})


def parse_steps(text: str) -> list:
    """Comma-separated step names (the CLI's ``--algo``), each with its defaults, in order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--algo lists {repeated} more than once: each step runs once")
    steps = [step_from_dict(name) for name in names]
    check_order(steps)
    return steps


def with_steps(recipe_steps, given) -> tuple:
    """A recipe's steps with the ``given`` ones (the CLI's ``--algo``) added: a recipe step of the
    same algorithm is replaced by the given one; given steps that run before calibration come
    first, those that need the calibrated ranges last. The order is then checked."""
    names = {STEP_NAMES[type(s)] for s in given}
    kept = [s for s in recipe_steps if STEP_NAMES[type(s)] not in names]
    steps = ([s for s in given if not getattr(s, "needs_ranges", False)] + kept +
             [s for s in given if getattr(s, "needs_ranges", False)])
    check_order(steps)
    return tuple(steps)


def check_order(steps) -> None:
    """Reject orders that undo or invalidate an earlier step, with the reason."""
    names = [STEP_NAMES[type(s)] for s in steps]
    for i, step in enumerate(steps):
        later = names[i + 1:]
        if names[i] == "bc" and _SETS_WEIGHTS & set(later):
            raise ValueError(f"'bc' corrects the biases for the weights as they are, so it must come after "
                             f"{[n for n in later if n in _SETS_WEIGHTS]}, which change the weights")
        if names[i] in _ROUNDS and set(_ROUNDS) & set(later):
            raise ValueError(f"'{names[i]}' and {[n for n in later if n in _ROUNDS]} both choose "
                             "the rounding of the same weights: pick one")
        if names[i] in ("smoothquant", "awq") and "cle" in later:
            raise ValueError(f"'cle' after '{names[i]}' would rescale the scaled weights: put cle first")
        if names[i] in _ROUNDS and "awq" in later:
            raise ValueError(f"'awq' after '{names[i]}' would rescale the rounded weights: put awq first")
        if getattr(step, "needs_ranges", False) and any(not getattr(s, "needs_ranges", False) for s in steps[i + 1:]):
            raise ValueError(f"'{names[i]}' works on the calibrated model, so it must come after "
                             f"{[n for n, s in zip(later, steps[i + 1:]) if not getattr(s, 'needs_ranges', False)]}, "
                             "which run before calibration")
