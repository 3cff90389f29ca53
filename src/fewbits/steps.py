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


# Names used in recipe files and on the command line; dispatch elsewhere is by type.
STEPS = {"smoothquant": SmoothQuant, "bc": BiasCorrection}
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
    return [step_from_dict(name) for name in names]
