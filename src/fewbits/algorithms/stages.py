"""Staged execution: measure layer after layer in execution order without re-running the model
from its input for each one.

A driver that corrects layers one at a time (bias correction: each layer is measured with the
earlier ones already corrected) would otherwise run every batch through the whole prefix of
the model once per layer — cost growing with the square of the depth. Here the model runs up to
the first *stack* (an ``nn.Sequential`` whose own ``forward`` chains its children, called once
per forward) and its inputs are kept; each child of the stack then runs alone on the kept
inputs, once per layer inside it, and its outputs become the next child's inputs (only one
child's inputs are held at a time). A child that is itself such a stack is entered the same
way. Layers outside every stack (a classifier after the features, a model that is no
``nn.Sequential``) are measured from the model's input, as before.

:func:`measure_in_order` is a generator: it yields ``(name, value)`` for each layer in execution
order and waits, so whatever the caller changes in that layer before asking for the next one
is seen by every later measurement.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .hooks import Stop, run_batches

# measure(module, name) -> (hook to register on layer `name`, read() returning the value once the batches ran)
Measure = Callable[[nn.Module, str], tuple[Callable, Callable[[], torch.Tensor]]]


def _is_stack(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _inside(prefix: str, name: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _outer_stacks(model: nn.Module, names: list[str]) -> list[str]:
    """The outermost stacks holding at least two of ``names`` in different children, whose layers
    among ``names`` run contiguously in execution order (a shared module called from elsewhere
    would break the chain)."""
    stacks = []
    for path, module in model.named_modules():
        if not _is_stack(module) or any(_inside(s, path) for s in stacks):
            continue
        held = [i for i, n in enumerate(names) if _inside(path, n)]
        children = {n[len(path) + 1 if path else 0:].split(".")[0] for n in (names[i] for i in held)}
        if len(children) >= 2 and held == list(range(held[0], held[-1] + 1)):
            stacks.append(path)
    return stacks


def _called_once(model: nn.Module, stacks: list[str], batch) -> list[str]:
    """The stacks one whole forward of ``batch`` calls exactly once."""
    calls = dict.fromkeys(stacks, 0)

    def count(path):
        def hook(_module, _args):
            calls[path] += 1
        return hook

    run_batches(model, [batch], [model.get_submodule(p).register_forward_pre_hook(count(p)) for p in stacks])
    return [p for p in stacks if calls[p] == 1]


def _stack_inputs(model: nn.Module, stack: str, batches: list) -> list | None:
    """The stack's input for every batch as a call ``((x,), {})`` (the rest of each forward
    skipped), or ``None`` when it is not called with one positional input."""
    kept = []

    def grab(_module, args, kwargs):
        if len(args) == 1 and not kwargs:
            kept.append(((args[0],), {}))
        raise Stop

    run_batches(model, batches, [model.get_submodule(stack).register_forward_pre_hook(grab, with_kwargs=True)])
    return kept if len(kept) == len(batches) else None


def _measure(module: nn.Module, relative: str, name: str, calls: list, measure: Measure) -> torch.Tensor:
    """Run ``calls`` through ``module`` with ``measure``'s hook on its descendant ``relative``."""
    layer = module.get_submodule(relative)
    hook, read = measure(layer, name)
    run_batches(module, calls, [layer.register_forward_hook(hook)])
    return read()


def _walk(stack: nn.Module, path: str, calls: list, names: list[str], measure: Measure) -> Iterator:
    children = [(f"{path}.{key}" if path else key, child) for key, child in stack.named_children()]
    last = max(i for i, (p, _) in enumerate(children) if any(_inside(p, n) for n in names))
    for i, (child_path, child) in enumerate(children[:last + 1]):
        inner = [n for n in names if _inside(child_path, n)]
        if inner and _is_stack(child):
            yield from _walk(child, child_path, calls, inner, measure)
        else:
            for name in inner:
                yield name, _measure(child, name[len(child_path) + 1:], name, calls, measure)
        if i < last:  # the next child's inputs, with whatever the caller changed in this one
            calls = [((child(*args),), {}) for args, _ in calls]


def measure_in_order(model: nn.Module, names: list[str], batches: list, measure: Measure) -> Iterator:
    """``(name, measure(...)'s value)`` for each of ``names`` (in execution order), each measured
    on the model as it is when the caller asks for it. ``batches``: ``(args, kwargs)`` calls.
    ``measure(layer, name)`` gives a forward hook for that layer (it may raise :class:`Stop` once
    it has what it needs) and a function that reads the value after the batches ran."""
    stacks = _outer_stacks(model, names)
    stacks = _called_once(model, stacks, batches[0]) if stacks and batches else []
    done = set()
    for i, name in enumerate(names):
        if name in done:
            continue
        stack = next((s for s in stacks if _inside(s, name)), None)
        calls = _stack_inputs(model, stack, batches) if stack is not None else None
        if calls is None:  # outside every stack, or the stack is not called with one input
            if stack is not None:
                stacks.remove(stack)
            done.add(name)
            yield name, _measure(model, name, name, batches, measure)
            continue
        for item in _walk(model.get_submodule(stack), stack, calls, [n for n in names[i:] if _inside(stack, n)],
                          measure):
            done.add(item[0])
            yield item
