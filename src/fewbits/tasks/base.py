"""What a built-in task provides: a trained fp32 model, calibration batches, and its metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class Task:
    """A real model on real data.

    ``calibration`` holds batches for :func:`fewbits.calibrate` (disjoint from the evaluation
    data); ``evaluate(model)`` returns every metric, the headline ``metric`` among them;
    ``train_data()``, where the task has one, returns its training set ``(inputs, labels)``
    tensors, or ready ``(inputs, None)`` batches for a task trained against its fp32 model only
    (quantization-aware training; never the test set); ``train_forward(model, inputs)`` is the
    output training compares, where it is not ``model(inputs)``; ``lower_is_better``: the
    headline metric improves downwards (perplexity).
    """

    name: str
    description: str
    model: nn.Module
    calibration: list
    metric: str
    evaluate: Callable[[nn.Module], dict]
    train_data: Optional[Callable[[], tuple | list]] = None
    train_forward: Optional[Callable] = None
    lower_is_better: bool = False


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent."""
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3,
        batch: int = 64, seed: int = 0) -> nn.Module:
    """A small, seeded Adam training loop for the tiny tasks."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def classification_task(name, description, model, x_cal, x_test, y_test, batch: int = 64, train=None) -> Task:
    calibration = list(x_cal.split(batch))
    return Task(name, description, model, calibration, "accuracy",
                lambda m: {"accuracy": accuracy(m, x_test, y_test)}, train)
