"""Timing ONNX Runtime sessions fairly: medians over repeats, the sessions interleaved round by
round (order rotated) so that a slow spell of the machine falls on all of them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(runs: dict[str, Callable[[], object]], seconds_per_engine: float = 8.0,
                        sample_seconds: float = 0.05, min_rounds: int = 9, max_rounds: int = 40) -> dict:
    """Median seconds per call of each zero-argument callable in ``runs``: three warm-up calls
    each, then rounds in which every callable runs for about ``sample_seconds``, between
    ``min_rounds`` and ``max_rounds`` rounds (about ``seconds_per_engine`` each)."""
    names = list(runs)
    single = {}
    for n in names:  # warm-up, and a first estimate of one run
        for _ in range(3):
            runs[n]()
        t0 = time.perf_counter()
        runs[n]()
        single[n] = time.perf_counter() - t0
    inner = {n: max(1, int(sample_seconds / max(single[n], 1e-6))) for n in names}
    rounds = max(min_rounds, min(max_rounds, int(seconds_per_engine / max(single[n] * inner[n] for n in names))))
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            for _ in range(inner[n]):
                runs[n]()
            samples[n].append((time.perf_counter() - t0) / inner[n])
    return {n: {"median_s": statistics.median(s), "rounds": rounds, "runs_per_sample": inner[n]}
            for n, s in samples.items()}
