"""Quantized tensor operations between layers — additions, elementwise products, average
pooling, concatenation, products of two activations — found with torch.fx.

Each computes the op on quantized operands and quantizes its result, the arithmetic of the
integer op with rescaling (and of ONNX Runtime's QLinearAdd / QLinearMul / QLinearAveragePool /
QLinearGlobalAveragePool / QLinearConcat / QLinearMatMul):

* ``QuantAdd``: ``Q_out(Q_a(a) + Q_b(b))`` — residual connections (a ReLU after it taken in);
* ``QuantMul``: ``Q_out(Q_a(a) · Q_b(b))`` — gates, layer scales;
* ``QuantPool``: ``Q_out(pool(Q_in(x)))`` for average pooling (module or functional, 1-d / 2-d,
  adaptive or not) — e.g. the global pool before a classifier;
* ``QuantConcat``: ``Q_out(cat(Q_1(x_1), …, Q_n(x_n)))``;
* ``QuantMatMul``: ``Q_a(a) @ Q_b(b)``, a float product (attention scores, weights × values).

:func:`quantize_ops` swaps pooling modules in place and finds the functional ops inside the
forward of every module, the model itself included, traced one level deep (its children are
leaves). Each op found is routed through a new child module and the module becomes a
``torch.fx.GraphModule`` with the same children and parameter names. What stays float on purpose
(a transformer's residual stream, a learned token's concatenation) and the ops of a forward
torch.fx cannot trace are listed. It also gives convolutions read by a float op an output grid
(``conv_outputs``).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..recipe import TensorRecipe
from .quantizer import TensorQuantizer
from .standard import is_norm
from .trace import install_graph, torch_builtin, trace_one_level

_ADDS = (operator.add, operator.iadd, torch.add)
_MATMULS = (operator.matmul, torch.matmul, torch.bmm)
_MULS = (operator.mul, operator.imul, torch.mul)
_CATS = (torch.cat, torch.concat)
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
# functional pooling → the module computing the same thing (same argument order after the input)
_POOL_FUNCTIONS = {F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d,
                   F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}
# values of these calls are Python numbers or shapes, never tensors to quantize
_SHAPE_CALLS = {"size", "dim", "numel", "shape", "item", "tolist", "__len__", "nelement", "stride"}
_SHAPE_FUNCTIONS = (getattr, len, operator.floordiv, operator.mod)


class QuantAdd(nn.Module):
    """``a + b`` with quantized operands and a quantized result; ``relu``: a ReLU that only read
    the sum, taken in (``Q_out(relu(a + b))``: the output grid starts at zero, as ONNX Runtime's
    QLinearAdd with the ReLU folded into its output)."""

    def __init__(self, recipe: TensorRecipe, name: str) -> None:
        super().__init__()
        self.name = name
        self.relu = False
        self.a_quantizer = TensorQuantizer(recipe, f"{name}.a", "input")
        self.b_quantizer = TensorQuantizer(recipe, f"{name}.b", "input")
        self.output_quantizer = TensorQuantizer(recipe, f"{name}.output", "output")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = self.a_quantizer(a) + self.b_quantizer(b)
        return self.output_quantizer(torch.relu(s) if self.relu else s)


class QuantMul(QuantAdd):
    """``a * b`` (elementwise, broadcasting) with quantized operands and a quantized result:
    gates (``x * sigmoid(…)`` of squeeze-excitation, SwiGLU), a learned per-channel scale."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.a_quantizer(a) * self.b_quantizer(b))


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


class QuantMatMul(nn.Module):
    """``a @ b`` of two activations (attention scores ``Q·Kᵀ``, weights × values) with both
    operands quantized; the product stays float (int32 accumulator × ``s_a·s_b``)."""

    def __init__(self, recipe: TensorRecipe, name: str) -> None:
        super().__init__()
        self.name = name
        self.a_quantizer = TensorQuantizer(recipe, f"{name}.a", "input")
        self.b_quantizer = TensorQuantizer(recipe, f"{name}.b", "input")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.a_quantizer(a), self.b_quantizer(b))


QUANT_OPS = (QuantAdd, QuantMul, QuantPool, QuantConcat, QuantMatMul)


def _tensor_node(arg) -> bool:
    """A value torch.fx knows only as a tensor: a module output, a forward argument, or a tensor op
    on one (not a shape, a size or arithmetic on those)."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op in ("placeholder", "call_module", "get_attr"):
        return True
    if arg.op == "call_method" and arg.target in _SHAPE_CALLS:
        return False
    if arg.op == "call_function" and arg.target in _SHAPE_FUNCTIONS:
        return False
    if arg.op in ("call_method", "call_function"):
        return bool(arg.args) and _tensor_node(arg.args[0]) or any(_tensor_node(a) for a in arg.args[1:2])
    return False


def _parameter_path(node: fx.Node) -> bool:
    """A value computed from a parameter rather than from the input (``self.cls.expand(n, -1, -1)``):
    a learned token concatenated with activations would share their grid and lose its precision."""
    while node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "get_attr"


def _match(node: fx.Node, grids: dict) -> Optional[tuple[str, tuple, callable]]:
    """(child name stem, the new call's arguments, a factory of the module) for an op to quantize;
    ``grids``: the recipe's grid per op kind (``Recipe.ops()``, ``None``: that kind stays float)."""
    if node.op != "call_function":
        return None
    adds, pools, concats, matmuls, muls = (grids.get(k) for k in ("adds", "pools", "concats", "matmuls", "muls"))
    if matmuls is not None and node.target in _MATMULS and len(node.args) == 2 and not node.kwargs \
            and all(_tensor_node(a) and not _parameter_path(a) for a in node.args):
        return "matmul", tuple(node.args), lambda name: QuantMatMul(matmuls, name)
    if adds is not None and node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
            and all(_tensor_node(a) for a in node.args):
        return "add", tuple(node.args), lambda name: QuantAdd(adds, name)
    if muls is not None and node.target in _MULS and len(node.args) == 2 and not node.kwargs \
            and all(_tensor_node(a) for a in node.args):
        return "mul", tuple(node.args), lambda name: QuantMul(muls, name)
    if pools is not None and node.target in _POOL_FUNCTIONS and node.args and _tensor_node(node.args[0]):
        cls = _POOL_FUNCTIONS[node.target]
        if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            return None  # pooling geometry computed at run time: not a fixed module
        pool = cls(*node.args[1:], **node.kwargs)
        return "pool", (node.args[0],), lambda name: QuantPool(pools, name, pool)
    if concats is not None and node.target in _CATS and node.args and isinstance(node.args[0], (list, tuple)):
        xs = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(xs) >= 2 and all(isinstance(x, fx.Node) for x in xs) and not any(_parameter_path(x) for x in xs) \
                and isinstance(dim, int) \
                and set(node.kwargs) <= {"dim"}:
            return "cat", tuple(xs), lambda name: QuantConcat(concats, name, len(xs), dim)
    return None


# what reads a tensor in float: activations and norms with no integer kernel in ONNX Runtime
_FLOAT_MODULES = (nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Softmax, nn.Mish, nn.ELU)
_FLOAT_FUNCTIONS = {torch.sigmoid, torch.tanh, torch.softmax, F.sigmoid, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
                    F.softmax, F.mish, F.elu, F.layer_norm, F.group_norm}
_FLOAT_METHODS = {"sigmoid", "tanh", "softmax"}
_RESHAPES = {"permute", "transpose", "reshape", "view", "flatten", "contiguous", "squeeze", "unsqueeze"}


def _value_readers(node: fx.Node) -> list:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not ((u.op == "call_method" and u.target in _SHAPE_CALLS) or
                                          (u.op == "call_function" and u.target in _SHAPE_FUNCTIONS))]


def _float_reader(module: nn.Module, node: fx.Node) -> bool:
    """``node`` reads its input in float (through reshapes): a norm, a sigmoid, a softmax, …"""
    if node.op == "call_module":
        m = module.get_submodule(node.target)
        return is_norm(m) or isinstance(m, _FLOAT_MODULES)
    if node.op == "call_function":
        if node.target in _CATS and node.args and isinstance(node.args[0], (list, tuple)):
            return any(isinstance(x, fx.Node) and _parameter_path(x) for x in node.args[0])  # stays float (_match)
        readers = _value_readers(node)
        return node.target in _FLOAT_FUNCTIONS or (node.target in (torch.flatten, torch.permute, torch.transpose)
                                                   and bool(readers) and all(_float_reader(module, u) for u in readers))
    if node.op == "call_method":
        readers = _value_readers(node)
        return node.target in _FLOAT_METHODS or (node.target in _RESHAPES and bool(readers)
                                                 and all(_float_reader(module, u) for u in readers))
    return False


def _wants_output(layer: nn.Module) -> bool:
    from .modules import QuantConv1d, QuantConv2d, QuantConv3d

    xq = getattr(layer, "input_quantizer", None)
    return isinstance(layer, (QuantConv1d, QuantConv2d, QuantConv3d)) and layer.output_quantizer is None \
        and xq is not None and not xq.recipe.dynamic and layer.weight_quantizer is not None


def _quantize_conv_outputs(work: nn.Module, recipe: TensorRecipe) -> list[str]:
    """Give a quantized convolution an output grid where a float op reads its output: in an
    ``nn.Sequential`` (the next child) or in its parent's one-level traced forward."""
    named = []

    def give(name: str, layer: nn.Module) -> None:
        layer.output_quantizer = TensorQuantizer(recipe, f"{name}.output", "output")
        named.append(name)

    def last_conv(name: str, module: nn.Module):
        """The convolution whose output ``module``'s output is (itself, or an nn.Sequential's last)."""
        while isinstance(module, nn.Sequential) and len(module):
            key = list(module._modules)[-1]
            name, module = f"{name}.{key}" if name else key, module[-1]
        return (name, module) if _wants_output(module) else (None, None)

    for name, module in list(work.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, first), (_, second) in zip(children, children[1:]):
                if _wants_output(first) and (is_norm(second) or isinstance(second, _FLOAT_MODULES)):
                    give(prefix + a, first)
            if name or not children:
                continue
            last, layer = last_conv("", module)  # a Sequential model: its output is the model's, float
            if layer is not None:
                give(last, layer)
            continue
        if torch_builtin(module):
            continue
        try:
            graph = trace_one_level(module)
        except Exception:  # noqa: BLE001 — untraceable: its convolutions keep float outputs
            continue
        for node in graph.nodes:
            readers = _value_readers(node)
            if node.op != "call_module" or "." in node.target or not readers:
                continue
            # the model's own output is read in float by whoever called it
            returned = not name and all(u.op == "output" for u in readers)
            if returned or all(_float_reader(module, u) for u in readers):
                child, layer = last_conv(prefix + node.target, module.get_submodule(node.target))
                if layer is not None and layer.output_quantizer is None:
                    give(child, layer)
    return named


def _take_relu(module: nn.Module, node: fx.Node) -> bool:
    """Fold the ReLU that alone reads ``node`` into it (rewires the graph); True when it did."""
    if len(node.users) != 1:
        return False
    (user,) = node.users
    relu = (user.op == "call_module" and type(module.get_submodule(user.target)) is nn.ReLU) or \
        (user.op == "call_function" and user.target in (torch.relu, F.relu) and set(user.kwargs) <= {"inplace"}) or \
        (user.op == "call_method" and user.target in ("relu", "relu_"))
    if not relu or len(user.args) != 1:
        return False
    user.replace_all_uses_with(node)
    user.graph.erase_node(user)
    return True


def _norm_stream(module: nn.Module, graph: fx.Graph, adds: list) -> set:
    """The additions of a transformer's residual stream: those a normalization layer reads, and
    the additions chained to them. The stream feeds a float norm (nothing integer follows) and
    carries the outlier channels a per-tensor grid loses; these additions stay float."""
    def norm_reads(node: fx.Node) -> bool:
        return any(u.op == "call_module" and is_norm(module.get_submodule(u.target)) for u in node.users)

    stream = {n for n in adds if norm_reads(n)}
    grown = True
    while grown:
        linked = {n for n in adds if n not in stream and
                  (any(a in stream for a in n.args) or any(u in stream for u in n.users))}
        stream |= linked
        grown = bool(linked)
    return stream


def quantize_ops(work: nn.Module, grids: dict, skip: tuple = ()) -> tuple[nn.Module, list[str], list[tuple]]:
    """Give every addition (``grids["adds"]``), average pooling (``pools``), concatenation
    (``concats``), elementwise product (``muls``) and product of two activations (``matmuls``;
    also the two of each :class:`~fewbits.wrap.attention.LinearMultiheadAttention`) in ``work`` a
    quantized module on that grid, and convolutions read by a float op an output grid
    (``conv_outputs``); ``grids`` is :meth:`Recipe.ops` (``None``: that kind stays float).

    Returns the model (a new ``GraphModule`` when its own forward had such an op), the new
    modules' names, and ``(module name, reason)`` for modules whose ops stay float.
    ``skip``: module types never rewritten (the quantized layers)."""
    added, untouched = [], []
    pools, matmuls, conv_outputs = grids.get("pools"), grids.get("matmuls"), grids.get("conv_outputs")
    if pools is not None:
        for name, module in list(work.named_modules()):
            if name and isinstance(module, _POOL_MODULES) and not getattr(module, "divisor_override", None):
                parent, _, leaf = name.rpartition(".")
                setattr(work.get_submodule(parent), leaf, QuantPool(pools, name, module))
                added.append(name)
    if matmuls is not None:
        from .attention import LinearMultiheadAttention

        for name, module in list(work.named_modules()):
            if isinstance(module, LinearMultiheadAttention):
                for slot in ("scores_matmul", "values_matmul"):
                    setattr(module, slot, QuantMatMul(matmuls, f"{name}.{slot}"))
                    added.append(f"{name}.{slot}")
    if conv_outputs is not None:
        _quantize_conv_outputs(work, conv_outputs)
    if all(grids.get(k) is None for k in ("adds", "pools", "concats", "matmuls", "muls")):
        return work, added, untouched
    modules = list(work.named_modules())
    modules = modules[1:] + modules[:1]  # the model itself last: its rewrite takes the rewritten children
    for name, module in modules:
        if isinstance(module, (*QUANT_OPS, TensorQuantizer, *skip)) or torch_builtin(module):
            continue
        try:
            graph = trace_one_level(module)
        except Exception as err:  # noqa: BLE001 — an untraceable forward keeps its float ops
            untouched.append((name, f"forward not traceable by torch.fx ({type(err).__name__}): "
                                    "its ops between layers (additions, products, pools, concatenations) stay float"))
            continue
        found = [(node, m) for node in graph.nodes if (m := _match(node, grids))]
        stream = _norm_stream(module, graph, [node for node, m in found if m[0] == "add"])
        if stream:
            untouched.append((name, f"{len(stream)} residual addition(s) read by a normalization layer stay float "
                                    "(a transformer's residual stream: a float norm follows)"))
            found = [(node, m) for node, m in found if node not in stream]
        if not found:
            continue
        stems = [m[0] for _, m in found]
        for k, (node, _) in enumerate(found):
            stem, args, make = _match(node, grids)  # again: the rewrites before changed its arguments
            child = stem if stems.count(stem) == 1 else f"{stem}{stems[:k].count(stem)}"
            while hasattr(module, child):
                child += "_"
            full = f"{name}.{child}" if name else child
            setattr(module, child, make(full))
            with graph.inserting_after(node):
                new = graph.call_module(child, args)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if stem == "add" and _take_relu(module, new):
                getattr(module, child).relu = True
            added.append(full)
        work = install_graph(work, name, module, graph)
    return work, added, untouched

