"""Weights a forward uses functionally, made layers: ``F.linear(x, self.w, self.b)`` (or
``F.conv1d/2d/3d(x, self.w, self.b, stride, padding, dilation, groups)``) in a module's own
forward becomes a call of a new ``nn.Linear`` (``nn.Conv*d``) child holding those very
parameters, so the ordinary swap quantizes it (found with a one-level torch.fx trace, like the other graph
rewrites). A parameter read anywhere else in that forward stays where it is (and float: prepare
lists a module's own parameters it could not quantize).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from .trace import install_graph, torch_builtin, trace_one_level


def _own_parameter(module: nn.Module, node) -> str:
    """The name of ``module``'s own parameter that ``node`` reads, else ``""``."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and "." not in node.target and \
            isinstance(module._parameters.get(node.target), nn.Parameter):
        return node.target
    return ""


_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _layer_for(node, weight: torch.Tensor, has_bias: bool):
    """The module computing ``node`` (F.linear or F.conv*d) with ``weight``, or None when its
    geometry is computed at run time."""
    if node.target is F.linear:
        return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    args = dict(zip(_CONV_ARGS, node.args), **node.kwargs)
    geometry = {k: args[k] for k in ("stride", "padding", "dilation", "groups") if k in args}
    if any(isinstance(v, fx.Node) for v in geometry.values()):
        return None
    groups = geometry.get("groups", 1)
    return _CONVS[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=has_bias,
                               device="meta", **geometry)


def functional_linears(work: nn.Module) -> tuple[nn.Module, list[str]]:
    """Rewrite every ``F.linear`` / ``F.conv*d`` whose weight (and bias) are parameters of the
    calling module, read by that call alone, into a call of an ``nn.Linear`` / ``nn.Conv*d``
    child. Returns the model (a new ``GraphModule`` when its own forward had one) and the new
    layers' names."""
    added = []
    modules = list(work.named_modules())
    for name, module in modules[1:] + modules[:1]:  # the model itself last
        if torch_builtin(module) or isinstance(module, fx.GraphModule) or \
                not module._parameters:
            continue
        try:
            graph = trace_one_level(module)
        except Exception:  # noqa: BLE001 — untraceable: its parameters stay float (and are listed)
            continue
        reads = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                reads[node.target] = len(node.users)
        found = []
        for node in graph.nodes:
            if node.op != "call_function" or not (node.target is F.linear or node.target in _CONVS) or \
                    set(node.kwargs) - set(_CONV_ARGS[1:]):
                continue
            args = [*node.args, *[None] * 3]
            x, w = args[0], node.kwargs.get("weight", args[1])
            b = node.kwargs.get("bias", args[2])
            w_name, b_name = _own_parameter(module, w), _own_parameter(module, b)
            dims = 2 if node.target is F.linear else {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}[node.target]
            if not w_name or reads.get(w_name) != 1 or module._parameters[w_name].dim() != dims or \
                    (b is not None and (not b_name or reads.get(b_name) != 1)):
                continue
            layer = _layer_for(node, module._parameters[w_name], b is not None)
            if layer is not None:
                found.append((node, x, w, b, w_name, b_name, layer))
        for node, x, w, b, w_name, b_name, linear in found:
            weight = module._parameters[w_name]
            linear.weight = weight
            if b is not None:
                linear.bias = module._parameters[b_name]
            child = f"{w_name}_{'linear' if node.target is F.linear else 'conv'}"
            while hasattr(module, child):
                child += "_"
            module.add_module(child, linear)
            with graph.inserting_after(node):
                new = graph.call_module(child, (x,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for attr in (w, b):
                if attr is not None and not attr.users:
                    graph.erase_node(attr)
            added.append(f"{name}.{child}" if name else child)
        if found:
            work = install_graph(work, name, module, graph)
    return work, added
