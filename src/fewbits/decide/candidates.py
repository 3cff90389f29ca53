"""The formats a layer may be given when fewbits decides per-layer precision: each is a name, the
:class:`LayerRecipe` it puts on a layer of each type, and the widths it costs.

``float`` keeps the layer as it is. The others are the built-in recipes' layer grids (weights
per output channel unless said otherwise, inputs uint8 per tensor, static):

    w8a8, w4a8        int8 / int4 weights, uint8 inputs: integer GEMMs
    w8                int8 weights only
    w4-g128           int4 weights in groups of 128 along the input, weights only (the last group
                      of an input that is no multiple of 128 is shorter)
    w3, w2            3- / 2-bit uniform weights only
    w4-kmeans, w4-apot, w3-pow2, w2-ternary
                      non-uniform weights only (where a layer takes a level grid)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..recipe import _ACT_STATIC, BUILTIN_RECIPES, LayerRecipe, Recipe, TensorRecipe
from ..spec import PerChannel, QuantSpec

LAYER_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Embedding")


@dataclass(frozen=True)
class Candidate:
    """One format: ``layer`` for every layer type (``None``: float), its weight and activation
    widths (``None``: float) — what the size and BOPs of a layer in it are computed from."""

    name: str
    layer: Optional[LayerRecipe]
    weight_bits: Optional[int]
    act_bits: Optional[int]

    @property
    def domain(self) -> str:
        """How the layer runs deployed: ``integer`` (an integer GEMM), ``weight`` (integer
        weights dequantized at run time, a float GEMM) or ``float`` (float weights: fp32, or
        levels decoded into float constants)."""
        if self.act_bits is not None:
            return "integer"
        spec = None if self.layer is None else self.layer.weight.spec
        return "weight" if isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerChannel) else "float"

    def recipe(self) -> Recipe:
        """Every layer in this format (embeddings too, where the format has no input grid), no ops
        between layers, no algorithm steps: the format alone."""
        if self.layer is None:
            return Recipe(f"candidate-{self.name}", ())
        embed = LayerRecipe(weight=self.layer.weight)
        return Recipe(f"candidate-{self.name}",
                      tuple((t, embed if t == "Embedding" else self.layer) for t in LAYER_KINDS))


def _from_builtin(name: str, weight_bits: int, act_bits: Optional[int]) -> Candidate:
    return Candidate(name, dict(BUILTIN_RECIPES[name].by_type)["Linear"], weight_bits, act_bits)


def _weights_only(name: str, bits: int) -> Candidate:
    return Candidate(name, LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=PerChannel(0)))), bits,
                     None)


CANDIDATES = {
    "float": Candidate("float", None, None, None),
    "w8a8": _from_builtin("w8a8", 8, 8),
    "w4a8": _from_builtin("w4a8", 4, 8),
    "w8": _from_builtin("w8", 8, None),
    "w4-g128": _from_builtin("w4-g128", 4, None),
    "w3": _weights_only("w3", 3),
    "w2": _weights_only("w2", 2),
    "w4-kmeans": _from_builtin("w4-kmeans", 4, None),
    "w4-apot": _from_builtin("w4-apot", 4, None),
    "w3-pow2": _from_builtin("w3-pow2", 3, None),
    "w2-ternary": _from_builtin("w2-ternary", 2, None),
}
DEFAULT_CANDIDATES = ("float", "w8a8", "w4a8", "w8", "w4-g128", "w3", "w2")
DOMAINS = ("float", "integer", "weight")
# the format a domain's neighbour pairs are timed in (fewbits.decide.latency)
DOMAIN_FORMATS = {"float": "float", "integer": "w8a8", "weight": "w8"}


def get_candidates(names) -> list[Candidate]:
    """The candidates named (a comma-separated string or a list), checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate formats {unknown}; known: {list(CANDIDATES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate formats listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    if not names:
        raise ValueError("no candidate formats given")
    return [CANDIDATES[n] for n in names]


def exact_pattern(name: str) -> str:
    """A glob matching ``name`` only (``[`` is the one metacharacter a module path can hold)."""
    return name.replace("[", "[[]")


def formats_recipe(formats: dict, outputs=(), embeddings=(), name: str = "mixed") -> Recipe:
    """A recipe giving each layer its format by exact name, the layers in ``outputs`` a uint8
    output grid of their own (so that ONNX Runtime runs a convolution on integers), the
    ``embeddings`` their format's weights only; no ops between layers, no algorithm steps."""
    by_name = []
    for layer, cand in formats.items():
        recipe = CANDIDATES[cand].layer
        if layer in embeddings and recipe is not None:
            recipe = LayerRecipe(weight=recipe.weight)
        elif layer in outputs:
            recipe = replace(recipe, output=_ACT_STATIC)
        by_name.append((exact_pattern(layer), recipe))
    return Recipe(name, (), tuple(by_name))
