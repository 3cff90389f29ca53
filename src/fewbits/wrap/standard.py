"""Layers other libraries write differently, rewritten as the standard torch layer they compute,
so the ordinary swap quantizes them.

* Hugging Face ``Conv1D`` (GPT-2's attention and MLP projections): ``y = x·W + b`` with ``W`` of
  shape ``[in, out]`` — an ``nn.Linear`` with the transposed weight;
* ``nn.MultiheadAttention`` — :class:`~fewbits.wrap.attention.LinearMultiheadAttention`, its
  four projections as ``nn.Linear`` children (one without extra key/value rows).

Done on ``prepare``'s own copy of the model (and its fp32 reference), so module names stay and
the user's model is untouched; a weight another module shares is left as it is (transposing
it would untie it) and the layer is then listed as float.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import LinearMultiheadAttention, unsupported


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, recognized without importing transformers."""
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
            and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and tuple(module.weight.shape) == (module.nx, module.nf))


_NORM_NAMES = ("RMSNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "ScaleNorm")


def is_norm(module: nn.Module) -> bool:
    """A normalization layer of any library (``nn.LayerNorm``, ``LlamaRMSNorm``, ``nn.GroupNorm``,
    …; not BatchNorm, which folds): a leaf module whose class name says so."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return True
    return not holds_layers(module) and any(n in type(module).__name__ for n in _NORM_NAMES)


def holds_layers(module: nn.Module) -> bool:
    """A block: some child of ``module`` has parameters."""
    return any(True for c in module.children() for _ in c.parameters())


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter held by more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {i for i, n in owners.items() if n > 1}


def standardize_layers(model: nn.Module) -> list[str]:
    """In place: every Hugging Face ``Conv1D`` of ``model`` whose weight is its own becomes the
    equal ``nn.Linear``, every ``nn.MultiheadAttention`` (exactly that type, its weights its own)
    a :class:`LinearMultiheadAttention`. Returns the names rewritten."""
    tied = shared_parameter_ids(model)
    rewritten = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if type(module) is nn.MultiheadAttention and not unsupported(module) and \
                not any(id(p) in tied for p in module.parameters()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LinearMultiheadAttention(module))
            rewritten.append(name)
            continue
        if not _is_hf_conv1d(module) or id(module.weight) in tied:
            continue
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        rewritten.append(name)
    return rewritten
