"""Which layer reads which: the integer chains a mixed configuration can keep on integers.

ONNX Runtime fuses a quantized convolution into its integer kernel only when the convolution's
output is quantized (``fewbits.export.kernels``), and a quantized linear layer followed by a
ReLU only then too (otherwise it fuses the ReLU into a float ``FusedGemm`` first). Between two
layers the output can be the next layer's own input grid — through a ReLU / clip, a max pool,
a reshape, which run on uint8 — so such a layer both of whose neighbours are integer hands
integers on and neither pays a conversion; read by a float layer or a float op it needs an
output grid of its own and a dequantization after it.

:func:`layer_readers` runs one batch through the (BatchNorm-folded) float model under a torch
function mode and follows every tensor a layer produced through the value-preserving ops
(``TRANSPARENT``) to what reads it: another layer, or anything else ("a float op"). A *chain
edge* ``(a, b)`` is a convolution, or a linear layer whose output goes through a ReLU / clip
(``activated``), read by ``b`` only, ``b`` reading only ``a``'s output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..wrap.handle import as_call

# ops that move, reshape, clip from below or pick values without computing new ones: a uint8
# tensor goes through them on ONNX Runtime's integer path (DQ/Q propagation, ReLU/Clip removal
# before a QuantizeLinear, uint8 MaxPool)
TRANSPARENT = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "flatten", "view", "reshape", "contiguous", "squeeze",
    "unsqueeze", "permute", "transpose", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "dropout", "identity", "clone", "detach"})
CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")  # the layers ONNX Runtime fuses only with a quantized output
ACTIVATIONS = frozenset({"relu", "relu_", "relu6", "hardtanh", "hardtanh_"})
# ops ONNX Runtime runs in whatever layout its neighbours use (its transpose optimizer pushes
# layout changes through them): a region of tensors joined by them is one layout region
# (the value-preserving ops but those that reshape, plus elementwise arithmetic and activations)
RESHAPES = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose"})
LAYOUT_FREE = (TRANSPARENT - RESHAPES) | frozenset({
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "mul", "mul_", "__mul__", "__rmul__",
    "sigmoid", "silu", "gelu", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu"})
FLOAT_OP = "<float op>"
MODEL_OUTPUT = "<output>"


@dataclass
class Readers:
    """``readers[a]``: what reads layer ``a``'s output (layer names, ``FLOAT_OP``,
    ``MODEL_OUTPUT``); ``sources[b]``: whose outputs layer ``b``'s input is made from
    (empty: the model input or a float op); ``activated``: the layers whose output goes through a
    ReLU or clip; ``types``: each layer's module type."""

    readers: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    activated: set = field(default_factory=set)
    types: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)  # (a, b) → the ops from a's output to b's input (see replay)
    regions: list = field(default_factory=list)  # layout regions: {"producers", "consumers", "float_op"}
    siblings: list = field(default_factory=list)  # groups of layers reading one same tensor

    def heads(self) -> set:
        """The layers that need a quantized output to run on an integer kernel."""
        return {n for n, t in self.types.items() if t in CONV_TYPES or (t == "Linear" and n in self.activated)}

    def chains(self) -> list[tuple[str, str]]:
        """``(a, b)``: ``a`` one of :meth:`heads`, read by ``b`` alone, ``b`` reading ``a`` alone."""
        heads = self.heads()
        return sorted((a, next(iter(r))) for a, r in self.readers.items()
                      if a in heads and len(r) == 1 and self.sources.get(next(iter(r))) == {a})

    def layout_regions(self) -> list[dict]:
        """The layout regions (tensors joined by ``LAYOUT_FREE`` ops between layers) that touch
        no float op, the model's input or output, and are not one chain edge (timed as a pair):
        ``{"producers": [...], "consumers": [...]}``."""
        chains = set(self.chains())
        return [r for r in self.regions if not r["float_op"] and r["producers"] and r["consumers"]
                and not (len(r["producers"]) == len(r["consumers"]) == 1
                         and (r["producers"][0], r["consumers"][0]) in chains)]

    def to_dict(self) -> dict:
        return {"readers": {k: sorted(v) for k, v in self.readers.items()},
                "sources": {k: sorted(v) for k, v in self.sources.items()}, "activated": sorted(self.activated),
                "types": self.types, "regions": self.regions, "siblings": self.siblings}


def _tensors(value) -> list:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


class _Follow(TorchFunctionMode):
    """Each tensor's set of producing layers, carried through ``TRANSPARENT`` ops; any other op
    reading a layer's output makes it read by a float op."""

    def __init__(self, found: Readers) -> None:
        super().__init__()
        self.found = found
        self.origin: dict[int, frozenset] = {}
        self.path: dict[int, Optional[tuple]] = {}  # the ops from the producing layer's output, to replay them
        self.keep: list = []  # the tensors whose ids are keys, alive until the pass ends
        self.inside = 0  # > 0 while a layer's own forward runs: its internals are not followed
        self.region: dict[int, int] = {}  # tensor id → its layout region (union-find below)
        self.parent: list[int] = []
        self.members: list[dict] = []  # per region root: producers, consumers, float_op

    def new_region(self, tensor: torch.Tensor, producer: Optional[str]) -> None:
        self.parent.append(len(self.parent))
        self.members.append({"producers": {producer} - {None}, "consumers": set(), "float_op": producer is None})
        self.region[id(tensor)] = len(self.parent) - 1
        self.keep.append(tensor)

    def root(self, r: int) -> int:
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def regions_of(self, value) -> set:
        return {self.root(self.region[id(t)]) for t in _tensors(value) if id(t) in self.region}

    def join(self, roots: set) -> int:
        first, *rest = sorted(roots)
        for r in rest:
            self.parent[r] = first
            for k in ("producers", "consumers"):
                self.members[first][k] |= self.members[r][k]
            self.members[first]["float_op"] |= self.members[r]["float_op"]
        return first

    def mark_float_op(self, value) -> None:
        for r in self.regions_of(value):
            self.members[r]["float_op"] = True

    def mark(self, tensor: torch.Tensor, origin: frozenset, path: Optional[tuple] = ()) -> None:
        self.origin[id(tensor)] = origin
        self.path[id(tensor)] = path
        self.keep.append(tensor)

    def sources_of(self, value) -> set:
        return set().union(*[self.origin.get(id(t), frozenset()) for t in _tensors(value)])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        self._follow_layout(func, args, kwargs, out)
        sources = self.sources_of((args, kwargs))
        if not sources:
            return out
        name = getattr(func, "__name__", "")
        outputs = _tensors(out)
        if name in TRANSPARENT or name.startswith("__get") or name in ("size", "dim", "shape", "numel"):
            if name in ACTIVATIONS:
                self.found.activated.update(sources)
            path = None
            first = args[0] if args else None
            if isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor) and len(_tensors((args, kwargs))) == 1 \
                    and self.path.get(id(first)) is not None:
                path = self.path[id(first)] + ((func, args[1:], dict(kwargs)),)
            for t in outputs:
                self.mark(t, frozenset(sources), path)
        elif outputs:
            for s in sources:
                self.found.readers[s].add(FLOAT_OP)
        return out

    def _follow_layout(self, func, args, kwargs, out) -> None:
        roots = self.regions_of((args, kwargs))
        if not roots:
            return
        name = getattr(func, "__name__", "")
        if name in LAYOUT_FREE:
            root = self.join(roots)
            for t in _tensors(out):
                self.region[id(t)] = root
                self.keep.append(t)
        elif not (name.startswith("__get") or name in ("size", "dim", "shape", "numel")):
            self.mark_float_op((args, kwargs))


def layer_readers(model: nn.Module, names: list[str], batch) -> Readers:
    """What reads each layer in ``names`` of ``model`` (see the module docstring), from one
    forward of ``batch``. A layer that never ran has no entry in ``sources``."""
    found = Readers({n: set() for n in names}, {}, set(), {n: type(model.get_submodule(n)).__name__ for n in names})
    mode = _Follow(found)
    readers_of_input: dict[int, list] = {}  # tensor id → the layers reading it (siblings)

    def pre(name):
        def hook(module, args, kwargs):
            if mode.inside == 0:
                for r in mode.regions_of((args, kwargs)):
                    mode.members[r]["consumers"].add(name)
                if args and isinstance(args[0], torch.Tensor):
                    readers_of_input.setdefault(id(args[0]), []).append(name)
                    mode.keep.append(args[0])
                sources = mode.sources_of((args, kwargs))
                found.sources.setdefault(name, set()).update(sources)
                for s in sources:
                    found.readers[s].add(name)
                if len(sources) == 1 and len(args) == 1 and not kwargs and mode.path.get(id(args[0])) is not None:
                    found.paths[(next(iter(sources)), name)] = mode.path[id(args[0])]
            mode.inside += 1
        return hook

    def post(name):
        def hook(module, args, kwargs, out):
            mode.inside -= 1
            if mode.inside == 0:
                for t in _tensors(out):
                    mode.mark(t, frozenset({name}))
                    mode.new_region(t, name)
        return hook

    handles = []
    for n in names:
        module = model.get_submodule(n)
        handles.append(module.register_forward_pre_hook(pre(n), with_kwargs=True))
        handles.append(module.register_forward_hook(post(n), with_kwargs=True))
    args, kwargs = as_call(batch, 0)
    try:
        with torch.no_grad(), mode:
            for t in _tensors((args, kwargs)):
                mode.new_region(t, None)  # the model's input: ONNX Runtime's layout, a boundary
            out = model(*args, **kwargs)
            for s in mode.sources_of(out):
                found.readers[s].add(MODEL_OUTPUT)
            mode.mark_float_op(out)
    finally:
        for h in handles:
            h.remove()
    roots = sorted({mode.root(r) for r in range(len(mode.parent))})
    found.regions = [{"producers": sorted(mode.members[r]["producers"]), "consumers": sorted(mode.members[r]["consumers"]),
                      "float_op": mode.members[r]["float_op"]} for r in roots
                     if mode.members[r]["producers"] or mode.members[r]["consumers"]]
    found.siblings = [g for g in (list(dict.fromkeys(group)) for group in readers_of_input.values()) if len(g) > 1]
    return found


def own_output_grids(integer: set, heads: set, chains: list) -> list[str]:
    """The layers of ``heads`` in an integer format (``integer``) that need an output grid of
    their own: every one except the head of a chain edge whose reader is integer too (it
    requantizes into that reader's input grid)."""
    handed_on = {a for a, b in chains if a in integer and b in integer}
    return sorted(n for n in integer & heads if n not in handed_on)


def replay(path: tuple, x: torch.Tensor) -> torch.Tensor:
    """The ops of a recorded path (``Readers.paths``) applied to ``x``."""
    for func, args, kwargs in path:
        x = func(x, *args, **kwargs)
    return x
