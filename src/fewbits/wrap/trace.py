"""One-level torch.fx tracing: a module's own forward with every submodule a leaf.

What the graph passes read (BatchNorm folding, the quantized ops between layers): the calls a
forward makes to its children, whatever Python it uses to make them (``self.bn1(self.conv1(x))``
as well as an ``nn.Sequential``), without tracing into the children.
"""
from __future__ import annotations

from torch import fx, nn


def torch_builtin(module: nn.Module) -> bool:
    """One of torch.nn's own modules (containers, layers, activations, norms): what the graph
    rewrites look at from outside, never into (a user's or a library's blocks they trace)."""
    return type(module).__module__.startswith("torch.nn.")


class OneLevelTracer(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module


def trace_one_level(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s forward, its submodules as leaves; raises what torch.fx raises
    for a forward it cannot trace."""
    return OneLevelTracer(module).trace(module)


def install_graph(work: nn.Module, name: str, module: nn.Module, graph: fx.Graph) -> nn.Module:
    """Put ``module`` (called ``name`` in ``work``) back as a ``torch.fx.GraphModule`` of the
    rewritten ``graph``, with the same children; returns ``work`` (the new module when ``name``
    is the model itself, which then keeps its plain attributes: a config, flags)."""
    graph.lint()
    rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
    if name:
        parent, _, leaf = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, leaf, rewritten)
        return work
    for key, value in vars(module).items():  # attributes the graph does not use
        if not key.startswith("_") and key != "training" and not hasattr(rewritten, key):
            setattr(rewritten, key, value)
    rewritten.train(module.training)
    return rewritten
