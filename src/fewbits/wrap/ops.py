"""Quantized tensor additions (residual connections), found with torch.fx.

``QuantAdd`` computes ``Q_out(Q_a(a) + Q_b(b))``: each operand on its own grid, the sum on the
output grid — the arithmetic of an integer addition with rescaling (and of ONNX Runtime's
QLinearAdd). ``quantize_additions`` finds ``a + b`` of two tensors inside the forward of each
submodule (traced one level deep: its children are leaves) and routes it through a new
``QuantAdd`` child; the submodule becomes a ``torch.fx.GraphModule`` with the same children and
parameter names. A submodule whose forward torch.fx cannot trace keeps its float additions and
is listed.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..recipe import TensorRecipe
from .quantizer import TensorQuantizer

_ADDS = (operator.add, operator.iadd, torch.add)
# modules whose forward has no tensor addition of its own: containers, activations, pools, norms
_NO_ADDS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ReLU, nn.ReLU6, nn.GELU, nn.Identity, nn.Dropout,
            nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.Linear,
            nn.Conv1d, nn.Conv2d)


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


class _OneLevel(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module


def _tensor_node(arg) -> bool:
    """A value torch.fx knows only as a tensor: a module output or a forward argument."""
    return isinstance(arg, fx.Node) and arg.op in ("placeholder", "call_module")


def quantize_additions(work: nn.Module, recipe: TensorRecipe, skip: tuple = ()) -> tuple[list[str], list[tuple]]:
    """Give every tensor addition inside ``work``'s submodules a :class:`QuantAdd`.

    Returns the new modules' names and ``(module name, reason)`` for submodules whose
    additions stay float. ``skip``: module types never rewritten (the quantized layers).
    """
    added, untouched = [], []
    for name, module in list(work.named_modules()):
        if not name or isinstance(module, (fx.GraphModule, QuantAdd, TensorQuantizer, *_NO_ADDS, *skip)):
            continue
        if any(name.startswith(u + ".") for u, _ in untouched):
            continue
        try:
            graph = _OneLevel(module).trace(module)
        except Exception as err:  # noqa: BLE001 — an untraceable forward keeps its float additions
            untouched.append((name, f"forward not traceable by torch.fx ({type(err).__name__}): any additions stay float"))
            continue
        adds = [n for n in graph.nodes if n.op == "call_function" and n.target in _ADDS
                and len(n.args) == 2 and all(_tensor_node(a) for a in n.args) and not n.kwargs]
        if not adds:
            continue
        for i, node in enumerate(adds):
            child = "add" if len(adds) == 1 else f"add{i}"
            while hasattr(module, child):
                child += "_"
            setattr(module, child, QuantAdd(recipe, f"{name}.{child}"))
            with graph.inserting_after(node):
                new = graph.call_module(child, tuple(node.args))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            added.append(f"{name}.{child}")
        graph.lint()
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        parent, _, leaf = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, leaf, rewritten)
    return added, untouched
