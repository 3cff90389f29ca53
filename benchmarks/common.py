"""Shared helpers for the benchmarks: threads, tables, JSON results, environment record."""
from __future__ import annotations

import os
import platform

import torch
from torch import nn

from fewbits.report.table import format_table
from fewbits.target import cpu_name

THREADS = 2


def set_threads(n: int = THREADS) -> None:
    """Pin torch's thread pools: oversubscribed threads make torch crawl on 2 cores."""
    torch.set_num_threads(n)


def environment() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}


def print_table(rows: list[dict], title: str = "") -> None:
    print(format_table(rows, title))


def save_json(data: dict, path: str) -> None:
    """Write atomically (temp file + rename), with the environment recorded."""
    from fewbits.files import write_json_atomic

    payload = {"schema_version": 1, "environment": environment(), **data}
    write_json_atomic(path, payload, default=float)
    print(f"results: {path}")


# ---- what each task's exported file returns --------------------------------------------------
class MobileNetOutputs(nn.Module):
    """Pooled features and logits as two outputs, so the probe can read an ONNX model too."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        pool = getattr(self.model, "pool", None)  # the quantized global pool of recipes with ``pools``
        if pool is None:
            f = nn.functional.adaptive_avg_pool2d(self.model.features(x), 1).flatten(1)
            return f, self.model.classifier(f)
        f = pool(self.model.features(x)).flatten(1)
        logits = self.model.classifier(f)
        return (f if torch.is_floating_point(f) else pool.out.dequantize(f)), logits


class MiniLMHidden(nn.Module):
    """The last hidden state as one output (the tokenizer's three inputs by name)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
