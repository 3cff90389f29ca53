"""One-level torch.fx tracing: a module's own forward with every submodule a leaf.

What the graph passes read (BatchNorm folding, the quantized ops between layers): the calls a
forward makes to its children, whatever Python it uses to make them (``self.bn1(self.conv1(x))``
as well as an ``nn.Sequential``), without tracing into the children.
"""
from __future__ import annotations

from torch import fx, nn


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
