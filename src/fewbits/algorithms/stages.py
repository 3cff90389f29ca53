"""Staged execution: measure layer after layer in execution order without re-running the model
from its input for each one.

A driver that corrects layers one at a time (bias correction, GPTQ: each layer is measured with
the earlier ones already changed) would otherwise run every batch through the whole prefix of
the model once per layer — cost growing with the square of the depth. Here the model runs up to
the first *stack* and the inputs of its first child are kept; each child then runs alone on the
kept inputs, once per layer inside it, and its outputs become the next child's inputs (only one
child's inputs are held at a time: the "sequential pipeline" of LLM toolkits). A stack is

- an ``nn.Sequential`` whose own ``forward`` chains its children, or
- an ``nn.ModuleList`` whose children a forward calls in order — a decoder's layers: each
  child's first argument is the previous child's output (or its first element), every other
  argument and keyword (attention mask, rotary embeddings) the same objects for all of them.

Whether a candidate is one is checked on one real forward of the first batch (each child called
once, in order, its input the previous one's output, the rest shared, and the first two give
the same output again when run alone — a key/value cache appended to on every call does not),
never assumed. A child
that is itself an ``nn.Sequential`` is entered the same way. Layers outside every stack (a
classifier after the features, an LM head) are measured from the model's input, as before.

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


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_stack(module: nn.Module) -> bool:
    return _is_sequential(module) or (isinstance(module, nn.ModuleList) and len(module) >= 2)


def _inside(prefix: str, name: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _outer_stacks(model: nn.Module, names: list[str]) -> list[str]:
    """The outermost candidate stacks holding at least two of ``names`` in different children,
    whose layers among ``names`` run contiguously in execution order (a shared module called
    from elsewhere would break the chain)."""
    stacks = []
    for path, module in model.named_modules():
        if not _is_stack(module) or any(_inside(s, path) for s in stacks):
            continue
        held = [i for i, n in enumerate(names) if _inside(path, n)]
        children = {n[len(path) + 1 if path else 0:].split(".")[0] for n in (names[i] for i in held)}
        if len(children) >= 2 and held == list(range(held[0], held[-1] + 1)):
            stacks.append(path)
    return stacks


def _link(out, nxt) -> str | None:
    """How ``nxt`` (the next child's first argument) came from ``out``: ``"whole"``, ``"first"``
    (its first element), or ``None``."""
    if nxt is out:
        return "whole"
    if isinstance(out, tuple) and out and nxt is out[0]:
        return "first"
    return None


def _chain_link(calls: list, children: int) -> str | None:
    """``calls``: ``(child index, args, kwargs, output)`` of one forward, in call order. The link
    of a chain (each child once, in order, fed the previous output, the rest shared), else ``None``."""
    if [c[0] for c in calls] != list(range(children)) or not calls[0][1]:
        return None
    _, args0, kwargs0, _ = calls[0]
    links = set()
    for (_, _, _, out), (_, args, kwargs, _) in zip(calls, calls[1:]):
        link = _link(out, args[0]) if args else None
        shared = len(args) == len(args0) and all(a is b for a, b in zip(args[1:], args0[1:])) and \
            kwargs.keys() == kwargs0.keys() and all(kwargs[k] is kwargs0[k] for k in kwargs)
        if link is None or not shared:
            return None
        links.add(link)
    return links.pop() if len(links) == 1 else None


def _chained(model: nn.Module, stacks: list[str], batch) -> dict[str, str]:
    """``{stack: link}`` for the stacks one forward of ``batch`` runs as a chain."""
    seen: dict = {p: [] for p in stacks}

    def record(path, index):
        def hook(_module, args, kwargs, out):
            seen[path].append((index, args, kwargs, out))
        return hook

    hooks = [child.register_forward_hook(record(p, i), with_kwargs=True)
             for p in stacks for i, child in enumerate(model.get_submodule(p).children())]
    with torch.no_grad():
        run_batches(model, [batch], hooks)
    links = {p: _chain_link(seen[p], len(list(model.get_submodule(p).children()))) for p in stacks}
    return {p: link for p, link in links.items() if link is not None and _replays(model.get_submodule(p), seen[p])}


@torch.no_grad()
def _replays(stack: nn.Module, calls: list) -> bool:
    """Whether the first two children give their recorded outputs again when run alone on their
    recorded inputs: a child that keeps state between calls (a key/value cache passed along
    and appended to) does not, and its stack must run whole."""
    children = list(stack.children())
    for index, args, kwargs, out in calls[:2]:
        try:
            again = children[index](*args, **kwargs)
        except (RuntimeError, ValueError, IndexError):
            return False
        first, want = (again[0], out[0]) if isinstance(out, tuple) else (again, out)
        if not (isinstance(first, torch.Tensor) and first.shape == want.shape and torch.equal(first, want)):
            return False
    return True


def _stack_inputs(model: nn.Module, stack: str, batches: list) -> list | None:
    """The first child's call ``(args, kwargs)`` for every batch (the rest of each forward skipped),
    or ``None`` when a batch did not reach it."""
    kept = []

    def grab(_module, args, kwargs):
        kept.append((args, kwargs))
        raise Stop

    first = next(iter(model.get_submodule(stack).children()))
    run_batches(model, batches, [first.register_forward_pre_hook(grab, with_kwargs=True)])
    return kept if len(kept) == len(batches) else None


def _measure(module: nn.Module, relative: str, name: str, calls: list, measure: Measure) -> torch.Tensor:
    """Run ``calls`` through ``module`` with ``measure``'s hook on its descendant ``relative``."""
    layer = module.get_submodule(relative)
    hook, read = measure(layer, name)
    run_batches(module, calls, [layer.register_forward_hook(hook)])
    return read()


def _walk(stack: nn.Module, path: str, calls: list, names: list[str], measure: Measure, link: str) -> Iterator:
    children = [(f"{path}.{key}" if path else key, child) for key, child in stack.named_children()]
    last = max(i for i, (p, _) in enumerate(children) if any(_inside(p, n) for n in names))
    for i, (child_path, child) in enumerate(children[:last + 1]):
        inner = [n for n in names if _inside(child_path, n)]
        if inner and _is_sequential(child) and len(calls[0][0]) == 1 and not calls[0][1]:
            yield from _walk(child, child_path, calls, inner, measure, "whole")
        else:
            for name in inner:
                yield name, _measure(child, name[len(child_path) + 1:], name, calls, measure)
        if i < last:  # the next child's inputs, with whatever the caller changed in this one
            outs = [child(*args, **kwargs) for args, kwargs in calls]
            calls = [(((out if link == "whole" else out[0]), *args[1:]), kwargs)
                     for out, (args, kwargs) in zip(outs, calls)]


def measure_in_order(model: nn.Module, names: list[str], batches: list, measure: Measure) -> Iterator:
    """``(name, measure(...)'s value)`` for each of ``names`` (in execution order), each measured
    on the model as it is when the caller asks for it. ``batches``: ``(args, kwargs)`` calls.
    ``measure(layer, name)`` gives a forward hook for that layer (it may raise :class:`Stop` once
    it has what it needs) and a function that reads the value after the batches ran."""
    stacks = _outer_stacks(model, names)
    links = _chained(model, stacks, batches[0]) if stacks and batches else {}
    done = set()
    for i, name in enumerate(names):
        if name in done:
            continue
        stack = next((s for s in links if _inside(s, name)), None)
        calls = _stack_inputs(model, stack, batches) if stack is not None else None
        if calls is None:  # outside every stack, or a batch never reached it
            links.pop(stack, None)
            done.add(name)
            yield name, _measure(model, name, name, batches, measure)
            continue
        for item in _walk(model.get_submodule(stack), stack, calls, [n for n in names[i:] if _inside(stack, n)],
                          measure, links[stack]):
            done.add(item[0])
            yield item
