"""Independent jobs in forked worker processes, one torch thread each (what a per-layer score
needs: every layer's and format's work reads the same prepared models and writes one number).

Forked, not spawned: the workers inherit the prepared, calibrated models and any callable the
caller holds (a ``loss_fn`` closure, a model class defined in a script) without pickling them;
only each job's key and its result cross the process boundary. One torch thread per worker: a
forked child that starts GNU OpenMP's thread pool again hangs (checked here with torch 2.13:
a child at two threads never returned), and ``workers`` processes at one thread each is how the
cores are used anyway.
"""
from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Optional

from .progress import Progress

_WORK: Optional[Callable[[Any], Any]] = None  # set in the parent before forking; the children read it


def _start_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run(indexed: tuple) -> tuple:
    i, job = indexed
    return i, _WORK(job)


def run_jobs(work: Callable[[Any], Any], jobs: list, workers: int = 1, label: str = "job",
             note: Callable[[Any], str] = str) -> list:
    """``[work(job) for job in jobs]``, in ``workers`` forked processes when ``workers > 1`` (in
    this process otherwise), in the jobs' order, with progress under ``label``. ``work`` may be
    any callable (it is not pickled); a job and its result must pickle. An exception in a job is
    raised here, with the job named."""
    global _WORK
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = list(jobs)

    def named(job):
        try:
            return work(job)
        except Exception as err:  # the job's name travels with the error back to the parent
            raise RuntimeError(f"{label} {note(job)}: {type(err).__name__}: {err}") from err

    results: list = [None] * len(jobs)
    with Progress(label, len(jobs)) as progress:
        if workers == 1 or len(jobs) < 2:
            for i, job in enumerate(jobs):
                progress.step(note(job))
                results[i] = named(job)
            return results
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(f"workers={workers} needs processes started by fork, which this platform does not "
                             "have; use workers=1")
        _WORK = named
        try:
            with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), initializer=_start_worker) as pool:
                for i, result in pool.imap_unordered(_run, list(enumerate(jobs))):
                    results[i] = result
                    progress.step(note(jobs[i]))
        finally:
            _WORK = None
    return results
