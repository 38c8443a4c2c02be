"""Benchmark timing: the median of repeated calls after a warm-up (compilation) call."""

from __future__ import annotations

import time

import jax
import numpy as np


def timed(fn, *args, repeats: int = 5) -> float:
    """Median seconds of `fn(*args)` after one warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))
