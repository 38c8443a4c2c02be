"""Benchmark timing: the median of repeated calls after a warm-up (compilation) call, the device's own busy
time under the profiler, the copy bandwidth a memory-bound step is measured against, module switches set
for one measurement, and the header every results file starts with."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time

import jax
import jax.numpy as jnp
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


def copy_bandwidth(gigabytes: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline for memory-bound steps."""
    x = jnp.ones((int(gigabytes * 1e9) // 2,), jnp.bfloat16)
    return 2 * x.nbytes / timed(jax.jit(lambda x: x + 1), x)


@contextlib.contextmanager
def switched(*settings: tuple[object, str, object]):
    """Module switches that a step reads when it is traced, each (module, name, value), set for the block
    (compiled steps dropped, so that they are traced anew) and restored after it, whatever happens."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def in_loop(fn, inner: int):
    """`fn(params, x) -> x'` applied `inner` times in one jitted loop, each on the last's output: a small
    op's device time without a host dispatch per call (divide by `inner`)."""
    return jax.jit(lambda p, x: jax.lax.fori_loop(0, inner, lambda _, x: fn(p, x), x))


def traced(run):
    """`run()` under JAX's profiler: (its wall seconds, the profile)."""
    import glob
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        t = time.perf_counter()
        run()
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        return wall, jax.profiler.ProfileData.from_file(
            glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
        )


def device_us(fn, *args, calls: int = 20) -> dict:
    """`fn(*args)` (jitted) `calls` times under the profiler: the device's busy microseconds per call and
    each kernel's (by name): small kernels' own times, which a wall clock buries under dispatch."""
    jax.block_until_ready(fn(*args))
    _, trace = traced(lambda: [jax.block_until_ready(fn(*args)) for _ in range(calls)])
    events = gpu_events(trace)
    by_name: dict[str, float] = {}
    for _, duration, name in events:
        by_name[name[:80]] = by_name.get(name[:80], 0.0) + duration / 1e3 / calls
    return {"busy_us": busy_ns(events) / 1e3 / calls, "kernels_us": by_name}


def gpu_events(trace) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, name) of the kernels on the GPU's streams of a profile, in start order."""
    events = []
    for plane in trace.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
    return sorted(events)


def busy_ns(events) -> float:
    """The union of the events' intervals (overlaps counted once)."""
    busy, end = 0.0, 0.0
    for start, duration, _ in events:
        busy += max(0.0, start + duration - max(start, end))
        end = max(end, start + duration)
    return busy


def kernel_summary(trace, steps: int, top: int = 25) -> dict:
    """Kernel events on the GPU's streams of a profile: count, busy time, and the `top` names by time."""
    events = gpu_events(trace)
    busy, end = busy_ns(events), max((start + duration for start, duration, _ in events), default=0.0)
    gaps = sorted(
        ((b[0] - a[0] - a[1], a[2][:60], b[2][:60]) for a, b in itertools.pairwise(events)), reverse=True
    )
    by_name: dict[str, list[float]] = {}
    for _, duration, name in events:
        by_name.setdefault(name[:120], []).append(duration)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "kernels_per_step": len(events) / steps,
        "busy_ms_per_step": busy / 1e6 / steps,
        "span_ms_per_step": (end - events[0][0]) / 1e6 / steps if events else 0.0,
        "top": [
            {"name": n, "per_step": len(d) / steps, "us_per_step": sum(d) / 1e3 / steps} for n, d in ranked
        ],
        "gap_us_median": float(np.median([g[0] for g in gaps])) / 1e3 if gaps else 0.0,
        "largest_gaps": [{"us": g / 1e3, "after": a, "before": b} for g, a, b in gaps[:top]],
    }
