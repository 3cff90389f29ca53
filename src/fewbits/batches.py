"""Batches for training loops."""
from __future__ import annotations


class ShuffledBatches:
    """``(inputs, labels)`` batches of a training set, reshuffled (seeded) on every pass."""

    def __init__(self, x, y, batch_size: int, seed: int = 0) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # the last partial batch is dropped

    def __iter__(self):
        import torch

        order = torch.randperm(len(self.x), generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

