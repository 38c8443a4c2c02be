"""Where the Mosaic GPU decompressed-MLA decode kernel's time goes (`flash_decode_mosaic`), on a GPU.

gpt-oss-20b's decode attention (8 kv heads of 8 query heads, head dim 64, latent 192, bf16 cache of full
sequences) at each `--points` batch x context, the slices `flash_decode.plan` gives:
- the time of the Triton kernel (`flash_decode.decompressed_splits`) and of the Mosaic GPU one at 4 and 8
  warps, in one process (median of `--repeats` after a warm-up);
- at `--profile` (one batch x context), Mosaic GPU's in-kernel profiler over the kernel's named scopes
  (latent_wait, rebuild, rotary_wait, rope, keys_wait, scores, softmax, values): per warpgroup of a
  program, the SM cycles it spends in each per block of 64 slots, and its whole trace's per block (the
  profiler's buffer cut to the shared memory the program leaves, `space_for`).

    python -m eval.experiments.mosaic_profile [--points 8,32768,64,32768] [--profile 8,32768] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from eval.bench.timing import run_header, timed
from gptoss_mla_jax import flash_decode, flash_decode_mosaic
from gptoss_mla_jax.flash_decode import Launch
from support.results import write_json

G, R, D, LATENT = 8, 8, 64, 192  # gpt-oss-20b's kv heads, query heads each, head dim; the latent's width
SCOPES = ("latent_wait", "rebuild", "rotary_wait", "rope", "keys_wait", "scores", "softmax", "values")


def inputs(batch: int, context: int, seed: int = 0):
    """Scaled queries, bf16 latent cache, grouped key up-projection (bf16, float32 bias), shared cos / sin,
    full lengths: `decompressed_splits`'s arguments."""
    P = flash_decode.kv_heads_per_program(G, R)
    keys = iter(jax.random.split(jax.random.key(seed), 5))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q = normal(batch, G, R, D) * D**-0.5
    c = normal(batch, context, LATENT).astype(jnp.bfloat16)
    w_k = (normal(G // P, LATENT, P * D) * LATENT**-0.5).astype(jnp.bfloat16)
    b_k = normal(G // P, P * D)
    angles = jnp.arange(context)[None, :, None] * 10_000.0 ** (-jnp.arange(D // 2) / (D // 2))
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, c, (w_k, b_k), (jnp.cos(angles), jnp.sin(angles)), lengths


def launch_of(batch: int, context: int, warps: int) -> Launch:
    """The launch the model gives decompressed MLA's kernel at this point (`flash_decode.plan_for`)."""
    programs = flash_decode.programs_per_slice("decompressed", batch, G, R, None)
    splits, block = flash_decode.plan_for("decompressed", context, programs, 64)
    return Launch(splits, block, warps=warps)


def times(batch: int, context: int, repeats: int) -> dict:
    """Milliseconds of each kernel on the same inputs."""
    args = inputs(batch, context)
    kernels = {
        "triton": (flash_decode.decompressed_splits, launch_of(batch, context, 4)),
        "mosaic": (flash_decode_mosaic.decompressed_splits, launch_of(batch, context, 4)),
        "mosaic2": (flash_decode_mosaic.decompressed_splits, launch_of(batch, context, 8)),
    }
    row = {"batch": batch, "context": context, "splits": launch_of(batch, context, 4).splits}
    for name, (fn, launch) in kernels.items():
        try:
            row[f"{name}_ms"] = 1e3 * timed(jax.jit(lambda *a, fn=fn, launch=launch: fn(*a, launch=launch)),
                                            *args, repeats=repeats)  # fmt: skip
        except Exception as e:  # a kernel that fails to compile is a result too
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:1500]
    return row


def space_for(launch: Launch, space: int) -> int:
    """`space` (the profiler's events / 2 a warpgroup, 16 bytes each in shared memory), or as much as fits
    beside the program's own shared memory."""
    warpgroups = flash_decode_mosaic.CONSUMERS[launch.warps]
    P = flash_decode.kv_heads_per_program(G, R)
    own = flash_decode_mosaic.smem_bytes(LATENT, D // 2, P, R, launch.block, warpgroups)
    return min(space, (flash_decode_mosaic.SMEM_BYTES - own) // (16 * warpgroups))


def summary(trace: dict, warpgroups: int) -> dict:
    """Per warpgroup of a program (at 8 warps 0 makes the keys, 1 attends): the SM cycles it spends in
    each scope and from its first event to its last, per block of the slice (one `rebuild` a block),
    averaged over the programs."""
    by_tid = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        by_tid[event["tid"]].append(event)
    blocks = sum(e["name"] == "rebuild" and e["ph"] == "E" for e in trace["traceEvents"])
    rows = [{"warpgroup": w, "cycles_per_block": collections.defaultdict(float), "span": 0.0} for w in
            range(warpgroups)]  # fmt: skip
    for tid, events in by_tid.items():
        row = rows[(tid - 1) % warpgroups]  # the profiler numbers a program's warpgroup traces in a row
        open_at = {}
        for event in events:  # ts: the SM's %clock / 1e3 (the profiler's own unit)
            if event["ph"] == "B":
                open_at[event["name"]] = event["ts"]
            else:
                row["cycles_per_block"][event["name"]] += 1e3 * (event["ts"] - open_at.pop(event["name"]))
        row["span"] += 1e3 * (events[-1]["ts"] - events[0]["ts"])
    n = max(blocks, 1)
    out = []
    for row in rows:
        per_block = {
            name: row["cycles_per_block"][name] / n for name in SCOPES if name in row["cycles_per_block"]
        }
        span = row["span"] / n
        out.append({"warpgroup": row["warpgroup"], "cycles_per_block": per_block,
                    "in_scopes": sum(per_block.values()), "first_to_last_event": span})  # fmt: skip
    return {"blocks": blocks, "warpgroups": out}


def profiled(batch: int, context: int, warps: int, space: int) -> dict:
    """One call of the Mosaic GPU kernel with its profiler on (`space` events a warpgroup), summarised."""
    launch = launch_of(batch, context, warps)
    with tempfile.TemporaryDirectory() as folder:
        params = dataclasses.replace(
            flash_decode_mosaic.COMPILER_PARAMS, profile_space=space_for(launch, space), profile_dir=folder
        )
        saved, flash_decode_mosaic.COMPILER_PARAMS = flash_decode_mosaic.COMPILER_PARAMS, params
        try:
            jax.clear_caches()
            out = flash_decode_mosaic.decompressed_splits(*inputs(batch, context), launch=launch)
            jax.block_until_ready(out)
            jax.effects_barrier()  # the profile is written by a host callback
        finally:
            flash_decode_mosaic.COMPILER_PARAMS = saved
            jax.clear_caches()
        (path,) = glob.glob(os.path.join(folder, "*trace.json"))
        with open(path) as f:
            return {"batch": batch, "context": context, "warps": warps} | summary(json.load(f), warps // 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", default="8,32768,64,32768", help="batch,context pairs to time")
    parser.add_argument("--profile", default="8,32768", help="batch,context to profile ('' for none)")
    # 16 bytes of shared memory a unit a warpgroup: at 8 warps 448 fits beside the kernel's 216,168 bytes
    parser.add_argument(
        "--space", type=int, default=448, help="the profiler's space a warpgroup (events / 2)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    numbers = [int(n) for n in args.points.split(",")]
    result = run_header("eval.experiments.mosaic_profile", argv) | {"times": [], "profiles": []}
    for batch, context in zip(numbers[::2], numbers[1::2], strict=True):
        result["times"].append(times(batch, context, args.repeats))
        print(result["times"][-1], flush=True)
    if args.profile:
        batch, context = (int(n) for n in args.profile.split(","))
        for warps in (4, 8):
            try:
                result["profiles"].append(profiled(batch, context, warps, args.space))
            except Exception as e:
                result["profiles"].append({"warps": warps, "error": f"{type(e).__name__}: {e}"[:1500]})
            print(result["profiles"][-1], flush=True)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
