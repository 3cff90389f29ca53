"""Fold BatchNorm into the convolution (or linear layer) before it.

In eval mode ``BN(conv(x)) = γ·(W*x + b − μ)/√(σ² + ε) + β``, which is a convolution with
``W' = W·γ/√(σ² + ε)`` (per output channel) and ``b' = (b − μ)·γ/√(σ² + ε) + β``. Quantizing
``W'`` is what an integer deployment runs, so ranges must be chosen after folding.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .trace import trace_one_level

_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}


def folded_factor_and_bias(bias, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``γ/√(σ² + ε)`` per channel and the folded bias ``(b − μ)·γ/√(σ² + ε) + β`` on the running
    statistics (``bias`` may be ``None``); differentiable, so training can fold as it goes."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    factor = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        factor = factor * bn.weight
    bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return factor, (bias - bn.running_mean) * factor + (bn.bias if bn.affine else 0.0)


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``layer`` in place (``layer`` gains a bias if it had none)."""
    factor, new_bias = folded_factor_and_bias(layer.bias, bn)
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    layer.weight.mul_(factor.reshape(shape).to(layer.weight.dtype))
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def batchnorm_pairs(model: nn.Module, types: dict = _FOLDABLE) -> list[tuple]:
    """``(parent, parent_name, layer_key, layer, bn_key, bn)`` for every BatchNorm that consumes the
    output of a layer of one of ``types`` (mapped to the BatchNorm type that may follow it, matched
    by base class) and nothing else reads that output, with as many features as the layer has
    outputs: directly after it inside an ``nn.Sequential``, or called on its output in the forward
    of the module holding both (``self.bn1(self.conv1(x))``, found by one-level torch.fx tracing).
    Each of the two modules must be called once there."""
    pairs, paired = [], set()

    def take(parent, parent_name, key, layer, bn_key, bn):
        bn_type = next((b for t, b in types.items() if isinstance(layer, t)), None)
        if bn_type is None or type(bn) is not bn_type or bn.num_features != layer.weight.shape[0] or id(bn) in paired:
            return
        pairs.append((parent, parent_name, key, layer, bn_key, bn))
        paired.add(id(bn))

    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (key, layer), (bn_key, bn) in zip(children, children[1:]):
                take(parent, parent_name, key, layer, bn_key, bn)
    owners = {name.rpartition(".")[0] for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in paired}
    for parent_name in sorted(owners):
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.Sequential):
            continue
        for key, bn_key in _traced_pairs(parent):
            take(parent, parent_name, key, parent.get_submodule(key), bn_key, parent.get_submodule(bn_key))
    return pairs


def _traced_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` child names where ``parent``'s forward calls the BatchNorm on the
    layer's output alone, each called once (none when the forward cannot be traced)."""
    try:
        graph = trace_one_level(parent)
    except Exception:  # noqa: BLE001 — an untraceable forward keeps its BatchNorms (prepare lists them)
        return []
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or "." in node.target or calls.count(node.target) != 1:
            continue
        if not isinstance(parent.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op == "call_module" and "." not in source.target and calls.count(source.target) == 1 \
                and list(source.users) == [node]:
            found.append((source.target, node.target))
    return found


def _name(parent_name: str, key: str) -> str:
    return f"{parent_name}.{key}" if parent_name else key


def fold_batchnorm(model: nn.Module, stats: dict | None = None) -> tuple[list[str], list[str]]:
    """Fold every BatchNorm that consumes a foldable layer's output alone (:func:`batchnorm_pairs`:
    inside an ``nn.Sequential`` or called so in its parent's forward).

    Works in place (``prepare`` calls it on its own copy); folded BatchNorms become
    ``nn.Identity``. Returns the names of the folded BatchNorms and of those left as they were.
    ``stats``, if given, receives per folded layer the mean and standard deviation its output has
    by the BatchNorm's design, ``(β, |γ|)`` per channel — what data-free methods (analytic bias
    correction) know of the activations.
    """
    folded = []
    for parent, parent_name, key, layer, bn_key, bn in batchnorm_pairs(model):
        if type(layer) not in _FOLDABLE:  # a subclass may use its weight in ways folding cannot see
            continue
        if stats is not None:
            ones = torch.ones(bn.num_features)
            stats[_name(parent_name, key)] = ((bn.bias.detach().clone() if bn.affine else ones * 0),
                                              (bn.weight.detach().abs().clone() if bn.affine else ones))
        fold_into(layer, bn)
        setattr(parent, bn_key, nn.Identity())
        folded.append(_name(parent_name, bn_key))
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return folded, left
