"""Post-training algorithm steps as frozen data: what to run and with which hyperparameters.

A step object is handed to ``fewbits.apply(qmodel, step, batches)`` or listed in a recipe's
``steps`` (run by ``calibrate`` before ranges are observed). Defaults are the papers'. The math
and the drivers live in ``fewbits.algorithms``; this module is plain data so recipes can hold
steps without importing torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

    Args:
        alpha: migration strength in [0, 1]; the paper's default 0.5. ``None`` searches
            ``alpha_grid`` per layer for the smallest quantized-output error on calibration rows.
        alpha_grid: candidate strengths for the search.
        samples: input rows kept per layer to score the candidates.
        layers: glob of layer names to smooth (linear layers with an input quantizer).
    """

    alpha: Optional[float] = 0.5
    alpha_grid: tuple = tuple(i / 20 for i in range(21))
    samples: int = 2048
    layers: str = "*"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        for a in ((self.alpha,) if self.alpha is not None else ()) + self.alpha_grid:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"smoothquant alpha must lie in [0, 1], got {a}")
        if not self.alpha_grid:
            raise ValueError("smoothquant alpha_grid is empty")
        if self.samples < 1:
            raise ValueError(f"smoothquant samples must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class BiasCorrection:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019, section 4.2): after calibration, shift each
    layer's bias by the per-channel mean of ``y_float − y_quantized`` on calibration data, layer
    by layer in execution order with the earlier layers already corrected.

    Args:
        layers: glob of layer names to correct.
    """

    layers: str = "*"
    needs_ranges = True  # class attribute: runs after the activation ranges are calibrated


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
        layers: glob of layer names; a pair is equalized when both of its layers match.
    """

    iterations: int = 100
    tolerance: float = 1e-6
    high_bias_absorption: bool = True
    relu6: str = "relu"
    layers: str = "*"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"cle iterations must be >= 1, got {self.iterations}")
        if not self.tolerance > 0:
            raise ValueError(f"cle tolerance must be > 0, got {self.tolerance}")
        if self.relu6 not in ("relu", "keep"):
            raise ValueError(f"cle relu6 must be 'relu' or 'keep', got {self.relu6!r}")


# Names used in recipe files and on the command line; dispatch elsewhere is by type.
STEPS = {"cle": CrossLayerEqualization, "smoothquant": SmoothQuant, "bc": BiasCorrection}
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


def check_order(steps) -> None:
    """Reject orders that undo or invalidate an earlier step, with the reason."""
    names = [STEP_NAMES[type(s)] for s in steps]
    for i, step in enumerate(steps):
        later = names[i + 1:]
        if getattr(step, "needs_ranges", False) and any(not getattr(s, "needs_ranges", False) for s in steps[i + 1:]):
            raise ValueError(f"'{names[i]}' corrects the calibrated model, so it must come after "
                             f"{[n for n, s in zip(later, steps[i + 1:]) if not getattr(s, 'needs_ranges', False)]}, "
                             "which change the weights before calibration")
        if names[i] == "smoothquant" and "cle" in later:
            raise ValueError("'cle' after 'smoothquant' would rescale the smoothed weights: put cle first")
