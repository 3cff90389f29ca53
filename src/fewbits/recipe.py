"""Recipes: which tensors of which layers get which grid, and how their ranges are calibrated.

A recipe is frozen data. It gives a :class:`LayerRecipe` (weight / input / output
:class:`TensorRecipe`, each optional) to every layer type fewbits can swap, with per-name glob
overrides (``None`` keeps a layer float) and include / exclude lists. Built-ins::

    w8a8          int8 per-channel symmetric weights, uint8 per-tensor asymmetric static inputs, the
                  additions / products / pools / concatenations between layers on the same grid,
                  bias correction for convolutions
    w8a8-dynamic  the same weights, inputs quantized per batch from their own min/max
    w8a8-smoothquant  w8a8 after SmoothQuant with a per-layer searched strength (transformers)
    w8a8-bc       w8a8, then empirical bias correction once the ranges are calibrated (CNNs)
    w8            int8 per-channel weights only
    w4a8          int4 per-channel weights, uint8 static inputs
    w4-g128       int4 weights in groups of 128 along the input, weights only
    wB-gN[-asym]  the same family by name (not listed): B = 2…8 bits, groups of N ≥ 2 along the
                  input, symmetric, or asymmetric with a zero point per group (``w3-g128``,
                  ``w4-g32-asym``); ONNX Runtime runs 2…4-bit groups on its 4-bit kernel
    w4-kmeans, w4-apot, w3-pow2, w2-ternary, w1-binary
                  non-uniform weights only, per output channel: 16 k-means centroids, additive
                  powers of two, powers of two, TWN ternary, XNOR-Net binary (±mean|w|)

Transformer-aware defaults: embedding tables (word and position) get one int8 scale per row;
the two-row token-type table stays float (3 KB, and its error would add to every token);
LayerNorm, softmax and the attention-mask addition are never swapped in the first place.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from .observe.methods import CalibrationMethod
from .spec import (AnySpec, APoTSpec, BinarySpec, CodebookSpec, LevelSpec, PerChannel, PerGroup, PerTensor, PerToken,
                   Pow2Spec, QuantSpec, TernarySpec, spec_from_dict)
from .steps import STEP_NAMES, STEPS, BiasCorrection, SmoothQuant, step_from_dict, step_to_dict

RECIPE_VERSION = 1
# the recipe keys of the ops between layers (each an activation TensorRecipe or None)
OP_KEYS = ("adds", "pools", "concats", "matmuls", "muls", "conv_outputs")
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Embedding")


@dataclass(frozen=True)
class TensorRecipe:
    """One tensor's grid and calibration: a static range from ``method`` or a per-batch one.
    ``spec`` is a uniform :class:`QuantSpec` or a non-uniform :class:`LevelSpec` (fitted to the
    weight itself; ``method`` does not apply)."""

    spec: AnySpec
    method: str = "minmax"
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.spec, (QuantSpec, LevelSpec)):
            raise ValueError(f"a tensor recipe's spec is a QuantSpec or a LevelSpec, got {self.spec!r}")
        object.__setattr__(self, "method", CalibrationMethod.parse(self.method).value)
        if isinstance(self.spec, LevelSpec) and self.dynamic:
            raise ValueError(f"{self.spec.kind} grids are fitted once from the weight: dynamic must be False")
        if isinstance(self.spec, LevelSpec) and self.method != "minmax":
            raise ValueError(f"{self.spec.kind} grids choose their own levels: method {self.method!r} applies to "
                             "uniform grids (leave it at 'minmax')")
        if self.dynamic and not isinstance(self.spec.granularity, (PerTensor, PerToken)):
            raise ValueError("dynamic activation quantization is per tensor or per token: use granularity "
                             "PerTensor() or PerToken()")
        if isinstance(self.spec.granularity, PerToken) and not self.dynamic:
            raise ValueError("per-token grids come from each batch's own rows: PerToken() needs dynamic=True")

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "method": self.method, "dynamic": self.dynamic}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorRecipe":
        _reject_unknown("tensor recipe", data, {"spec", "method", "dynamic"})
        return cls(spec_from_dict(data["spec"]), data.get("method", "minmax"), data.get("dynamic", False))


def level_role_error(spec, role: str) -> str:
    """Why ``spec`` cannot quantize a layer's ``role`` tensor (``weight``, ``input``, ``output``);
    empty when it can. Non-uniform grids quantize weights; the sign is the one activation grid."""
    if not isinstance(spec, LevelSpec) or role == "weight":
        return ""
    if role == "input" and isinstance(spec, BinarySpec) and not spec.scaled:
        return ""
    return (f"{spec.kind} grids quantize weights; an activation grid can only be BinarySpec(scaled=False) "
            "on a layer's input")


@dataclass(frozen=True)
class LayerRecipe:
    """What to quantize in one layer; ``None`` leaves that tensor float."""

    weight: Optional[TensorRecipe] = None
    input: Optional[TensorRecipe] = None
    output: Optional[TensorRecipe] = None

    def __post_init__(self) -> None:
        for role in ("input", "output"):
            t = getattr(self, role)
            why = level_role_error(t.spec, role) if t is not None else ""
            if why:
                raise ValueError(f"{why}, got {t.spec!r} for the {role}")

    def to_dict(self) -> dict:
        return {k: (getattr(self, k).to_dict() if getattr(self, k) else None) for k in ("weight", "input", "output")}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerRecipe":
        _reject_unknown("layer recipe", data, {"weight", "input", "output"})
        return cls(**{k: TensorRecipe.from_dict(v) if v else None for k, v in data.items()})


@dataclass(frozen=True)
class Recipe:
    """Layer recipes by module type, overridden by name globs (first match wins)."""

    name: str
    by_type: tuple[tuple[str, LayerRecipe], ...]
    by_name: tuple[tuple[str, Optional[LayerRecipe]], ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    version: int = field(default=RECIPE_VERSION)
    steps: tuple = ()  # algorithm steps (fewbits.steps) that calibrate runs before observing ranges
    adds: Optional[TensorRecipe] = None  # quantize tensor additions (residuals) on this grid
    pools: Optional[TensorRecipe] = None  # quantize average pooling's input and output on this grid
    concats: Optional[TensorRecipe] = None  # quantize concatenations' operands and result on this grid
    matmuls: Optional[TensorRecipe] = None  # quantize both operands of activation × activation products
    muls: Optional[TensorRecipe] = None  # quantize elementwise products (gates, squeeze-excitation) on this grid
    # quantize a convolution's output where a float op reads it (a norm, a sigmoid): the runtime's
    # integer convolution needs a quantized output
    conv_outputs: Optional[TensorRecipe] = None

    def __post_init__(self) -> None:
        # by_type is a mapping: keep it in one canonical order so equal recipes compare equal
        object.__setattr__(self, "by_type", tuple(sorted(self.by_type, key=lambda kv: kv[0])))
        for type_name, _ in self.by_type:
            if type_name not in LAYER_TYPES:
                raise ValueError(f"recipe '{self.name}': layer type must be one of {list(LAYER_TYPES)}, got {type_name!r}")
        for step in self.steps:
            if type(step) not in STEP_NAMES:
                raise ValueError(f"recipe '{self.name}': a step must be one of {sorted(STEPS)}, got {step!r}")
        for key, op in self.ops().items():
            if op is not None and not isinstance(op.spec, QuantSpec):
                raise ValueError(f"recipe '{self.name}': {key} are quantized on uniform grids (QuantSpec), "
                                 f"got {op.spec.kind}")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe '{self.name}': version must be {RECIPE_VERSION}, got {self.version}")

    def for_layer(self, name: str, type_name: str) -> tuple[Optional[LayerRecipe], str]:
        """The layer recipe for module ``name`` of ``type_name``, or ``None`` and the reason."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return None, "not in the recipe's include list"
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None, "excluded by the recipe"
        for pattern, layer in self.by_name:
            if fnmatch.fnmatchcase(name, pattern):
                return layer, "" if layer else f"kept float by the recipe ('{pattern}')"
        layer = dict(self.by_type).get(type_name)
        return layer, "" if layer else f"the recipe has no rule for {type_name}"

    @property
    def needs_calibration(self) -> bool:
        if self.steps or any(t is not None and not t.dynamic for t in self.ops().values()):
            return True
        layers = [lr for _, lr in self.by_type] + [lr for _, lr in self.by_name if lr]
        return any(t and not t.dynamic and isinstance(t.spec, QuantSpec) for lr in layers for t in (lr.input, lr.output))

    def ops(self) -> dict[str, Optional[TensorRecipe]]:
        """The grids of the quantized ops between layers, by recipe key."""
        return {k: getattr(self, k) for k in OP_KEYS}

    def to_dict(self) -> dict:
        return {
            "version": self.version, "name": self.name,
            "by_type": {t: lr.to_dict() for t, lr in self.by_type},
            "by_name": [[p, lr.to_dict() if lr else None] for p, lr in self.by_name],
            "include": list(self.include), "exclude": list(self.exclude),
            "steps": [step_to_dict(s) for s in self.steps],
            **{k: t.to_dict() if t else None for k, t in self.ops().items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        _reject_unknown("recipe", data, {"version", "name", "by_type", "by_name", "include", "exclude", "steps",
                                         *OP_KEYS})
        return cls(
            name=data.get("name", "custom"),
            by_type=tuple((t, LayerRecipe.from_dict(lr)) for t, lr in data.get("by_type", {}).items()),
            by_name=tuple((p, LayerRecipe.from_dict(lr) if lr else None) for p, lr in data.get("by_name", [])),
            include=tuple(data.get("include", ("*",))), exclude=tuple(data.get("exclude", ())),
            version=data.get("version", None),
            steps=tuple(step_from_dict(s) for s in data.get("steps", ())),
            **{k: TensorRecipe.from_dict(data[k]) if data.get(k) else None for k in OP_KEYS},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))


def _reject_unknown(what: str, data: dict, allowed: set) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"a {what} is read from a dict, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; allowed: {sorted(allowed)}")


# ---- built-ins -------------------------------------------------------------------------------
def _weights(bits: int, granularity) -> TensorRecipe:
    return TensorRecipe(QuantSpec(bits=bits, granularity=granularity))


_ACT_STATIC = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")
_ACT_DYNAMIC = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax", dynamic=True)
# one grid per token (row), from each batch: a token with outlier features costs the others nothing
_ACT_PER_TOKEN = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerToken()), "minmax",
                              dynamic=True)
# Embedding tables: one scale per row (token), so a rare token's large vector costs nobody else.
_EMBED_W8 = LayerRecipe(weight=_weights(8, PerChannel(0)))
# The position table (512 rows in MiniLM) is quantized like the word table: measured on
# minilm-wordnet w8a8-dynamic, embedding cosine 0.99294 float vs 0.99291 int8, and 0.59 MB less.
_KEEP_FLOAT_TABLES = (("*token_type_embeddings*", None),)


def _conv_linear(weight: TensorRecipe, act: Optional[TensorRecipe], linear_act: Optional[TensorRecipe] = None) -> tuple:
    """Every layer type on ``weight`` and ``act`` (linear layers on ``linear_act`` when given)."""
    layer = LayerRecipe(weight=weight, input=act)
    linear = layer if linear_act is None else LayerRecipe(weight=weight, input=linear_act)
    return (("Linear", linear), ("Conv1d", layer), ("Conv2d", layer), ("Conv3d", layer), ("ConvTranspose1d", layer),
            ("ConvTranspose2d", layer), ("Embedding", _EMBED_W8))


# the ops between layers that deploy on ONNX Runtime's integer kernels, on the static activation grid
_OPS_STATIC = dict(adds=_ACT_STATIC, pools=_ACT_STATIC, concats=_ACT_STATIC, muls=_ACT_STATIC,
                   conv_outputs=_ACT_STATIC)
# Convolutions' rounding shifts each output channel's mean, and deep CNNs compound the shifts
# (MobileNetV2 probe, w8a8 simulated: 81.6 without, 82.9 with; fp32 83.3 — docs/algorithms.md).
# Linear layers are left alone: on MiniLM the correction lowered the worst-case embedding cosine.
CONV_BIAS_CORRECTION = BiasCorrection(types=("Conv1d", "Conv2d", "Conv3d"), required=False)


BUILTIN_RECIPES = {
    # The default deploys whole: the residual additions, average pools and concatenations between
    # the layers are quantized too, so each layer has a quantized output and ONNX Runtime fuses it
    # (a transformer's residual stream, read by its float norms, stays float: fewbits.wrap.ops).
    # Convolutions get empirical bias correction after calibration (``CONV_BIAS_CORRECTION``).
    "w8a8": Recipe("w8a8", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES,
                   steps=(CONV_BIAS_CORRECTION,), **_OPS_STATIC),
    # Layer inputs only (the default before the additions between layers were quantized): a
    # layer whose output meets a float op dequantizes there.
    "w8a8-inputs": Recipe("w8a8-inputs", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES),
    # ... and the attention products (scores Q·Kᵀ, weights × values: both operands activations)
    "w8a8-matmul": Recipe("w8a8-matmul", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES,
                          matmuls=_ACT_STATIC, **_OPS_STATIC),
    "w8a8-dynamic": Recipe("w8a8-dynamic", _conv_linear(_weights(8, PerChannel(0)), _ACT_DYNAMIC), _KEEP_FLOAT_TABLES),
    # Sequence models: per-token dynamic inputs for the linear layers (convolutions per tensor).
    "w8a8-per-token": Recipe("w8a8-per-token", _conv_linear(_weights(8, PerChannel(0)), _ACT_DYNAMIC, _ACT_PER_TOKEN),
                             _KEEP_FLOAT_TABLES),
    "w8": Recipe("w8", _conv_linear(_weights(8, PerChannel(0)), None), _KEEP_FLOAT_TABLES),
    # Transformers: per-tensor activations lose the few outlier channels of LayerNorm and GELU
    # outputs; a per-layer SmoothQuant strength moves them into the per-channel weight scales.
    "w8a8-smoothquant": Recipe("w8a8-smoothquant", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC),
                               _KEEP_FLOAT_TABLES, steps=(SmoothQuant(alpha=None),)),
    # CNNs: per-channel mean shifts from rounding compound through deep nets (MobileNetV2)
    "w8a8-bc": Recipe("w8a8-bc", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES,
                      steps=(BiasCorrection(),)),
    # Deployment: residual additions quantized too, so the integer model and ONNX Runtime run
    # them on integers (QLinearAdd) and every convolution has a quantized output.
    "w8a8-bc-adds": Recipe("w8a8-bc-adds", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES,
                           steps=(BiasCorrection(),), adds=_ACT_STATIC),
    # ... and average pooling and concatenation: every op the integer model (and ONNX Runtime's
    # QLinear* kernels) can run on integers does.
    "w8a8-bc-int": Recipe("w8a8-bc-int", _conv_linear(_weights(8, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES,
                          steps=(BiasCorrection(),), adds=_ACT_STATIC, pools=_ACT_STATIC, concats=_ACT_STATIC),
    "w4a8": Recipe("w4a8", _conv_linear(_weights(4, PerChannel(0)), _ACT_STATIC), _KEEP_FLOAT_TABLES),
    "w4-g128": Recipe("w4-g128", _conv_linear(_weights(4, PerGroup(128, axis=1)), None), _KEEP_FLOAT_TABLES),
    **{name: Recipe(name, _conv_linear(TensorRecipe(spec), None), _KEEP_FLOAT_TABLES) for name, spec in (
        ("w4-kmeans", CodebookSpec(4, PerChannel(0))), ("w4-apot", APoTSpec(4, PerChannel(0))),
        ("w3-pow2", Pow2Spec(3, PerChannel(0))), ("w2-ternary", TernarySpec(granularity=PerChannel(0))),
        ("w1-binary", BinarySpec(granularity=PerChannel(0))))},
}


def with_calibration(recipe: Recipe, method: str) -> Recipe:
    """The same recipe with every static activation range estimated by ``method``."""
    method = CalibrationMethod.parse(method).value

    def swap(layer: Optional[LayerRecipe]) -> Optional[LayerRecipe]:
        if layer is None:
            return None
        acts = {k: replace(t, method=method) if t and not t.dynamic else t
                for k, t in (("input", layer.input), ("output", layer.output))}
        return replace(layer, **acts)

    ops = {k: replace(t, method=method) if t and not t.dynamic else t for k, t in recipe.ops().items()}
    return replace(recipe, by_type=tuple((t, swap(lr)) for t, lr in recipe.by_type),
                   by_name=tuple((p, swap(lr)) for p, lr in recipe.by_name), **ops)


def with_weight_bits_at_most(recipe: Recipe, bits: int) -> Recipe:
    """The same recipe with the weights of layers that quantize their inputs (the ones an int8
    GEMM runs) capped at ``bits``; embedding tables and weight-only layers keep theirs. For CPUs
    whose int8 kernels saturate beyond 7-bit weights (``fewbits.target.Target.fits_kernels_at``):
    preparing at 7 bits lets calibration-time steps (bias correction) fit the weights that deploy."""

    def cap(layer: Optional[LayerRecipe]) -> Optional[LayerRecipe]:
        if layer is None or layer.weight is None or layer.input is None or layer.weight.spec.bits <= bits:
            return layer
        return replace(layer, weight=replace(layer.weight, spec=replace(layer.weight.spec, bits=bits)))

    return replace(recipe, name=f"{recipe.name}+w{bits}",
                   by_type=tuple((t, cap(lr)) for t, lr in recipe.by_type),
                   by_name=tuple((p, cap(lr)) for p, lr in recipe.by_name))


_GROUPED = re.compile(r"w(\d+)-g(\d+)(-asym)?")


def grouped_recipe(bits: int, group: int, symmetric: bool = True) -> Recipe:
    """Weights only, ``bits`` wide in groups of ``group`` along the input (the ``wB-gN`` names)."""
    if not 2 <= bits <= 8 or group < 2:
        raise ValueError(f"grouped weights need 2 to 8 bits and groups of at least 2, got {bits} bits, group {group}")
    name = f"w{bits}-g{group}" + ("" if symmetric else "-asym")
    spec = QuantSpec(bits=bits, granularity=PerGroup(group, axis=1), symmetric=symmetric)
    return Recipe(name, _conv_linear(TensorRecipe(spec), None), _KEEP_FLOAT_TABLES)


def get_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from itself, a built-in name (or a ``wB-gN[-asym]`` name), or a JSON file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[recipe]
    match = _GROUPED.fullmatch(recipe) if isinstance(recipe, str) else None
    if match:
        return grouped_recipe(int(match[1]), int(match[2]), symmetric=not match[3])
    if isinstance(recipe, str) and recipe.endswith((".json", ".yaml", ".yml")):
        return _read_recipe_file(recipe)
    raise ValueError(f"unknown recipe {recipe!r}; built-ins: {sorted(BUILTIN_RECIPES)}, wB-gN[-asym] "
                     "(grouped weights) or a .json/.yaml recipe file")


def _read_recipe_file(name: str) -> Recipe:
    from pathlib import Path

    path = Path(name)
    if not path.is_file():
        raise ValueError(f"recipe file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ValueError("YAML recipes need pyyaml: pip install pyyaml") from None
            data = yaml.safe_load(text)
        return Recipe.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"recipe file {path}: {err}") from None


def fitted_to(recipe: Recipe, target) -> Recipe:
    """``recipe`` with the weights of integer GEMMs capped at the widest width ``target``'s int8
    kernels run exactly (:meth:`fewbits.target.Target.fits_kernels_at`); unchanged where every
    width runs exactly."""
    bits = target.fits_kernels_at()
    return recipe if bits is None else with_weight_bits_at_most(recipe, bits)
