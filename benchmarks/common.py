"""Shared helpers for the benchmarks: threads, tables, JSON results, environment record."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

THREADS = 2


def set_threads(n: int = THREADS) -> None:
    """Pin torch's thread pools: oversubscribed threads make torch crawl on 2 cores."""
    torch.set_num_threads(n)


def environment() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def print_table(rows: list[dict], title: str = "") -> None:
    """A plain Markdown table (so it pastes into docs/ unchanged)."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}".rstrip("0").rstrip(".")
    return str(v)


def save_json(data: dict, path: str) -> None:
    """Write atomically (temp file + rename), with the environment recorded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema_version": 1, "environment": environment(), **data}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(f.name, path)
    print(f"results: {path}")
