"""What the drivers share: hooks that collect a layer's inputs or outputs, running batches up to
a layer, the execution order, the layer chains torch.fx finds, and the layer selections."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..progress import Progress
from ..spec import LevelSpec
from ..steps import Layers, layer_matches
from ..wrap.handle import AlgorithmResult, LeftFloat, QuantizedModel, quantization_disabled
from ..wrap.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from ..wrap.standard import shared_parameter_ids
from . import bias_correction, smoothquant


def scalable_linears(qmodel: QuantizedModel, pattern: Layers, result: AlgorithmResult, algorithm: str,
                     why_not: Callable[[nn.Module], str]) -> dict:
    """The linear layers matching ``pattern`` (a glob or a list of them) that ``algorithm`` may
    rescale per input channel: ``why_not(layer)`` is the algorithm's own reason to skip one
    (empty: none); on top, the layer must be linear, on a uniform weight grid, with a weight no
    other module shares. The others are listed in ``result`` with the reason."""
    shared = shared_parameter_ids(qmodel.model)
    chosen = {}
    for name, module in qmodel.quantized_layers().items():
        if not layer_matches(name, pattern):
            continue
        wq = module.weight_quantizer
        if not isinstance(module, QuantLinear):
            why = f"{algorithm} scales linear layers, this is a {type(module).__name__}"
        else:
            why = why_not(module)
        if not why and wq is not None and isinstance(wq.spec, LevelSpec):
            why = f"{wq.spec.kind} weights: scaling is chosen for uniform grids"
        if not why and id(module.weight) in shared:
            why = "the weight is tied to another module: scaling it would change that module too"
        if why:
            result.skipped.append(LeftFloat(name, type(module).__name__, why))
        else:
            chosen[name] = module
    return chosen


@torch.no_grad()
def collect_inputs(qmodel: QuantizedModel, layers: dict, batches: list, samples: int,
                    label: str = "smoothquant statistics") -> dict:
    """Per-channel min/max and mean magnitude of every input of ``layers`` over all batches and a
    seeded row sample, with the model computing in float."""
    per_batch = math.ceil(samples / len(batches))
    generator = torch.Generator().manual_seed(0)
    seen: dict[str, list] = {}

    def hook(name):
        def grab(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi, mag = x.amin(0), x.amax(0), x.abs().double().sum(0)
            pick = x[torch.randperm(len(x), generator=generator)[:per_batch]]
            if name in seen:
                old = seen[name]
                seen[name] = [torch.minimum(old[0], lo), torch.maximum(old[1], hi), old[2] + [pick], old[3] + mag,
                              old[4] + len(x)]
            else:
                seen[name] = [lo, hi, [pick], mag, len(x)]
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    with quantization_disabled(qmodel) as model:
        run_batches(model, batches, handles, f"{label}, batch")
    return {n: smoothquant.LayerInputs(lo, hi, torch.cat(rows)[:samples], (mag / count).float())
            for n, (lo, hi, rows, mag, count) in seen.items()}


def with_inputs(label: str, layers: dict, stats: dict, result: AlgorithmResult):
    """``(name, layer, inputs)`` for each layer whose inputs were collected, with progress; a layer
    that never ran on the batches is listed as skipped."""
    with Progress(f"{label}, layer", len(layers)) as progress:
        for name, layer in layers.items():
            progress.step(name)
            if name not in stats:
                result.skipped.append(LeftFloat(name, "QuantLinear", "the layer never ran on the batches"))
                continue
            yield name, layer, stats[name]


def clear_activation_ranges(qmodel: QuantizedModel, quantizers=None) -> None:
    """Forget the static activation ranges (``quantizers``, default all): what they see changed,
    so the model goes back to PREPARED until calibrate observes them again."""
    for q in quantizers if quantizers is not None else qmodel.quantizers().values():
        if q.needs_range:
            q.clear_range()
    qmodel.mark_ranges_cleared()


def db(v: float):
    return None if not math.isfinite(v) else round(v, 2)


class Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


def output_mean(_layer: nn.Module = None, _name: str = "", stop: bool = True):
    """A forward hook summing a layer's output per channel (then, with ``stop``, skipping the rest
    of the forward) and a function reading the mean; the shape :mod:`.stages` measures with."""
    sums = [0.0, 0]

    def hook(module, _args, out):
        s, n = bias_correction.channel_sum(out, out.dim() - 1 if isinstance(module, nn.Linear) else 1)
        sums[0], sums[1] = sums[0] + s, sums[1] + n
        if stop:
            raise Stop

    return hook, lambda: sums[0] / sums[1]


def channel_means(model, names: list[str], batches: list) -> dict:
    """Per-channel output means of the layers ``names`` over ``batches``, in the order they ran."""
    reads, order = {}, []

    def hook(name):
        inner, reads[name] = output_mean(stop=False)

        def grab(module, args, out):
            if name not in order:
                order.append(name)
            inner(module, args, out)
        return grab

    run_batches(model, batches, [model.get_submodule(n).register_forward_hook(hook(n)) for n in names])
    return {n: reads[n]() for n in order}


def add_to_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """``b ← b + delta``, creating a zero bias where the layer has none."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    layer.bias.add_(delta.to(layer.bias.dtype))


def run_batches(model: nn.Module, batches: list, hooks=(), label: str | None = None) -> None:
    """Every batch through ``model`` (progress shown under ``label``); a hook raising :class:`Stop`
    ends that batch's forward. ``hooks``: handles removed at the end, whatever happens."""
    try:
        with Progress(label or "batch", len(batches), enabled=label is not None) as progress:
            for args, kwargs in batches:
                try:
                    model(*args, **kwargs)
                except Stop:
                    pass
                progress.step()
    finally:
        for h in hooks:
            h.remove()


LAYERS = (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d)


def depthwise(m: nn.Module) -> bool:
    return isinstance(m, (QuantConv1d, QuantConv2d, QuantConv3d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def layer_chains(qmodel: QuantizedModel, result: AlgorithmResult, through_types: tuple) -> list[tuple]:
    """``(first, second, through)``: quantized layers where ``first``'s output reaches ``second``'s
    only input through modules of ``through_types`` alone, every module called once (torch.fx on
    the prepared model; an untraceable model has none, noted in ``result``)."""
    from torch import fx

    from ..wrap.ops import QUANT_OPS

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (*LAYERS, *QUANT_OPS)) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(qmodel.model)
    except Exception as err:  # noqa: BLE001 — no graph, no pairs
        result.skipped.append(LeftFloat("", type(qmodel.model).__name__,
                                        f"not traceable by torch.fx ({type(err).__name__}): no layer pairs found"))
        return []
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls.count(node.target) != 1 or \
                not isinstance(qmodel.model.get_submodule(node.target), LAYERS):
            continue
        through, cur = [], node
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.op != "call_module" or calls.count(user.target) != 1:
                break
            module = qmodel.model.get_submodule(user.target)
            if isinstance(module, LAYERS):
                if user.args == (cur,) and not user.kwargs:
                    chains.append((node.target, user.target, through))
                break
            if not isinstance(module, through_types):
                break
            through.append(user.target)
            cur = user
    return chains


def rounding_layers(qmodel: QuantizedModel, pattern: Layers, result: AlgorithmResult) -> dict:
    chosen = {}
    for name, m in qmodel.quantized_layers().items():
        if not layer_matches(name, pattern):
            continue
        if not isinstance(m, LAYERS):
            result.skipped.append(LeftFloat(name, type(m).__name__, "rounding is chosen for linear and conv layers"))
        elif m.weight_quantizer is None:
            result.skipped.append(LeftFloat(name, type(m).__name__, "the weights are not quantized"))
        elif isinstance(m.weight_quantizer.spec, LevelSpec):
            result.skipped.append(LeftFloat(name, type(m).__name__, f"{m.weight_quantizer.spec.kind} weights: "
                                            "rounding is chosen on uniform grids"))
        else:
            chosen[name] = m
    return chosen


def execution_order(model: nn.Module, names: list, batch) -> list:
    order = []

    def seen(name):
        def hook(_module, _args, _out):
            if name not in order:
                order.append(name)
        return hook

    run_batches(model, [batch], [model.get_submodule(n).register_forward_hook(seen(n)) for n in names])
    return order


def feed_until(model: nn.Module, name: str, batches: list, take) -> None:
    """Run ``batches`` through ``model`` up to layer ``name``: ``take(input)`` sees its input each
    time and the rest of the forward is skipped."""
    def grab(_module, args):
        take(args[0].detach())
        raise Stop

    run_batches(model, batches, [model.get_submodule(name).register_forward_pre_hook(grab)])


def layer_inputs(model: nn.Module, name: str, batches: list) -> torch.Tensor:
    """The input of layer ``name`` on every batch, concatenated along the first dimension."""
    seen = []
    feed_until(model, name, batches, seen.append)
    return torch.cat(seen)
