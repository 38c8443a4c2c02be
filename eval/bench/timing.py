"""Benchmark timing: the median of repeated calls after a warm-up (compilation) call, and the header every
results file starts with."""

from __future__ import annotations

import sys
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


def run_header(module: str, argv) -> dict:
    """The command that made a results file (`argv`: the module's arguments, None for the process's own),
    the card and the JAX version."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python -m {module} " + " ".join(args), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__}  # fmt: skip
