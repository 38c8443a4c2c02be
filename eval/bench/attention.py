"""Attention of a chunk without a cache on the GPU: the Pallas flash-attention kernel
(`gptoss_mla_jax.flash_attention`) against the jnp path (`attention.attend`), in one process, at
gpt-oss-20b's attention shape (64 query heads over 8 kv heads, head dim 64, sinks), bf16.

    python -m eval.bench.attention [--shapes 2x2048 1x8192] [--out FILE]   # the table
    python -m eval.bench.attention --check [--out FILE]                    # bf16 agreement, both paths
    python -m eval.bench.attention --sweep [--out FILE]                    # launch settings per kernel

Each (batch x tokens, full or sliding window of 128) is timed forward and forward + backward (the
gradients of q, k, v and the sinks). TFLOP/s counts the useful FLOPs: 4 x d per visible (query, key) pair
and head forward (scores and values), 2.5 times that for the backward's five products. Times are medians
of repeats after a compiling call (`eval.bench.timing.timed`); a case that fails (the jnp path's scores
run out of memory at long contexts) is recorded with its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.moe import relative_errors
from eval.bench.timing import run_header, timed
from gptoss_mla_jax import flash_attention as fa
from gptoss_mla_jax.attention import attend
from gptoss_mla_jax.config import GPT_OSS_20B
from support.results import write_json

H, G, D = GPT_OSS_20B.num_attention_heads, GPT_OSS_20B.num_key_value_heads, GPT_OSS_20B.head_dim
WINDOW = GPT_OSS_20B.sliding_window


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal row set of T tokens sees, within `window` keys if given."""
    seen = np.minimum(np.arange(1, T + 1), window or T)
    return int(seen.sum())


def inputs(B: int, T: int, dtype=jnp.bfloat16, seed: int = 0):
    keys = iter(jax.random.split(jax.random.key(seed), 5))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q, k, v, cot = normal(B, T, H, D), normal(B, T, G, D), normal(B, T, G, D), normal(B, T, H, D)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(H), cot.astype(dtype))


def paths(T: int, window: int | None) -> dict:
    """path name -> attention(q, k, v, sinks) over all T tokens of each row."""
    positions = jnp.arange(T)[None]

    def jnp_path(q, k, v, sinks):
        B = q.shape[0]
        pos = jnp.broadcast_to(positions, (B, T))
        return attend(q, [(k, v, pos, jnp.ones((B, T), bool))], pos, sinks, window)

    def flash(q, k, v, sinks):
        return fa.flash_attention(q, k, v, jnp.full((q.shape[0],), T, jnp.int32), sinks, window)

    return {"flash": flash, "jnp": jnp_path}


def stages(fn) -> dict:
    def backward(q, k, v, sinks, cot):
        out, vjp = jax.vjp(fn, q, k, v, sinks)
        return out, vjp(cot)

    return {"forward": lambda q, k, v, sinks, cot: fn(q, k, v, sinks), "forward+backward": backward}


def benchmark(shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    rows = []
    for (B, T), window in itertools.product(shapes, (None, WINDOW)):
        args = inputs(B, T)
        flop = 4 * D * H * B * visible_pairs(T, window)
        for (path, fn), stage in itertools.product(paths(T, window).items(), ("forward", "forward+backward")):
            row = {"batch": B, "tokens": T, "window": window, "path": path, "stage": stage}
            total = flop * (1 if stage == "forward" else 3.5)
            try:
                seconds = timed(jax.jit(stages(fn)[stage]), *args, repeats=repeats)
                row |= {"ms": 1e3 * seconds, "tflops": total / seconds / 1e12}
            except Exception as e:
                row |= {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def check(B: int, T: int) -> list[dict]:
    """bf16 on the kernel and bf16 on jnp, each against jnp on float32 copies of the same inputs: output
    and the gradients of q, k, v and the sinks."""
    rows = []
    for window in (None, WINDOW):
        args = inputs(B, T)
        exact_paths = paths(T, window)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(stages(exact_paths["jnp"])["forward+backward"])(
                *(a.astype(jnp.float32) for a in args)
            )
        for path, fn in exact_paths.items():
            out, grads = jax.jit(stages(fn)["forward+backward"])(*args)
            row = {"batch": B, "tokens": T, "window": window, "path": path,
                   "forward": relative_errors(out, ref[0])}  # fmt: skip
            for name, got, want in zip(("d_q", "d_k", "d_v", "d_sinks"), grads, ref[1], strict=True):
                row[name] = relative_errors(got, want)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


CANDIDATES = {
    "forward": [fa.Blocks(128, 64, 4, 3), fa.Blocks(128, 128, 8, 3), fa.Blocks(64, 64, 4, 3),
                fa.Blocks(128, 64, 8, 2), fa.Blocks(128, 32, 4, 4)],
    "dkdv": [fa.Blocks(64, 64, 4, 2), fa.Blocks(64, 128, 8, 2), fa.Blocks(32, 128, 8, 3),
             fa.Blocks(64, 64, 4, 3), fa.Blocks(32, 64, 4, 3)],
    "dq": [fa.Blocks(64, 64, 4, 2), fa.Blocks(128, 64, 8, 2), fa.Blocks(128, 32, 8, 3),
           fa.Blocks(64, 64, 4, 3), fa.Blocks(64, 32, 4, 3)],
}  # fmt: skip


def sweep(B: int, T: int, repeats: int, kinds=tuple(CANDIDATES)) -> dict:
    """Each kernel's candidates (the others at their table settings), full attention: the forward alone
    for "forward", forward + backward for the backward kernels."""
    results = {}
    args = inputs(B, T)
    flash = paths(T, None)["flash"]
    for kind in kinds:
        rows = results.setdefault(kind, [])
        for blocks in CANDIDATES[kind]:
            row = {"blocks": dataclasses.asdict(blocks)}
            saved = fa.LAUNCH[kind]
            fa.LAUNCH[kind] = blocks
            try:  # a fresh function per setting: the launch table is read at trace time
                run = stages(lambda *a: flash(*a))["forward" if kind == "forward" else "forward+backward"]
                row["ms"] = 1e3 * timed(jax.jit(run), *args, repeats=repeats)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                fa.LAUNCH[kind] = saved
            rows.append(row)
            print(kind, json.dumps(row), flush=True)
        best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
        print(f"best {kind}: {best}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["2x2048", "1x8192"], help="BATCHxTOKENS")
    parser.add_argument("--repeats", type=int, default=10)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="bf16 agreement with float32 jnp instead")
    mode.add_argument(
        "--sweep", nargs="*", choices=list(CANDIDATES), metavar="KERNEL",
        help="time the launch settings of these kernels (default all) instead",
    )  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    t0 = time.perf_counter()
    result = run_header("eval.bench.attention", argv)
    result["launch"] = {k: dataclasses.asdict(v) for k, v in fa.LAUNCH.items()}
    if args.check:
        result["check"] = check(*shapes[0])
    elif args.sweep is not None:
        result["sweep"] = sweep(*shapes[0], args.repeats, args.sweep or tuple(CANDIDATES))
    else:
        result["rows"] = benchmark(shapes, args.repeats)
    result["wall_s"] = time.perf_counter() - t0
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
