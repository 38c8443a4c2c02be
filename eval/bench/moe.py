"""The MoE's grouped matmul on the GPU: the Pallas kernel (`gptoss_mla_jax.gmm`) against
`jax.lax.ragged_dot` and a dense matmul of the same FLOPs, in one process, at gpt-oss-20b's expert shapes.

    python -m eval.bench.moe [--tokens 4096 16384] [--out FILE]     # the benchmark table
    python -m eval.bench.moe --check [--out FILE]                   # bf16 agreement with ragged_dot
    python -m eval.bench.moe --sweep [--out FILE]                   # launch settings per kernel
    python -m eval.bench.moe --prefill 32768 [--out FILE]           # a whole-model prefill, each path

Cases: gate_up ([pairs, 2880] x [32, 2880, 5760]) and down ([pairs, 2880] x [32, 2880, 2880]) at top-4
(pairs = 4 x tokens), bf16 or MXFP4 weights, balanced routing or skewed (expert 0 takes a quarter of the
rows). Each is timed forward, forward + d(lhs) and (bf16) forward + d(lhs) + d(rhs); TFLOP/s counts the
useful FLOPs (2 x pairs x K x N per product). Times are medians of repeats after a compiling call
(`eval.bench.timing.timed`). A case that fails (ragged_dot's backward runs out of memory at 65,536 pairs) is
recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.timing import run_header, timed
from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.gmm import Mxfp4, Tiles, gmm, grouped_product, tgmm
from gptoss_mla_jax.mxfp4 import dequantize_experts, pad_scales
from support.results import write_json

E, TOP_K, D = GPT_OSS_20B.num_local_experts, GPT_OSS_20B.num_experts_per_tok, GPT_OSS_20B.hidden_size
# Stages timed, with the grouped products each one runs (forward; + d(lhs); + d(rhs)).
STAGES = {"forward": 1, "forward+d_lhs": 2, "forward+d_lhs+d_rhs": 3}
PROJECTIONS = {"gate_up": (D, 2 * GPT_OSS_20B.intermediate_size), "down": (GPT_OSS_20B.intermediate_size, D)}


def group_sizes(pairs: int, skewed: bool) -> np.ndarray:
    """Rows per expert: even, or expert 0 with a quarter of them and the rest even."""
    heavy = pairs // 4 if skewed else 0
    rest = np.full(E - (1 if skewed else 0), (pairs - heavy) // (E - (1 if skewed else 0)))
    rest[: pairs - heavy - rest.sum()] += 1
    return np.concatenate([[heavy], rest] if skewed else [rest]).astype(np.int32)


def make_weights(key, K: int, N: int, packed: bool):
    """Random experts at gpt-oss's weight scale: dense bf16 [E, K, N] or MXFP4 packed [E, N, K / 32, 16]."""
    if not packed:
        return (0.02 * jax.random.normal(key, (E, K, N), jnp.float32)).astype(jnp.bfloat16)
    k1, k2 = jax.random.split(key)
    blocks = jax.random.randint(k1, (E, N, K // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    return Mxfp4(blocks, jax.random.randint(k2, (E, N, K // 32), 118, 123, jnp.int32).astype(jnp.uint8))


def dense_of(w):
    return dequantize_experts(w.blocks, w.scales, jnp.bfloat16) if isinstance(w, Mxfp4) else w


def products(path: str):
    """{stage: fn(lhs, w, sizes, cotangent)} for one path: "gmm", "ragged_dot" (MXFP4 dequantized first, as
    the jnp path does) or "dense" (lhs @ w[0], same FLOPs)."""
    if path == "gmm":
        f = lambda l, w, s: gmm(l, w, s)
    elif path == "ragged_dot":
        f = lambda l, w, s: jax.lax.ragged_dot(l, dense_of(w), s)
    else:
        f = lambda l, w, s: l @ dense_of(w)[0]
    fwd = lambda l, w, s, c: f(l, w, s)

    def d_lhs(l, w, s, c):
        out, vjp = jax.vjp(lambda l: f(l, w, s), l)
        return out, vjp(c)

    def d_both(l, w, s, c):
        out, vjp = jax.vjp(lambda l, w: f(l, w, s), l, w)
        return out, vjp(c)

    return {"forward": fwd, "forward+d_lhs": d_lhs, "forward+d_lhs+d_rhs": d_both}


def inputs(tokens: int, projection: str, packed: bool, skewed: bool, seed: int = 0):
    K, N = PROJECTIONS[projection]
    pairs = tokens * TOP_K
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (pairs, K), jnp.bfloat16)
    cot = jax.random.normal(k2, (pairs, N), jnp.bfloat16)
    return lhs, make_weights(k3, K, N, packed), jnp.asarray(group_sizes(pairs, skewed)), cot


def benchmark(tokens_list, repeats: int) -> list[dict]:
    rows = []
    for tokens, projection, packed, skewed in itertools.product(
        tokens_list, PROJECTIONS, (False, True), (False, True)
    ):
        lhs, w, sizes, cot = inputs(tokens, projection, packed, skewed)
        K, N = PROJECTIONS[projection]
        flop = 2 * lhs.shape[0] * K * N
        for stage, path in itertools.product(STAGES, ("gmm", "ragged_dot", "dense")):
            if packed and stage.endswith("d_rhs"):
                continue  # packed experts do not train
            if path == "dense" and (skewed or packed):
                continue  # one dense peer per shape and stage
            row = {"tokens": tokens, "pairs": lhs.shape[0], "projection": projection,
                   "weights": "mxfp4" if packed else "bf16", "routing": "skewed" if skewed else "balanced",
                   "stage": stage, "path": path}  # fmt: skip
            try:
                fn = jax.jit(products(path)[stage])
                seconds = timed(fn, lhs, w, sizes, cot, repeats=repeats)
                row |= {"ms": 1e3 * seconds, "tflops": STAGES[stage] * flop / seconds / 1e12}
            except Exception as e:
                row |= {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del lhs, w, cot
    return rows


def relative_errors(got, want) -> dict:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return {
        "norm": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        "max": float(np.abs(got - want).max() / np.abs(want).max()),
        "mean": float(np.abs(got - want).mean() / np.abs(want).mean()),
    }


def check(tokens: int) -> list[dict]:
    """bf16 gmm and bf16 ragged_dot, each against ragged_dot on float32 copies of the same inputs: forward,
    d(lhs) and d(rhs), skewed routing (a group boundary inside tiles, one large group); MXFP4 weights with
    the checkpoint's scale rows and with them padded (`mxfp4.pad_scales`)."""
    rows = []
    for projection, weights in itertools.product(PROJECTIONS, ("bf16", "mxfp4", "mxfp4 padded")):
        packed = weights != "bf16"
        lhs, w, sizes, cot = inputs(tokens, projection, packed, skewed=True, seed=1)
        wd = dense_of(w)
        if weights == "mxfp4 padded":  # scale rows as `generate` gives them: the compiled folded decoding
            w = Mxfp4(w.blocks, pad_scales(w.scales))
        exact = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, precision="highest")
        ref_out, ref_vjp = jax.vjp(exact, lhs.astype(jnp.float32), wd.astype(jnp.float32))
        ref = (ref_out, *ref_vjp(cot.astype(jnp.float32)))
        for path in ("gmm", "ragged_dot"):
            fn = jax.jit(products(path)["forward+d_lhs+d_rhs"])
            out, (d_lhs, d_rhs) = fn(lhs, w if path == "gmm" else wd, sizes, cot)
            row = {"tokens": tokens, "projection": projection, "weights": weights,
                   "path": path, "forward": relative_errors(out, ref[0]),
                   "d_lhs": relative_errors(d_lhs, ref[1])}  # fmt: skip
            if not packed:
                row["d_rhs"] = relative_errors(d_rhs, ref[2])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


CANDIDATES = {
    "gmm": [Tiles(128, 128, 64, 4, 3), Tiles(128, 256, 64, 8, 3), Tiles(128, 128, 64, 4, 4),
            Tiles(256, 128, 64, 8, 3), Tiles(128, 64, 64, 4, 4)],
    "tgmm": [Tiles(64, 128, 0, 4, 3), Tiles(64, 128, 0, 8, 3), Tiles(32, 128, 0, 4, 4)],
    "mxfp4": [Tiles(128, 64, 64, 4, 3), Tiles(256, 64, 64, 8, 3), Tiles(256, 128, 64, 8, 3),
              Tiles(256, 64, 64, 8, 4), Tiles(256, 32, 64, 4, 3), Tiles(256, 64, 128, 8, 3),
              Tiles(128, 128, 64, 8, 3), Tiles(256, 128, 64, 8, 4), Tiles(256, 64, 64, 4, 3),
              Tiles(128, 64, 128, 4, 3)],
}  # fmt: skip
CANDIDATES["gmm_t"] = CANDIDATES["gmm"]
CANDIDATES["mxfp4_t"] = [
    Tiles(r, c, d, w, s)
    for r, d, c, w, s in ((t.rows, t.cols, t.depth, t.warps, t.stages) for t in CANDIDATES["mxfp4"])
]


def sweep(tokens: int, repeats: int, kinds=tuple(CANDIDATES)) -> dict:
    """Each kernel's candidates at `tokens` x top-4 pairs, balanced routing, for each projection (the
    launch table is keyed by shape)."""
    results = {}
    for kind in kinds:
        packed = kind.startswith("mxfp4")
        for projection in PROJECTIONS:
            lhs, w, sizes, cot = inputs(tokens, projection, packed, skewed=False)
            flop = 2 * lhs.shape[0] * lhs.shape[1] * cot.shape[1]
            rows = results.setdefault(f"{kind}/{projection}", [])
            for tiles in CANDIDATES[kind]:
                row = {"tiles": vars(tiles)}
                try:
                    if kind == "tgmm":
                        fn = jax.jit(lambda l, w, s, c, t=tiles: tgmm(l, c, s, jnp.bfloat16, launch=t))
                    else:
                        transpose = kind.endswith("_t")
                        fn = jax.jit(
                            lambda l, w, s, c, t=tiles, tr=transpose: grouped_product(
                                c if tr else l, w, s, None, tr, launch=t
                            )
                        )
                    seconds = timed(fn, lhs, w, sizes, cot, repeats=repeats)
                    row |= {"ms": 1e3 * seconds, "tflops": flop / seconds / 1e12}
                except Exception as e:
                    row |= {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(row)
                print(kind, projection, json.dumps(row), flush=True)
            best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
            print(f"best {kind} {projection}: {best}", flush=True)
    return results


def prefill(tokens: int, chunk: int = 2048) -> dict:
    """A `tokens` prompt prefilled into a bf16 cache in chunks of `chunk` (the whole prompt at once would
    materialize its attention scores), gpt-oss-20b shape with random MXFP4 experts, on the grouped matmul,
    on ragged_dot and (on the GPU, where it compiles) on the wide-batch MXFP4 kernel with the experts in its
    layout alone (`with_wide_experts(..., replace=True)`, as the command line holds them for a batch that
    takes it), with each path's last logits' largest difference from the grouped matmul's."""
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.flash_decode import runs_compiled
    from gptoss_mla_jax.model import ForwardOptions, forward, init_params, with_wide_experts

    params = init_params(GPT_OSS_20B, jax.random.key(0), jnp.bfloat16, experts="mxfp4")
    ids = jax.random.randint(jax.random.key(1), (1, tokens), 0, GPT_OSS_20B.vocab_size)
    out = {"tokens": tokens, "chunk": chunk, "experts": "mxfp4"}
    paths = {"gmm": (params, "gmm"), "ragged_dot": (params, "ragged_dot")}
    if runs_compiled():
        paths["wide"] = (with_wide_experts(params, GPT_OSS_20B, replace=True), "sparse")
    reference = None
    for impl, (p, moe) in paths.items():
        step = jax.jit(
            lambda p, t, c, moe=moe: forward(p, t, c, GPT_OSS_20B, options=ForwardOptions(moe=moe)),
            donate_argnums=2,
        )

        def run(p, ids, step=step):
            cache = init_cache(GPT_OSS_20B, 1, tokens, jnp.bfloat16)
            for start in range(0, tokens, chunk):
                logits, cache, _ = step(p, ids[:, start : start + chunk], cache)
            return logits[:, -1]

        try:
            seconds = timed(run, p, ids, repeats=3)
            out[impl] = {"s": seconds, "tokens_per_s": tokens / seconds}
            last = run(p, ids)
            reference = last if reference is None else reference
            out[impl]["max_abs_logit_difference"] = float(jnp.abs(last - reference).max())
        except Exception as e:
            out[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(impl, out[impl], flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="bf16 agreement with ragged_dot instead")
    mode.add_argument(
        "--sweep",
        nargs="*",
        choices=list(CANDIDATES),
        metavar="KERNEL",
        help="time the launch settings of these kernels (default all) instead",
    )
    mode.add_argument("--prefill", type=int, metavar="TOKENS", help="time a whole-model prefill instead")
    parser.add_argument(
        "--prefill-chunk", type=int, default=2048,
        help="--prefill: tokens a forward takes (past moe.WIDE_CHUNK the wide-batch kernel loops)",
    )  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run_header("eval.bench.moe", argv)
    result["launch"] = {"/".join(map(str, k)): vars(v) for k, v in gmm_lib.LAUNCH.items()}
    if args.check:
        result["check"] = check(args.tokens[0])
    elif args.sweep is not None:
        result["sweep"] = sweep(args.tokens[0], args.repeats, args.sweep or tuple(CANDIDATES))
    elif args.prefill:
        result["prefill"] = prefill(args.prefill, args.prefill_chunk)
    else:
        result["rows"] = benchmark(args.tokens, args.repeats)
    result["wall_s"] = time.perf_counter() - t0
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
