"""Shared timing helper for the benchmark scripts (median wall time of repeated calls)."""

import statistics
import time

import torch


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_times(baseline, candidate, repeats: int = 15, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``baseline()`` and ``candidate()``, run alternately.

    Alternating the two keeps a busy machine's slow spells from landing on one side only.
    The ratio to report is :func:`paired_ratio` of the same pairs.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    tb, tc = [], []
    for _ in range(repeats):
        tb.append(median_time(baseline, repeats=1, warmup=0))
        tc.append(median_time(candidate, repeats=1, warmup=0))
    paired_times.last_ratios = [c / b for b, c in zip(tb, tc)]
    return statistics.median(tb), statistics.median(tc)


def paired_ratio() -> tuple[float, float, float]:
    """Median and quartiles of candidate/baseline over the last :func:`paired_times` pairs."""
    q = statistics.quantiles(paired_times.last_ratios, n=4)
    return statistics.median(paired_times.last_ratios), q[0], q[2]
