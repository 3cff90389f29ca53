"""One-line progress on a terminal for the long steps (calibration, algorithms, training).

Silent when stderr is not a terminal, so logs and CI output stay clean.
"""
from __future__ import annotations

import sys
from typing import Optional


class Progress:
    """``with Progress("calibrating", total) as p: ... p.step()`` prints ``label i/total``."""

    def __init__(self, label: str, total: Optional[int] = None, enabled: bool = True) -> None:
        self.label, self.total, self.count = label, total, 0
        self.live = enabled and sys.stderr.isatty()  # enabled=False: silent (data-parallel ranks but one)

    def step(self, note: str = "") -> None:
        self.count += 1
        if self.live:
            of = f"/{self.total}" if self.total else ""
            print(f"\rfewbits: {self.label} {self.count}{of} {note}".rstrip(), end="\033[K",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.live and self.count:
            print(file=sys.stderr)
