"""Decode speed and capacity of a gpt-oss-20b-shaped model, GQA against MLA, with transformers as the peer.

    python -m eval.bench.decode [--batches 1,8,64] [--contexts 4096,32768,131072] [--out FILE]
    python -m eval.bench.decode --capacity            # largest batch whose cache fits, GQA vs MLA
    python -m eval.bench.decode --transformers        # transformers' GptOssForCausalLM, batch 1
    python -m eval.bench.decode --with-transformers   # both, the peer first in its own process (4K context)
    python -m eval.bench.decode --kernels             # the Pallas decode kernels vs jnp and JAX's stock gqa
    python -m eval.bench.decode --moe 1,8,64,256      # one layer's MoE on the kernels vs jnp and its floor
    python -m eval.bench.decode --profile 1,4096      # kernels per step and where the device time goes

Random weights; experts packed in MXFP4 as gpt-oss ships them (transformers: bf16, its MXFP4 path needs
kernels from the hub). MLA: the default conversion (decompressed, latent 192, full-attention layers;
weight-SVD init, which does not change the speed); `--partial` adds the absorbable modes (partial, rorope)
at the same cache size.
Each point: the cache holds `context - 1` tokens per sequence and one jitted decode step (the cache
donated) appends one more; the median of `--repeats` steps after a warm-up (compilation) is reported,
with tokens/s = batch / step time. Points whose cache does not fit the card are skipped and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.timing import timed
from gptoss_mla_jax import flash_decode, flash_decode_mosaic, mla, routing
from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax import model as model_lib
from gptoss_mla_jax import moe as moe_lib
from gptoss_mla_jax.attention import attend
from gptoss_mla_jax.cache import free_device_bytes, init_cache, total_bytes
from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig, MlaConfig
from gptoss_mla_jax.execution import ForwardOptions
from gptoss_mla_jax.flash_decode import Launch, Slots
from gptoss_mla_jax.generation import DEMO_CONFIG, GREEDY, decode_step, decode_steps, request_cuda_graphs
from gptoss_mla_jax.mla import with_up_projections
from gptoss_mla_jax.model import init_params, with_aligned_scales
from support.results import write_json
from weights.to_mla import DEFAULT_LATENT_DIM, convert

try:  # the peer: JAX's stock Triton decode kernel, deprecated in JAX 0.11 with the rest of pallas.ops.gpu
    from jax.experimental.pallas.ops.gpu import decode_attention
except ImportError:
    decode_attention = None

# transformers' eager attention materializes [heads, T, T] scores in the prefill: 4K is where it fits.
PEER_CONTEXT = 4096
MAX_BATCH = 1024  # capacity search bound (and the answer where the backend reports no memory limit)
RESERVE = 6e9  # bytes kept free for a step's activations (scores, the MLA layers' decompressed K and V)


def models(
    config: GptOssConfig, latent_dim: int = DEFAULT_LATENT_DIM, partial: bool = False, only=None
) -> dict:
    """{"gqa": (config, params), "mla": (config, params)[, "mla_partial": ..., "mla_rorope": ...]}: MLA
    students of the full-attention layers sharing the GQA weights. "mla" is the default conversion;
    `partial` adds the two absorbable ones, which decode with the absorbed attention over the latent, each
    with the latent smaller by the RoPE values it caches (the same cache per token): "mla_partial" keeps 2
    RoPE pairs per kv head, "mla_rorope" one mixed component per frequency pair (head_dim values shared by
    every head); those two carry their up-projections derived once, as `generate` gives them to its steps,
    and every model the experts' scale exponents padded as `generate` gives them to the kernels
    (`with_aligned_scales`; shared by all the models). `only`: the names to build (default all)."""
    params = init_params(config, jax.random.key(0), jnp.bfloat16, experts="mxfp4")
    params = jax.block_until_ready(with_aligned_scales(params))
    full = tuple(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    out = {"gqa": (config, params)}
    wanted = lambda name: only is None or name in only
    if wanted("mla"):
        mla_config, mla_params, _ = convert(params, config, latent_dim, "decompressed", layers=full)
        out["mla"] = (mla_config, jax.block_until_ready(mla_params))
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (1, 64))  # picks the RoPE pairs / mix
    if partial and wanted("mla_partial"):
        cut = 2 * 2 * config.num_key_value_heads  # 2 pairs = 4 cached dims per kv head
        mla_config, mla_params, _ = convert(
            params, config, latent_dim - cut, "partial", full, rope_pairs=2, calib_tokens=calib
        )
        out["mla_partial"] = (mla_config, jax.block_until_ready(with_up_projections(mla_params, mla_config)))
    if partial and wanted("mla_rorope"):
        mla_config, mla_params, _ = convert(
            params, config, latent_dim - config.head_dim, "rorope", full, calib_tokens=calib,
            rope_components=1,
        )  # fmt: skip
        out["mla_rorope"] = (mla_config, jax.block_until_ready(with_up_projections(mla_params, mla_config)))
    return {name: model for name, model in out.items() if wanted(name)}


def step_bytes(config: GptOssConfig, params, batch: int, context: int) -> int:
    """The bytes a decode step of `batch` tokens at `context` cannot avoid reading: every weight once but
    the embedding (only the batch's rows) and the experts (per layer only those the batch selects, as many
    as uniform routing selects on average, E (1 - (1 - k / E)^batch)), and the whole cache (bf16). Over the
    copy bandwidth, the step's byte floor."""
    E, k = config.num_local_experts, config.num_experts_per_tok
    selected = E * (1 - (1 - k / E) ** batch)
    total, experts = total_bytes(config, batch, context), 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(key, "key", None) for key in path]
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize  # arrays or their shapes
        if names[0] == "embed_tokens":
            total += batch * nbytes // leaf.shape[0]
        elif "experts" in names:
            experts += nbytes
        else:
            total += nbytes
    return int(total + experts * selected / E)


def step_seconds(
    params,
    config: GptOssConfig,
    batch: int,
    context: int,
    repeats: int,
    kernels: bool = False,
    loop_steps: int = 0,
) -> list[float]:
    """Seconds per token of each of `repeats` calls at `context` (after one warm-up call), attending with
    the Pallas kernels if `kernels`: a call is one decode step, or (`loop_steps` > 0) that many steps in one
    device-side loop (`generation.decode_steps`, as `generate` runs them: the host dispatches and waits once
    per call), the cache filling up to `context`."""
    steps = max(loop_steps, 1)
    cache = init_cache(config, batch, context)
    tokens, key = jnp.zeros((batch,), jnp.int32), jax.random.key(0)
    if loop_steps:
        done, limit, never = jnp.zeros((batch,), bool), jnp.int32(steps), jnp.int32(-1)

        def call(tokens, cache):
            run = decode_steps(params, cache, tokens, key, done, limit, never, config, GREEDY, kernels, steps)
            return run.last, run.cache
    else:
        call = lambda tokens, cache: decode_step(params, cache, tokens, key, config, GREEDY, kernels)
    times = []
    for _ in range(repeats + 1):  # the first call compiles
        cache["lengths"] = jnp.full((batch,), context - steps, jnp.int32)  # every call at this context
        t = time.perf_counter()
        tokens, cache = jax.block_until_ready(call(tokens, cache))
        times.append((time.perf_counter() - t) / steps)
    return times[1:]


def speed(
    models_: dict,
    batches: list[int],
    contexts: list[int],
    repeats: int,
    log,
    copy: float,
    kernels=(False,),
    loop_steps: int = 0,
) -> list[dict]:
    """Step time per context, batch, model and attention path (`kernels`: False = jnp/XLA, True = the
    Pallas decode kernels): one step per call, and (`loop_steps` > 0) per token of a device-side loop of
    that many steps; beside each, with the card's `copy` bandwidth (bytes / s), the step's byte floor
    (`step_bytes`) and the times over it."""
    rows = []
    for context, batch, (name, (config, params)), on_kernels in itertools.product(
        contexts, batches, models_.items(), kernels
    ):
        row = {"model": name, "batch": batch, "context": context, "decode_kernels": on_kernels}
        row["cache_gb"] = total_bytes(config, batch, context) / 1e9
        row["step_gb"] = step_bytes(config, params, batch, context) / 1e9
        row["floor_ms"] = 1e3 * row["step_gb"] * 1e9 / copy
        if row["cache_gb"] * 1e9 > (free := free_device_bytes()) - RESERVE:
            row["skipped"] = (
                f"cache {row['cache_gb']:.1f} GB does not fit ({free / 1e9:.1f} free; JAX takes "
                "XLA_PYTHON_CLIENT_MEM_FRACTION of the card, 0.75 unless set)"
            )
        else:
            try:
                times = step_seconds(params, config, batch, context, repeats, on_kernels)
                row |= {
                    "step_ms": 1e3 * float(np.median(times)),
                    "times_ms": [1e3 * t for t in times],
                }
                row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)
                row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
                if loop_steps:
                    times = step_seconds(params, config, batch, context, repeats, on_kernels, loop_steps)
                    row |= {
                        "loop_steps": loop_steps,
                        "loop_step_ms": 1e3 * float(np.median(times)),
                        "loop_times_ms": [1e3 * t for t in times],
                    }
                    row["loop_tokens_per_s"] = batch / (row["loop_step_ms"] / 1e3)
                    row["loop_over_floor"] = row["loop_step_ms"] / row["floor_ms"]
            except Exception as e:  # out of memory in the step, or a kernel that does not lower
                row["skipped"] = f"step failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        log(row)
    return rows


def capacity(models_: dict, contexts: list[int], log, kernels: bool = False) -> list[dict]:
    """Per context, the largest batch whose cache fits the memory left after the weights (minus RESERVE),
    and the largest batch at which a decode step really runs (from there down by 20% per failure)."""
    rows = []
    for context in contexts:
        for name, (config, params) in models_.items():
            per_sequence = total_bytes(config, 1, context)
            free = free_device_bytes()
            fits = (free - RESERVE) // per_sequence if free != float("inf") else MAX_BATCH
            batch = int(min(fits, MAX_BATCH))
            row = {"model": name, "context": context, "max_batch_by_bytes": batch, "decode_kernels": kernels}
            row["per_sequence_gb"], row["failures"] = per_sequence / 1e9, []
            while batch >= 1:
                try:
                    row["step_ms"] = 1e3 * float(
                        np.median(step_seconds(params, config, batch, context, 2, kernels))
                    )
                    break
                except jax.errors.JaxRuntimeError as e:  # out of memory in the step (or its compilation)
                    row["failures"].append({"batch": batch, "error": str(e).splitlines()[0][:200]})
                    batch = int(batch * 0.8)
            row["max_batch_runs"] = batch
            rows.append(row)
            log(row)
    return rows


def copy_bandwidth(gigabytes: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline for memory-bound steps."""
    x = jnp.ones((int(gigabytes * 1e9) // 2,), jnp.bfloat16)
    return 2 * x.nbytes / timed(jax.jit(lambda x: x + 1), x)


def breakdown(models_: dict, batch: int, context: int, repeats: int, copy_gigabytes: float = 4.0) -> dict:
    """Where one decode step's time goes, per model: a full-attention layer's attention (with its cache) and
    a layer's MoE, each on jnp and on the Pallas kernels, and the unembedding, against the whole step (both
    ways); and the card's copy bandwidth (measured on `copy_gigabytes`)."""
    out = {"batch": batch, "context": context, "copy_gb_per_s": copy_bandwidth(copy_gigabytes) / 1e9}
    for name, (config, params) in models_.items():
        out[name] = layer_breakdown(config, params, batch, context, repeats)
    return out


def layer_breakdown(config: GptOssConfig, params, batch: int, context: int, repeats: int) -> dict:
    from gptoss_mla_jax.attention import attention, chunk_at
    from gptoss_mla_jax.mla import attention_mla
    from gptoss_mla_jax.moe import moe_sparse

    i = next(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    layer = params["layers"][i]
    layer_cache = init_cache(config, batch, context)["layers"][i]
    lengths = jnp.full((batch,), context - 1, jnp.int32)
    x = jax.random.normal(jax.random.key(1), (batch, 1, config.hidden_size), jnp.bfloat16)
    chunk = chunk_at(batch, 1, config, lengths)
    attend = functools.partial(attention_mla, layer=i) if config.is_mla(i) else attention
    step = lambda kernels: (
        lambda p, x, c: attend(p, x, chunk, c, False, config, options=ForwardOptions(decode_kernels=kernels))
    )
    ms = lambda fn, *args: 1e3 * timed(jax.jit(fn), *args, repeats=repeats)
    return {
        "step_ms": 1e3 * float(np.median(step_seconds(params, config, batch, context, repeats))),
        "step_kernels_ms": 1e3
        * float(np.median(step_seconds(params, config, batch, context, repeats, True))),
        "full_layer_attention_ms": ms(step(False), layer["self_attn"], x, layer_cache),
        "full_layer_attention_kernel_ms": ms(step(True), layer["self_attn"], x, layer_cache),
        "layer_moe_ms": ms(lambda p, x: moe_sparse(p, x, config), layer["mlp"], x),
        "layer_moe_kernel_ms": ms(lambda p, x: moe_sparse(p, x, config, kernels=True), layer["mlp"], x),
        "unembed_ms": ms(lambda x, w: x @ w, x, params["lm_head"]),
        "layer_cache_gb": sum(v.nbytes for v in layer_cache.values()) / 1e9,
    }


# Launch settings tried at every point: (block, warps, pipeline stages); absorbed MLA also splits its 64
# heads over 2 or 4 programs, decompressed MLA gives each program 1, 2 or 4 kv heads (query heads per
# program: `head_block`).
KERNEL_CONFIGS = [
    dict(block=block, warps=warps, stages=stages)
    for block, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (64, 8, 2), (128, 8, 2))
]
HEAD_BLOCKS = {
    "gqa": [],
    "mla": [
        dict(block=b, warps=w, stages=s, head_block=h)
        for h in (8, 32)
        for b, w, s in ((64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))
    ],
    "mla_partial": [dict(block=64, warps=4, stages=2, head_block=h) for h in (32, 16)],
    "mla_mosaic": [],
}
# The Mosaic GPU decompressed kernel (`flash_decode_mosaic`): one warpgroup a program (4 warps) or two, one
# making the keys and one attending (8); 64-slot blocks (a program of 128-slot blocks or four kv heads would
# not fit an H200 SM's shared memory); its pipeline is its own (stages unused).
MOSAIC_CONFIGS = [dict(block=64, warps=w, stages=2) for w in (4, 8)]


def kernel_rows(
    batches: list[int],
    contexts: list[int],
    repeats: int,
    smoke: bool,
    log,
    layers=("gqa", "mla", "mla_partial"),
) -> list[dict]:
    """One layer's decode attention at gpt-oss-20b shapes over full caches of random bf16, Pallas kernel
    (flash_decode) against the jnp path it replaces: GQA (64 heads over 8 kv heads of 64; also JAX's stock
    Pallas `gqa` decode kernel, which has no sinks), decompressed MLA (the default conversion, latent 192:
    keys rebuilt on chip) and absorbed partial-mode MLA (latent 160 + 2 RoPE pairs per kv head; both 80.9%
    less cache); `mla_mosaic` (asked for by name): decompressed MLA on its Mosaic GPU kernel. Time, and bytes
    of cache read over the card's copy bandwidth."""
    shape = (
        dict(
            G=2,
            R=2,
            d=16,
            n2=4,
            r=24,
            configs=[dict(block=16, warps=4, stages=2)],
            head_blocks={
                "gqa": [],
                "mla": [dict(block=16, warps=4, stages=2, head_block=2)],
                "mla_partial": [dict(block=16, warps=4, stages=2, head_block=2)],
                "mla_mosaic": [],
            },
        )
        if smoke
        else dict(G=8, R=8, d=64, n2=4, r=160, configs=KERNEL_CONFIGS, head_blocks=HEAD_BLOCKS)
    )
    # the Mosaic GPU kernel's smallest shape: 64-slot blocks, rows of whole 128-byte swizzles
    mosaic = dict(configs=MOSAIC_CONFIGS) | (dict(G=2, R=8, d=64, n2=0, r=64) if smoke else {})
    shape_of = lambda layer: (
        shape | dict(head_blocks=shape["head_blocks"][layer]) | (mosaic if layer == "mla_mosaic" else {})
    )
    copy = copy_bandwidth(0.05 if smoke else 4.0)
    rows = [{"copy_gb_per_s": copy / 1e9}]
    # Agreement in float32 first (one small point per kernel, where bf16 rounding does not blur a bug),
    # then the bf16 speed table. In float32, block 128 with 3 stages asks an H200 for more shared memory
    # than it has; that setting's failure is recorded and the others run.
    check = [(layer, 2, min(contexts), jnp.float32) for layer in layers if layer != "mla_mosaic"]  # 16-bit
    points = [(layer, b, c, jnp.bfloat16) for c, b, layer in itertools.product(contexts, batches, layers)]
    # "mla" on the Triton kernel, "mla_mosaic" on Mosaic GPU's at each of MOSAIC_CONFIGS' warps
    kernel_choice = {"mla": "triton", "mla_mosaic": "mosaic"}
    for layer, batch, context, dtype in check + points:
        try:
            with switched(
                *(
                    [(flash_decode, "DECOMPRESSED_KERNEL", kernel_choice[layer])]
                    if layer in kernel_choice
                    else []
                )
            ):
                rows.append(
                    kernel_point(layer, batch, context, repeats, copy, dtype=dtype, **shape_of(layer))
                )
        except Exception as e:  # a lowering failure or an OOM is a result too: say which and go on
            rows.append(
                {
                    "layer": layer,
                    "batch": batch,
                    "context": context,
                    "dtype": jnp.dtype(dtype).name,
                    "error": f"{type(e).__name__}: {e}"[:1500],
                }
            )
        log(rows[-1])
    return rows


def of_copy(nbytes: int, ms: float, copy: float) -> float:
    """Bytes read in `ms` milliseconds over the card's copy bandwidth (bytes per second)."""
    return nbytes / (ms / 1e3) / copy


def path_times(paths: dict, args, nbytes: int, copy: float, repeats: int) -> dict:
    """Each non-kernel path (name -> function of `args`) timed: `{name}_ms` and `{name}_of_copy_bandwidth`."""
    out = {}
    for name, fn in paths.items():
        ms = 1e3 * timed(jax.jit(fn), *args, repeats=repeats)
        out[f"{name}_ms"], out[f"{name}_of_copy_bandwidth"] = ms, of_copy(nbytes, ms, copy)
    return out


def sweep(make, settings: list[dict], args, want, nbytes: int, copy: float, repeats: int) -> dict:
    """Each launch setting of a kernel (`make(setting)`: the function) on `args`: its time, the bytes it
    must read over the card's copy bandwidth, and its largest difference from `want`. A setting that fails
    (e.g. more shared memory than the card has) is recorded and the others still run; the best one's
    numbers are lifted to the top."""
    configs = []
    for setting in settings:
        fn = jax.jit(make(setting))
        try:
            error = float(jnp.abs(fn(*args).astype(jnp.float32) - want).max())
        except Exception as e:
            configs.append(setting | {"error": f"{type(e).__name__}: {e}"[:500]})
            continue
        ms = 1e3 * timed(fn, *args, repeats=repeats)
        configs.append(
            setting | {"ms": ms, "of_copy_bandwidth": of_copy(nbytes, ms, copy), "max_abs_error": error}
        )
    ran = [c for c in configs if "ms" in c]
    if not ran:
        raise RuntimeError(f"no launch setting ran: {configs[0]['error']}")
    best = min(ran, key=lambda c: c["ms"])
    return {
        "configs": configs,
        "kernel_ms": best["ms"],
        "kernel_of_copy_bandwidth": best["of_copy_bandwidth"],
        "kernel_plan": {
            k: v for k, v in best.items() if k not in ("ms", "of_copy_bandwidth", "max_abs_error")
        },
        "max_abs_error": max(c["max_abs_error"] for c in ran),
    }


# Launch settings of the grouped matmul's decode-batch products ("_small" kinds: row tiles of 16 or 32)
# tried by --moe beside the table's own choice: (output columns, contraction step, warps, stages,
# contraction splits). "deep": deeper software pipelines (`--moe-launches deep`); at batch 1 a program's 12
# steps looked as if each waited out a memory latency with two loads ahead, but none of them was faster.
MOE_LAUNCHES = {
    name: [
        dict(cols=cols, depth=depth, warps=warps, stages=stages, splits=splits)
        for cols, depth, warps, stages, splits in launches
    ]
    for name, launches in {
        "standard": (
            (64, 256, 4, 3, 1), (64, 128, 4, 4, 1), (32, 256, 4, 3, 1), (128, 128, 4, 3, 1),
            (64, 512, 4, 2, 1), (128, 256, 8, 3, 1), (64, 256, 4, 3, 2), (64, 256, 4, 3, 4),
            (128, 256, 4, 3, 4), (32, 256, 4, 3, 2),
        ),
        "deep": (
            (64, 256, 4, 3, 1), (64, 256, 4, 4, 1), (64, 256, 4, 5, 1), (64, 256, 4, 6, 1),
            (64, 128, 4, 6, 1), (64, 128, 4, 8, 1), (32, 256, 4, 5, 1), (64, 256, 8, 4, 1),
            (128, 128, 4, 5, 1), (64, 256, 4, 5, 2),
        ),
        "none": (),  # the launch table's own only: A/B runs of layouts
    }.items()
}  # fmt: skip
# Routing kernel launches tried by --moe where it serves the batch (depth, warps, stages): default first.
ROUTER_LAUNCHES = [
    dict(depth=depth, warps=warps, stages=stages)
    for depth, warps, stages in (
        (256, 4, 3), (64, 4, 1), (128, 4, 4), (256, 8, 3), (512, 4, 2), (256, 2, 3), (256, 1, 3), (128, 1, 4),
        (512, 4, 3), (256, 4, 5), (512, 8, 3), (1024, 4, 2), (1024, 8, 3),
    )
]  # fmt: skip


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


def routing_rows(p, flat, config: GptOssConfig, smoke: bool) -> dict:
    """A decode batch's routing (router, top-k, softmax, the aligned layout), its device time per call
    (`device_us`): the routing kernel at each of ROUTER_LAUNCHES, and the jnp path (`moe.route` and
    `moe._aligned_slots`, several XLA kernels) for comparison; each kernel launch's layout checked equal to
    the jnp path's."""
    from gptoss_mla_jax.moe import _aligned_slots, layout_align, route

    k, E = config.num_experts_per_tok, config.num_local_experts
    align = layout_align(flat.shape[0], config)

    def on_jnp(p, flat):
        weights, idx = route(p, flat, config)
        expert = idx.reshape(-1)
        slot, padded = _aligned_slots(expert, E, align)
        return weights, slot, padded

    on_jnp = jax.jit(on_jnp)
    want = on_jnp(p, flat)
    out = {"jnp": device_us(on_jnp, p, flat), "kernel": []}
    for launch in ROUTER_LAUNCHES[:2] if smoke else ROUTER_LAUNCHES:
        kernel = jax.jit(
            functools.partial(
                lambda p, flat, tiles: routing.decode_routing(
                    flat, p["router"]["kernel"], p["router"]["bias"], k, align,
                    interpret=not flash_decode.runs_compiled(), launch=tiles,
                ), tiles=routing.RouterLaunch(**launch),
            )
        )  # fmt: skip
        try:
            got = kernel(p, flat)
        except Exception as e:  # a launch that does not compile (shared memory) is recorded
            out["kernel"].append(launch | {"error": f"{type(e).__name__}: {e}"[:300]})
            continue
        same = bool((got[2] == want[1]).all() & (got[3] == want[2]).all())
        out["kernel"].append(launch | device_us(kernel, p, flat) | {"same_layout": same})
    return out


def moe_layer(config: GptOssConfig) -> dict:
    """One layer's MoE parameters (random, MXFP4 experts) as `generate` hands them to the kernels: scale
    rows padded (`with_aligned_scales`)."""
    one_layer = dataclasses.replace(config, num_hidden_layers=1, layer_types=config.layer_types[:1])
    params = with_aligned_scales(init_params(one_layer, jax.random.key(0), jnp.bfloat16, "mxfp4"))
    return params["layers"][0]["mlp"]


def moe_rows(batches: list[int], repeats: int, smoke: bool, log, sweep: str = "standard") -> list[dict]:
    """One layer's MoE in a decode step at each batch, MXFP4 experts: on the kernels (the grouped matmul,
    the launch table's choice, then each of MOE_LAUNCHES[sweep]) and on the jnp path (gather the selected
    experts, dequantize, multiply), each timed on the device (`in_loop`), and its routing alone
    (`routing_rows`); the byte floor (the distinct selected experts' packed bytes, read once, over the copy
    bandwidth); and the kernels' largest difference from the float32 reference on the same routing."""
    from gptoss_mla_jax.gmm import Tiles
    from gptoss_mla_jax.moe import moe_dense, moe_sparse, route

    config = DEMO_CONFIG if smoke else GPT_OSS_20B
    p = jax.block_until_ready(moe_layer(config))
    launches = MOE_LAUNCHES[sweep][-1:] if smoke else MOE_LAUNCHES[sweep]  # smoke: the default and one
    inner = 2 if smoke else 20
    copy = copy_bandwidth(0.05 if smoke else 4.0)
    expert_bytes = sum(v[0].nbytes for k, v in p["experts"].items())  # one expert: blocks, scales, biases
    f32 = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def reference(p, x):  # float32 experts on the kernels' own (bf16) routing: a near tie can flip a choice
        routing = route(p, x.reshape(-1, x.shape[-1]), config)
        return moe_dense(jax.tree.map(f32, p), x.astype(jnp.float32), config, routing)

    out = [{"copy_gb_per_s": copy / 1e9, "expert_bytes": expert_bytes}]
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, 1, config.hidden_size), jnp.bfloat16)
        _, idx = route(p, x.reshape(batch, -1), config)
        distinct = len(set(np.asarray(idx).ravel().tolist()))
        nbytes = distinct * expert_bytes + p["router"]["kernel"].nbytes
        row = {"batch": batch, "pairs": batch * config.num_experts_per_tok, "distinct_experts": distinct}
        row["bytes"], row["floor_ms"] = nbytes, 1e3 * nbytes / copy
        want = jax.jit(reference)(p, x)
        row["max_abs_reference"] = float(jnp.abs(want).max())
        ms = lambda fn, x=x: 1e3 * timed(in_loop(fn, inner), p, x, repeats=repeats) / inner
        row["jnp_ms"] = ms(lambda p, x: moe_sparse(p, x, config))
        configs = []
        for launch in [None, *launches]:  # None: the launch table's own choice at this batch
            kinds = ("mxfp4_small", "mxfp4_small_wide", "mxfp4_t_small")
            swept = {} if launch is None else {(k, None, None): Tiles(rows=16, **launch) for k in kinds}
            original, gmm_lib.LAUNCH = gmm_lib.LAUNCH, {**gmm_lib.LAUNCH, **swept}
            launch = launch or {"launch": "default"}
            try:
                on_kernels = lambda p, x: moe_sparse(p, x, config, kernels=True)
                error = float(jnp.abs(jax.jit(on_kernels)(p, x).astype(jnp.float32) - want).max())
                device = device_us(jax.jit(on_kernels), p, x)
                configs.append(launch | {"ms": ms(on_kernels), "max_abs_error": error, "device": device})
            except Exception as e:  # a launch that does not compile (shared memory) is recorded
                configs.append(launch | {"error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                gmm_lib.LAUNCH = original
        ran = [c for c in configs if "ms" in c]
        best = min(ran, key=lambda c: c["ms"])
        row |= {"configs": configs, "kernel_ms": best["ms"], "kernel_launch": best}
        if moe_lib.routed_in_kernel(batch, config):
            row["routing"] = routing_rows(p, x.reshape(batch, -1), config, smoke)
            row["stepped"] = stepped_moe(p, x, config, ms, want)
        row["kernel_over_floor"] = best["ms"] / row["floor_ms"]
        row["max_abs_error"] = max(c["max_abs_error"] for c in ran)
        log(row)
        out.append(row)
    return out


def stepped_moe(p, x, config: GptOssConfig, ms, want) -> dict:
    """The MoE as a decode step on the kernels runs it: routed from the router's product, which the step
    takes in the kernel of the residual add before it (`add_norm.add_norm_routed`; here given, not timed),
    the rows' weighted sum in jnp (`add_norm.moe_delta`; the step takes it in the kernel of the residual add
    after it); timed by `ms` and by the device's busy time, and its largest difference from `want` (the
    float32 reference)."""
    from gptoss_mla_jax.add_norm import moe_delta

    flat = x.reshape(-1, x.shape[-1])
    partials = jnp.dot(flat, p["router"]["kernel"], preferred_element_type=jnp.float32)[None]

    def fn(p, x):
        # Tied to this call's input, so that a loop of calls (`in_loop`) cannot hoist the routing out of it.
        x, given = jax.lax.optimization_barrier((x, partials))
        return moe_delta(moe_lib.expert_rows(p, x, config, given), flat.shape[0], x.dtype).reshape(x.shape)

    error = float(jnp.abs(jax.jit(fn)(p, x).astype(jnp.float32) - want).max())
    return {"ms": ms(fn), "max_abs_error": error, "device": device_us(jax.jit(fn), p, x)}


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


def profile(models_: dict, batch: int, context: int, steps: int) -> dict:
    """A profile of `steps` decode steps on the kernels per model, summarised: kernels launched per step, the
    device's busy time per step (kernels end to end, overlaps counted once) against the wall time, and the
    kernels taking the most time."""
    out = {}
    for name, (config, params) in models_.items():
        cache = init_cache(config, batch, context)
        cache["lengths"] = jnp.full((batch,), context - 1, jnp.int32)
        tokens = jnp.zeros((batch,), jnp.int32)
        step = functools.partial(
            lambda params, config, tokens, cache: decode_step(
                params, cache, tokens, jax.random.key(0), config, GREEDY, True
            ), params, config,
        )  # fmt: skip
        state = list(jax.block_until_ready(step(tokens, cache)))

        def run(state=state, step=step):
            for _ in range(steps):
                state[1]["lengths"] = jnp.full((batch,), context - 1, jnp.int32)
                state[:] = step(*state)
            jax.block_until_ready(state[0])

        wall, trace = traced(run)
        out[name] = kernel_summary(trace, steps) | {"wall_ms_per_step": 1e3 * wall / steps}
    return out


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


class KernelCase(NamedTuple):
    """One layer's decode attention at one point: its inputs (`args`), the kernel's function of a launch
    (`kernel(Launch) -> fn(*args)`), the jnp path it replaces (`reference(*args)`), the cache's bytes, and
    JAX's stock peer where there is one."""

    args: tuple
    kernel: Callable
    reference: Callable
    cache_bytes: int
    peers: dict


def kernel_case(layer: str, batch: int, context: int, G, R, d, n2, r, dtype) -> KernelCase:
    """Random inputs of `layer` (gqa; mla: decompressed, latent r + G n2; mla_partial: latent r plus n2
    RoPE values per kv head; mla_rorope: one RoPE key of d values that every head reads plus a latent of
    r + G n2 - d, the same cache size) over full caches of `context` slots, every sequence at full length."""
    keys = iter(jax.random.split(jax.random.key(0), 10))
    normal = lambda *shape: jax.random.normal(next(keys), shape, dtype)
    lengths, sinks = jnp.full((batch,), context, jnp.int32), normal(G * R)
    pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    visible, q_pos = pos < lengths[:, None], (lengths - 1)[:, None]
    slots = Slots(lengths)
    if layer == "gqa":
        cache = (normal(batch, context, G, d), normal(batch, context, G, d))
        args = (normal(batch, G * R, d), *cache)
        kernel = lambda launch: lambda q, k, v: flash_decode.gqa_decode(q, k, v, slots, sinks, launch)
        reference = lambda q, k, v: attend(q[:, None], [(k, v, pos, visible)], q_pos, sinks, None)[:, 0]
        splits, block = flash_decode.plan(context, batch * G, 128)  # GQA's launch in the model
        stock_gqa = lambda q, k, v: decode_attention.gqa(
            q,
            k,
            v,
            kv_seq_len=lengths,
            block_k=block,
            k_splits=splits,
            interpret=jax.default_backend() == "cpu",
        )
        # a JAX without pallas.ops.gpu: the table goes on without the peer
        peers = {} if decode_attention is None else {"stock_gqa": stock_gqa}
        return KernelCase(args, kernel, reference, sum(x.nbytes for x in cache), peers)
    if layer in ("mla", "mla_mosaic"):  # mla_mosaic: the same on DECOMPRESSED_KERNEL "mosaic"
        config = dataclasses.replace(
            GPT_OSS_20B, num_attention_heads=G * R, num_key_value_heads=G, head_dim=d,
            mla=MlaConfig("decompressed", (1,), (r + G * n2,)),
        )  # fmt: skip
        kv_b = {"kernel": normal(r + G * n2, 2 * G * d), "bias": normal(2 * G * d)}
        cache = (normal(batch, context, r + G * n2),)
        args = (normal(batch, G * R, d), *cache)
        rotations = lambda: mla.slot_rotations(lengths, context, False, config)  # in the step, as in forward
        kernel = lambda launch: (
            lambda q, c: flash_decode.mla_decompressed_decode(q, kv_b, c, slots, sinks, rotations(), launch)
        )
        # mla_mosaic: a launch the Mosaic GPU kernel does not run is an error, not Triton's time
        if layer == "mla_mosaic":
            triton = kernel

            def kernel(launch):
                reason = flash_decode_mosaic.refusal((batch, G, R, d), dtype, r + G * n2, launch)
                if reason is not None:
                    raise ValueError(f"the Mosaic GPU kernel does not run {launch}: {reason}")
                return triton(launch)

        reference = lambda q, c: attend(
            q[:, None], [(*mla.keys_values({"kv_b": kv_b}, {"c": c}, pos, config, 1), pos, visible)], q_pos,
            sinks, None,
        )[:, 0]  # fmt: skip
        return KernelCase(args, kernel, reference, cache[0].nbytes, {})
    if layer == "mla_rorope":  # one shared key of one mixed component (d values), the same cache size
        r, n2, rope_heads, n = r + G * n2 - d, d, 1, d
    else:
        rope_heads, n = G, d - n2
    weights = (normal(r, G, n), normal(G, n), normal(r, G, d), normal(G, d))
    cache = (normal(batch, context, r), normal(batch, context, rope_heads, n2))
    args = (normal(batch, G, R, n2), normal(batch, G, R, n), *cache)
    kernel = lambda launch: (
        lambda q_rope, q_nope, c, k_rope: flash_decode.mla_absorbed_decode(
            q_rope, q_nope, weights, {"c": c, "k_rope": k_rope}, slots, sinks, launch
        )
    )
    reference = lambda q_rope, q_nope, c, k_rope: mla._absorbed(
        q_rope[:, None], q_nope[:, None], weights, [({"c": c, "k_rope": k_rope}, pos, visible)], q_pos,
        sinks, None,
    )[:, 0]  # fmt: skip
    return KernelCase(args, kernel, reference, sum(x.nbytes for x in cache), {})


def kernel_kind(layer: str) -> flash_decode.KernelKind:
    """The kind of decode kernel the model runs `layer` on (gqa, mla: decompressed, else absorbed)."""
    return {"gqa": "gqa", "mla": "decompressed", "mla_mosaic": "decompressed"}.get(layer, "absorbed")


def kernel_programs(layer: str, batch: int, G: int, R: int, head_block: int | None) -> int:
    """The programs per cache slice the model runs `layer`'s kernel with (`programs_per_slice`)."""
    return flash_decode.programs_per_slice(kernel_kind(layer), batch, G, R, head_block)


def kernel_plan(layer: str, context: int, programs: int, block: int) -> tuple[int, int] | None:
    """The (slices, block) the model's `decode_plan` picks for `layer`'s kernel over `context` slots."""
    return flash_decode.plan(context, programs, block, flash_decode.fill_programs(kernel_kind(layer)))


def kernel_point(layer, batch, context, repeats, copy, G, R, d, n2, r, configs, head_blocks, dtype) -> dict:
    case = kernel_case(layer, batch, context, G, R, d, n2, r, dtype)
    want = jax.jit(case.reference)(*case.args).astype(jnp.float32)
    row = {"layer": layer, "batch": batch, "context": context, "dtype": jnp.dtype(dtype).name}
    row["bytes"] = case.cache_bytes
    row["max_abs_reference"] = float(jnp.abs(want).max())
    plans = []
    for launch in configs + head_blocks:
        programs = kernel_programs(layer, batch, G, R, launch.get("head_block"))
        # the slices decode_plan would pick for this many programs
        splits, block = kernel_plan(layer, context, programs, launch["block"])
        plans.append(launch | dict(splits=splits, block=block))
    interpret = jax.default_backend() == "cpu"
    make = lambda plan: case.kernel(Launch(**plan, interpret=interpret))
    row |= sweep(make, plans, case.args, want, row["bytes"], copy, repeats)
    return row | path_times({"jnp": case.reference, **case.peers}, case.args, row["bytes"], copy, repeats)


def transformers_step(context: int, repeats: int) -> dict:
    """transformers' GptOssForCausalLM (bf16, random weights, eager attention) on this card, batch 1: a
    prefill of `context - 1` tokens, then the median decode step."""
    import torch
    import transformers

    config = transformers.GptOssConfig(**{k: v for k, v in GPT_OSS_20B.to_hf().items() if k != "model_type"})
    config._attn_implementation = "eager"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.GptOssForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, context - 1), device="cuda")
    times = []
    with torch.no_grad():
        out = model(tokens, use_cache=True)
        # past_key_values: the name older transformers know too (5.x calls it `cache`).
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            cache = out.past_key_values
    times = times[1:]
    return {
        "model": "transformers GptOssForCausalLM (bf16 experts, eager)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "batch": 1,
        "context": context,
        "step_ms": 1e3 * float(np.median(times)),
        "times_ms": [1e3 * t for t in times],
        "device": torch.cuda.get_device_name(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--capacity", action="store_true", help="largest batch per context instead of speed")
    parser.add_argument("--transformers", action="store_true", help="the transformers peer (batch 1)")
    parser.add_argument("--with-transformers", action="store_true", help="also run the peer, in a subprocess")
    parser.add_argument("--breakdown", help="BATCH,CONTEXT: where a decode step's time goes")
    parser.add_argument("--kernels", action="store_true", help="the Pallas decode kernels vs jnp")
    parser.add_argument("--moe", metavar="BATCHES", help="one layer's MoE at these batches, e.g. 1,8,64")
    parser.add_argument(
        "--moe-launches", choices=tuple(MOE_LAUNCHES), default="standard",
        help="--moe: the launches swept beside the launch table's own (MOE_LAUNCHES)",
    )  # fmt: skip
    parser.add_argument(
        "--max-aligns", default=str(moe_lib.MAX_ALIGN),
        help="--moe: with the decode layout's row tile at most each of these in turn (moe.MAX_ALIGN; a batch "
        "whose tile would be taller takes the sorted layout), e.g. 64,16",
    )  # fmt: skip
    parser.add_argument(
        "--split-rows", default=str(gmm_lib.SPLIT_ROWS),
        help="--moe with the packed products of decode layouts splitting lhs on chip on row tiles of up to "
        "each of these in turn (gmm.SPLIT_ROWS; taller tiles take halves that XLA makes), e.g. 64,16",
    )  # fmt: skip
    parser.add_argument("--profile", metavar="BATCH,CONTEXT", help="profile decode steps on the kernels")
    parser.add_argument(
        "--partial",
        action="store_true",
        help="also the absorbable MLA modes, partial and rorope (absorbed decode)",
    )
    parser.add_argument(
        "--decode-kernels", choices=("off", "on", "both"), default="off",
        help="steps (and --capacity) attend with the Pallas kernels: off, on, or both side by side",
    )  # fmt: skip
    parser.add_argument(
        "--models", help="only these models (--kernels: layers), e.g. gqa,mla_partial (default: all)"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="steps as CUDA graphs (generation.CUDA_GRAPH_FLAGS)"
    )
    parser.add_argument(
        "--loop-steps", type=int, default=0,
        help="also time each point per token of this many steps in one device-side loop, as generate runs",
    )  # fmt: skip
    parser.add_argument(
        "--state-shares", default="none",
        help="steps with absorbed MLA's slices bounded by their state (flash_decode.STATE_SHARE), each of "
        "these in turn, e.g. none,0.25 (none: unbounded, the default)",
    )  # fmt: skip
    parser.add_argument(
        "--mla-fill-programs", default=str(flash_decode.MLA_FILL_PROGRAMS),
        help="steps with the MLA kernels' cache slices filling the grid to about each of these many programs "
        "in turn (flash_decode.MLA_FILL_PROGRAMS), e.g. 132,264",
    )  # fmt: skip
    parser.add_argument(
        "--fused-norms", default=model_lib.FUSED_NORMS,
        help="steps with each residual add fused with its norm (model.FUSED_NORMS: router, the one before "
        "the MoE with the router's product; norms, without; off), each of these in turn, e.g. "
        "router,norms,off",
    )  # fmt: skip
    parser.add_argument(
        "--decompressed-kernels", default=flash_decode.DECOMPRESSED_KERNEL,
        help="steps with the decompressed MLA layers' decode on the Triton or the Mosaic GPU kernel, the "
        "latter with one or two warpgroups a program (flash_decode.DECOMPRESSED_KERNEL: auto, which "
        "is mosaic2 where compiled; triton, mosaic, mosaic2; a step the Mosaic GPU kernel does not "
        "run, e.g. of a float32 cache or of blocks not of 64 slots, keeps Triton's), each in turn, e.g. "
        "triton,mosaic2",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny model (CPU check of the script)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for flag, values, kinds in (
        ("--fused-norms", args.fused_norms, model_lib.FusedNorms),
        ("--decompressed-kernels", args.decompressed_kernels, flash_decode.DecompressedKernel),
    ):  # each a module switch's values, comma-separated
        unknown = set(values.split(",")) - set(get_args(kinds))
        if unknown:
            parser.error(f"{flag}: {sorted(unknown)} not among {get_args(kinds)}")
    if args.cuda_graphs:
        request_cuda_graphs()
    contexts = [int(c) for c in args.contexts.split(",")]
    command = " ".join(["python -m eval.bench.decode", *(argv if argv is not None else sys.argv[1:])])
    done: list[dict] = []

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:  # a run cut short (a device call's time limit) keeps the rows it finished
            done.append(row)
            write_json(args.out, {"command": command, "complete": False, "rows_so_far": done})

    if args.transformers:
        result = {"rows": [transformers_step(c, args.repeats) for c in contexts]}
    else:
        peer = []
        if args.with_transformers:  # first, in its own process, before JAX takes the GPU's memory
            out = subprocess.run(
                [sys.executable, "-m", "eval.bench.decode", "--transformers", "--contexts", str(PEER_CONTEXT),
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )  # fmt: skip
            peer = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            peer = peer[-1]["rows"] if peer else [{"error": out.stderr[-2000:]}]
            log({"transformers_rows": peer})  # kept by a run that its time limit cuts short
        only = args.models.split(",") if args.models else None
        models_ = lambda: (  # the modes timing a whole model build it
            models(DEMO_CONFIG, 48, args.partial, only)
            if args.smoke
            else models(GPT_OSS_20B, partial=args.partial, only=only)
        )
        result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "transformers_rows": peer}
        result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        result["mem_fraction"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
        if args.kernels:
            batches = [int(b) for b in args.batches.split(",")]
            layers = only or ("gqa", "mla", "mla_partial")
            result["kernels"] = kernel_rows(batches, contexts, args.repeats, args.smoke, log, layers)
        elif args.moe:
            batches, result["moe"] = [int(b) for b in args.moe.split(",")], []
            for max_align, split in itertools.product(
                *([int(v) for v in values.split(",")] for values in (args.max_aligns, args.split_rows))
            ):
                setting = {"max_align": max_align, "split_rows": split}
                tag = lambda row, setting=setting: log(row | setting)
                with switched((moe_lib, "MAX_ALIGN", max_align), (gmm_lib, "SPLIT_ROWS", split)):
                    rows = moe_rows(batches, args.repeats, args.smoke, tag, args.moe_launches)
                result["moe"] += [row | setting for row in rows]
        elif args.profile:
            batch, context = (int(n) for n in args.profile.split(","))
            result["profile"] = profile(models_(), batch, context, args.repeats)
        elif args.breakdown:
            batch, context = (int(n) for n in args.breakdown.split(","))
            copy_gigabytes = 0.05 if args.smoke else 4.0
            result["breakdown"] = breakdown(models_(), batch, context, args.repeats, copy_gigabytes)
        elif args.capacity:
            result["capacity"] = capacity(models_(), contexts, log, args.decode_kernels == "on")
        else:
            batches = [int(b) for b in args.batches.split(",")]
            kernels = {"off": (False,), "on": (True,), "both": (False, True)}[args.decode_kernels]
            built, result["rows"] = models_(), []
            copy = copy_bandwidth(0.05 if args.smoke else 4.0)
            result["copy_gb_per_s"] = copy / 1e9
            for share, fill, fused, decompressed in itertools.product(
                args.state_shares.split(","),
                [int(n) for n in args.mla_fill_programs.split(",")],
                args.fused_norms.split(","),
                args.decompressed_kernels.split(","),
            ):
                setting = {
                    "state_share": share,
                    "mla_fill_programs": fill,
                    "fused_norms": fused,
                    "decompressed_kernel": decompressed,
                }
                tag = lambda row, setting=setting: log(row | setting)
                with switched(
                    (flash_decode, "STATE_SHARE", None if share == "none" else float(share)),
                    (flash_decode, "MLA_FILL_PROGRAMS", fill),
                    (model_lib, "FUSED_NORMS", fused),
                    (flash_decode, "DECOMPRESSED_KERNEL", decompressed),
                ):
                    rows = speed(built, batches, contexts, args.repeats, tag, copy, kernels, args.loop_steps)
                result["rows"] += [row | setting for row in rows]
    result["command"] = command
    print(json.dumps(result), flush=True)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
