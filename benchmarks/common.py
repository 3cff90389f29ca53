"""Shared helpers for the benchmarks: threads, tables, JSON results, environment record."""
from __future__ import annotations

import os
import platform

import torch

from fewbits.report.table import format_table

THREADS = 2


def set_threads(n: int = THREADS) -> None:
    """Pin torch's thread pools: oversubscribed threads make torch crawl on 2 cores."""
    torch.set_num_threads(n)


def environment() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def print_table(rows: list[dict], title: str = "") -> None:
    print(format_table(rows, title))


def save_json(data: dict, path: str) -> None:
    """Write atomically (temp file + rename), with the environment recorded."""
    from fewbits.files import write_json_atomic

    payload = {"schema_version": 1, "environment": environment(), **data}
    write_json_atomic(path, payload, default=float)
    print(f"results: {path}")
