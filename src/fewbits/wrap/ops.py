"""Quantized tensor operations between layers — additions, average pooling, concatenation —
found with torch.fx.

Each computes the op on quantized operands and quantizes its result, the arithmetic of the
integer op with rescaling (and of ONNX Runtime's QLinearAdd / QLinearAveragePool /
QLinearGlobalAveragePool / QLinearConcat):

* ``QuantAdd``: ``Q_out(Q_a(a) + Q_b(b))`` — residual connections;
* ``QuantPool``: ``Q_out(pool(Q_in(x)))`` for average pooling (module or functional, 1-d / 2-d,
  adaptive or not) — e.g. the global pool before a classifier;
* ``QuantConcat``: ``Q_out(cat(Q_1(x_1), …, Q_n(x_n)))``.

:func:`quantize_ops` swaps pooling modules in place and finds the functional ops (``a + b`` of two
tensors, ``F.avg_pool*`` / ``F.adaptive_avg_pool*``, ``torch.cat``) inside the forward of every
module, the model itself included, traced one level deep (its children are leaves). Each op found
is routed through a new child module and the module becomes a ``torch.fx.GraphModule`` with the
same children and parameter names. A module whose forward torch.fx cannot trace keeps its float
ops and is listed.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..recipe import TensorRecipe
from .quantizer import TensorQuantizer
from .trace import trace_one_level

_ADDS = (operator.add, operator.iadd, torch.add)
_CATS = (torch.cat, torch.concat)
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
# functional pooling → the module computing the same thing (same argument order after the input)
_POOL_FUNCTIONS = {F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d,
                   F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}
# modules whose forward calls none of these ops itself: containers, activations, pools, norms
_LEAVES = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ReLU, nn.ReLU6, nn.GELU, nn.Identity, nn.Dropout,
           nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, *_POOL_MODULES, nn.LayerNorm, nn.modules.batchnorm._BatchNorm,
           nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d)


class QuantAdd(nn.Module):
    """``a + b`` with quantized operands and a quantized result."""

    def __init__(self, recipe: TensorRecipe, name: str) -> None:
        super().__init__()
        self.name = name
        self.a_quantizer = TensorQuantizer(recipe, f"{name}.a", "input")
        self.b_quantizer = TensorQuantizer(recipe, f"{name}.b", "input")
        self.output_quantizer = TensorQuantizer(recipe, f"{name}.output", "output")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.a_quantizer(a) + self.b_quantizer(b))


class QuantPool(nn.Module):
    """Average pooling (``pool``: one of torch's average-pooling modules) of a quantized input,
    quantized again: the mean of integers generally falls between two levels."""

    def __init__(self, recipe: TensorRecipe, name: str, pool: nn.Module) -> None:
        super().__init__()
        if not isinstance(pool, _POOL_MODULES):
            raise ValueError(f"'{name}': QuantPool wraps average pooling, got {type(pool).__name__}")
        if getattr(pool, "divisor_override", None):
            raise ValueError(f"'{name}': average pooling with divisor_override is not supported")
        self.name = name
        self.pool = pool
        self.input_quantizer = TensorQuantizer(recipe, f"{name}.input", "input")
        self.output_quantizer = TensorQuantizer(recipe, f"{name}.output", "output")

    @property
    def is_global(self) -> bool:
        """Adaptive pooling to one value per channel (GlobalAveragePool)."""
        size = getattr(self.pool, "output_size", None)
        return isinstance(self.pool, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and \
            all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.pool(self.input_quantizer(x)))


class QuantConcat(nn.Module):
    """``torch.cat`` of quantized operands along ``dim``, quantized onto one output grid."""

    def __init__(self, recipe: TensorRecipe, name: str, n_inputs: int, dim: int) -> None:
        super().__init__()
        self.name, self.dim = name, dim
        self.input_quantizers = nn.ModuleList(TensorQuantizer(recipe, f"{name}.{i}", "input") for i in range(n_inputs))
        self.output_quantizer = TensorQuantizer(recipe, f"{name}.output", "output")

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != len(self.input_quantizers):
            raise ValueError(f"concatenation '{self.name}' was traced with {len(self.input_quantizers)} operands, got {len(xs)}")
        return self.output_quantizer(torch.cat([q(x) for q, x in zip(self.input_quantizers, xs)], self.dim))


QUANT_OPS = (QuantAdd, QuantPool, QuantConcat)


def _tensor_node(arg) -> bool:
    """A value torch.fx knows only as a tensor: a module output or a forward argument."""
    return isinstance(arg, fx.Node) and arg.op in ("placeholder", "call_module")


def _match(node: fx.Node, adds, pools, concats) -> Optional[tuple[str, tuple, callable]]:
    """(child name stem, the new call's arguments, a factory of the module) for an op to quantize."""
    if node.op != "call_function":
        return None
    if adds is not None and node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
            and all(_tensor_node(a) for a in node.args):
        return "add", tuple(node.args), lambda name: QuantAdd(adds, name)
    if pools is not None and node.target in _POOL_FUNCTIONS and node.args and _tensor_node(node.args[0]):
        cls = _POOL_FUNCTIONS[node.target]
        if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            return None  # pooling geometry computed at run time: not a fixed module
        pool = cls(*node.args[1:], **node.kwargs)
        return "pool", (node.args[0],), lambda name: QuantPool(pools, name, pool)
    if concats is not None and node.target in _CATS and node.args and isinstance(node.args[0], (list, tuple)):
        xs = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(xs) >= 2 and all(_tensor_node(x) for x in xs) and isinstance(dim, int) \
                and set(node.kwargs) <= {"dim"}:
            return "cat", tuple(xs), lambda name: QuantConcat(concats, name, len(xs), dim)
    return None


def quantize_ops(work: nn.Module, adds: Optional[TensorRecipe] = None, pools: Optional[TensorRecipe] = None,
                 concats: Optional[TensorRecipe] = None, skip: tuple = ()) -> tuple[nn.Module, list[str], list[tuple]]:
    """Give every addition (``adds``), average pooling (``pools``) and concatenation (``concats``)
    in ``work`` a quantized module on that grid (``None``: that kind stays float).

    Returns the model (a new ``GraphModule`` when its own forward had such an op), the new
    modules' names, and ``(module name, reason)`` for modules whose ops stay float.
    ``skip``: module types never rewritten (the quantized layers)."""
    added, untouched = [], []
    if pools is not None:
        for name, module in list(work.named_modules()):
            if name and isinstance(module, _POOL_MODULES) and not getattr(module, "divisor_override", None):
                parent, _, leaf = name.rpartition(".")
                setattr(work.get_submodule(parent), leaf, QuantPool(pools, name, module))
                added.append(name)
    if adds is None and concats is None and pools is None:
        return work, added, untouched
    modules = list(work.named_modules())
    modules = modules[1:] + modules[:1]  # the model itself last: its rewrite takes the rewritten children
    for name, module in modules:
        if isinstance(module, (fx.GraphModule, *QUANT_OPS, TensorQuantizer, *_LEAVES, *skip)):
            continue
        if name and any(name.startswith(u + ".") for u, _ in untouched if u):
            continue
        try:
            graph = trace_one_level(module)
        except Exception as err:  # noqa: BLE001 — an untraceable forward keeps its float ops
            untouched.append((name, f"forward not traceable by torch.fx ({type(err).__name__}): "
                                    "its additions, pools and concatenations stay float"))
            continue
        found = [(node, m) for node in graph.nodes if (m := _match(node, adds, pools, concats))]
        if not found:
            continue
        stems = [m[0] for _, m in found]
        for k, (node, (stem, args, make)) in enumerate(found):
            child = stem if stems.count(stem) == 1 else f"{stem}{stems[:k].count(stem)}"
            while hasattr(module, child):
                child += "_"
            full = f"{name}.{child}" if name else child
            setattr(module, child, make(full))
            with graph.inserting_after(node):
                new = graph.call_module(child, args)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            added.append(full)
        graph.lint()
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        if not name:
            for key, value in vars(module).items():  # plain attributes (a config, flags) the graph does not use
                if not key.startswith("_") and key != "training" and not hasattr(rewritten, key):
                    setattr(rewritten, key, value)
            rewritten.train(module.training)
            work = rewritten
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, leaf, rewritten)
    return work, added, untouched

