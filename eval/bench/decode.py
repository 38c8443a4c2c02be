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
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.decode_kernels import kernel_rows
from eval.bench.decode_moe import MOE_LAUNCHES, WIDE_LAUNCHES, moe_rows
from eval.bench.timing import copy_bandwidth, kernel_summary, switched, timed, traced
from gptoss_mla_jax import flash_decode
from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax import model as model_lib
from gptoss_mla_jax import moe as moe_lib
from gptoss_mla_jax.cache import compacted, device_memory, free_device_bytes, init_cache, total_bytes
from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig
from gptoss_mla_jax.execution import ForwardOptions
from gptoss_mla_jax.generation import DEMO_CONFIG, GREEDY, decode_step, decode_steps, request_cuda_graphs
from gptoss_mla_jax.mla import with_up_projections
from gptoss_mla_jax.model import (
    init_params,
    wide_only,
    with_aligned_scales,
    with_wide_experts,
    without_wide_experts,
)
from support.results import write_json
from weights.to_mla import DEFAULT_LATENT_DIM, convert

# transformers' eager attention materializes [heads, T, T] scores in the prefill: 4K is where it fits.
PEER_CONTEXT = 4096
MAX_BATCH = 1024  # capacity search bound (and the answer where the backend reports no memory limit)
RESERVE = 6e9  # bytes kept free for a step's activations (scores, the MLA layers' decompressed K and V)


def models(
    config: GptOssConfig, latent_dim: int = DEFAULT_LATENT_DIM, partial: bool = False, only=None,
    wide: Literal["off", "on", "only"] = "off",
) -> dict:  # fmt: skip
    """{"gqa": (config, params), "mla": (config, params)[, "mla_partial": ..., "mla_rorope": ...]}: MLA
    students of the full-attention layers sharing the GQA weights. "mla" is the default conversion;
    `partial` adds the two absorbable ones, which decode with the absorbed attention over the latent, each
    with the latent smaller by the RoPE values it caches (the same cache per token): "mla_partial" keeps 2
    RoPE pairs per kv head, "mla_rorope" one mixed component per frequency pair (head_dim values shared by
    every head); those two carry their up-projections derived once, as `generate` gives them to its steps,
    and every model the experts' scale exponents padded as `generate` gives them to the kernels
    (`with_aligned_scales`; shared by all the models) and, with `wide` "on" on the GPU, the experts'
    wide-batch layout as `generate` gives it to the batches that take it (`with_wide_experts`; the experts'
    bytes a second time, so only where a batch timed takes it), or ("only") that layout alone, as the
    command line gives it to a batch that takes it (`generation.experts_for_batch`). `only`: the names to
    build (default all). The models come back in one piece of device memory (`cache.compacted`), as
    `generation.experts_for_batch` leaves them."""
    params = init_params(config, jax.random.key(0), jnp.bfloat16, experts="mxfp4")
    params = jax.block_until_ready(with_aligned_scales(params))
    if wide != "off" and flash_decode.runs_compiled():  # the wide-batch layout, read by batches that take it
        params = jax.block_until_ready(with_wide_experts(params, config, replace=wide == "only"))
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
    built = {name: model for name, model in out.items() if wanted(name)}
    del out, params  # the unwanted models' arrays freed before the rest is compacted
    return compacted(built)


def step_bytes(config: GptOssConfig, params, batch: int, context: int) -> int:
    """The bytes a decode step of `batch` tokens at `context` cannot avoid reading: every weight once but
    the embedding (only the batch's rows) and the experts (per layer only those the batch selects, as many
    as uniform routing selects on average, E (1 - (1 - k / E)^batch)), and the whole cache (bf16). Over the
    copy bandwidth, the step's byte floor."""
    E, k = config.num_local_experts, config.num_experts_per_tok
    selected = E * (1 - (1 - k / E) ** batch)
    total, experts, beside = total_bytes(config, batch, context), 0, not wide_only(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(key, "key", None) for key in path]
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize  # arrays or their shapes
        if names[0] == "embed_tokens":
            total += batch * nbytes // leaf.shape[0]
        elif moe_lib.WIDE in names and beside:  # `with_wide_experts`' second layout of the same experts
            continue
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
    per call), the cache filling up to `context`. The step is compiled before its cache is allocated, as
    `generate` compiles its own."""
    steps = max(loop_steps, 1)
    tokens, key = jnp.zeros((batch,), jnp.int32), jax.random.key(0)
    # compiled from the cache's shapes before the cache is allocated, as `generate` compiles its steps
    shapes = jax.eval_shape(lambda: init_cache(config, batch, context))
    if loop_steps:
        done, limit, never = jnp.zeros((batch,), bool), jnp.int32(steps), jnp.int32(-1)
        loop = decode_steps.lower(
            params, shapes, tokens, key, done, limit, never, config, GREEDY, kernels, steps
        ).compile()

        def call(tokens, cache):
            run = loop(params, cache, tokens, key, done, limit, never)
            return run.last, run.cache
    else:
        step = decode_step.lower(params, shapes, tokens, key, config, GREEDY, kernels).compile()
        call = lambda tokens, cache: step(params, cache, tokens, key)
    cache = init_cache(config, batch, context)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
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
    loop_only: bool = False,
) -> list[dict]:
    """Step time per context, batch, model and attention path (`kernels`: False = jnp/XLA, True = the
    Pallas decode kernels): one step per call (unless `loop_only`), and (`loop_steps` > 0) per token of a
    device-side loop of that many steps; beside each, with the card's `copy` bandwidth (bytes / s), the
    step's byte floor (`step_bytes`) and the times over it, and the seconds the point took (compilation
    included: what a run's time limit must hold)."""
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
            started = time.perf_counter()
            try:
                if not (loop_only and loop_steps):
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
            row["seconds"] = time.perf_counter() - started
        rows.append(row)
        log(row)
    return rows


# Halvings of the gap between the largest batch that ran and the smallest that failed (20% apart after the
# descent): 3 leave it within 2.5%.
CAPACITY_REFINEMENTS = 3


def largest_that_runs(start: int, runs, refinements: int = CAPACITY_REFINEMENTS) -> tuple[int, list[int]]:
    """(the largest batch for which `runs(batch)` held, or 0; the batches that failed): from `start` down by
    20% a failure, then `refinements` halvings of the gap between the largest that ran and the smallest that
    failed."""
    batch, failed = start, []
    while batch >= 1 and not runs(batch):
        failed.append(batch)
        batch = int(batch * 0.8)
    if failed and batch >= 1:
        high = failed[-1]
        for _ in range(refinements):
            middle = (batch + high) // 2
            if middle == batch:
                break
            if runs(middle):
                batch = middle
            else:
                failed.append(middle)
                high = middle
    return max(batch, 0), failed


def capacity(models_: dict, contexts: list[int], log, kernels: bool = False) -> list[dict]:
    """Per context, the largest batch whose cache fits the memory left after the weights (minus RESERVE),
    and the largest batch at which a decode step really runs (`largest_that_runs` from there), with the
    step's time at it."""
    rows = []
    for context in contexts:
        for name, (config, params) in models_.items():
            per_sequence = total_bytes(config, 1, context)
            free = free_device_bytes()
            fits = (free - RESERVE) // per_sequence if free != float("inf") else MAX_BATCH
            batch = int(min(fits, MAX_BATCH))
            row = {"model": name, "context": context, "max_batch_by_bytes": batch, "decode_kernels": kernels}
            row["per_sequence_gb"], row["failures"] = per_sequence / 1e9, []

            def runs(batch, row=row, config=config, params=params, context=context):
                try:
                    times = step_seconds(params, config, batch, context, 2, kernels)
                except jax.errors.JaxRuntimeError as e:  # out of memory in the step (or its compilation)
                    # the allocator then (on a GPU): its free bytes and largest free block at the failure
                    failure = {
                        "batch": batch,
                        "error": str(e).splitlines()[0][:200],
                        "allocator": device_memory(),
                    }
                    row["failures"].append(failure)
                    return False
                row["step_ms"] = 1e3 * float(np.median(times))  # the last that ran: the largest
                return True

            row["max_batch_runs"], _ = largest_that_runs(batch, runs)
            if "step_ms" in row:
                row["tokens_per_s"] = row["max_batch_runs"] / (row["step_ms"] / 1e3)
            rows.append(row)
            log(row)
    return rows


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
        "--wide-launches", choices=tuple(WIDE_LAUNCHES), default="default",
        help="--moe: the wide-batch kernel's launches tried where a batch takes it (WIDE_LAUNCHES)",
    )  # fmt: skip
    parser.add_argument(
        "--max-aligns", default=str(moe_lib.MAX_ALIGN),
        help="--moe: with the decode layout's row tile at most each of these in turn (moe.MAX_ALIGN; a batch "
        "whose tile would be taller takes the sorted layout), e.g. 64,16",
    )  # fmt: skip
    parser.add_argument(
        "--wide-min-pairs", type=float, default=moe_lib.WIDE_MIN_PAIRS,
        help="--moe: the mean token-expert pairs an expert from which batches take the wide-batch kernel "
        "(moe.WIDE_MIN_PAIRS), e.g. 0.1 to time it beside the grouped matmul at every batch",
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
        "--loop-only", action="store_true",
        help="with --loop-steps, time only the loop (not one step a call): a compilation less a point",
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
        "--absorbed-stages", default=str(flash_decode.PIPELINE_STAGES["absorbed"]),
        help="steps with the absorbed MLA kernel pipelining this many blocks (flash_decode.PIPELINE_STAGES), "
        "each of these in turn, e.g. 2,3",
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
    parser.add_argument(
        "--wide-kernel", default="on",
        help="steps at the batches that take the wide-batch MXFP4 kernel (moe.wide_batch) on it (on) or on "
        "the grouped matmul (off: the experts' wide layout left out), each in turn, e.g. on,off; or (only, "
        "alone) every batch on it, the experts in its layout alone (also --capacity's)",
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
    if args.loop_only and not args.loop_steps:
        parser.error("--loop-only times the device loop: give --loop-steps too")
    other_modes = ("transformers", "kernels", "moe", "profile", "breakdown", "capacity")
    if args.loop_only and any(getattr(args, mode) for mode in other_modes):
        parser.error(f"--loop-only times the speed points: not with --{' / --'.join(other_modes)}")
    if not args.wide_min_pairs > 0:
        parser.error(f"--wide-min-pairs: {args.wide_min_pairs} is not positive")
    if set(args.wide_kernel.split(",")) - {"on", "off"} and args.wide_kernel != "only":
        parser.error(f"--wide-kernel: {args.wide_kernel!r} is not a list of on / off, or only")
    for flag, values in (
        ("--mla-fill-programs", args.mla_fill_programs),
        ("--absorbed-stages", args.absorbed_stages),
    ):
        if not all(n.isdigit() and int(n) > 0 for n in values.split(",")):
            parser.error(f"{flag}: {values!r} is not a list of positive integers")
    if args.cuda_graphs:
        request_cuda_graphs()
    contexts = [int(c) for c in args.contexts.split(",")]
    command = " ".join(["python -m eval.bench.decode", *(argv if argv is not None else sys.argv[1:])])
    done: list[dict] = []
    device = jax.devices()[0].device_kind

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:  # a run cut short (a device call's time limit) keeps the rows it finished
            done.append(row)
            write_json(
                args.out, {"command": command, "device": device, "complete": False, "rows_so_far": done}
            )

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
        config = DEMO_CONFIG if args.smoke else GPT_OSS_20B

        def models_(*batches):  # the modes timing a whole model build it, for these batches
            wide = "on" if any(moe_lib.wide_batch(b, config) for b in batches) else "off"
            wide = "only" if args.wide_kernel == "only" else wide
            if args.smoke:
                return models(DEMO_CONFIG, 48, args.partial, only, wide=wide)
            return models(GPT_OSS_20B, partial=args.partial, only=only, wide=wide)

        result = {"device": device, "jax": jax.__version__, "transformers_rows": peer}
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
                with switched(
                    (moe_lib, "MAX_ALIGN", max_align), (gmm_lib, "SPLIT_ROWS", split),
                    (moe_lib, "WIDE_MIN_PAIRS", args.wide_min_pairs),
                ):  # fmt: skip
                    rows = moe_rows(
                        batches, args.repeats, args.smoke, tag, args.moe_launches, args.wide_launches
                    )
                result["moe"] += [row | setting for row in rows]
        elif args.profile:
            batch, context = (int(n) for n in args.profile.split(","))
            result["profile"] = profile(models_(batch), batch, context, args.repeats)
        elif args.breakdown:
            batch, context = (int(n) for n in args.breakdown.split(","))
            copy_gigabytes = 0.05 if args.smoke else 4.0
            result["breakdown"] = breakdown(models_(batch), batch, context, args.repeats, copy_gigabytes)
        elif args.capacity:
            searched = range(1, MAX_BATCH + 1)  # batches that take the wide-batch kernel hold its layout
            result["capacity"] = capacity(models_(*searched), contexts, log, args.decode_kernels == "on")
        else:
            batches = [int(b) for b in args.batches.split(",")]
            kernels = {"off": (False,), "on": (True,), "both": (False, True)}[args.decode_kernels]
            built, result["rows"] = models_(*batches), []
            copy = copy_bandwidth(0.05 if args.smoke else 4.0)
            result["copy_gb_per_s"] = copy / 1e9
            for share, fill, stages, fused, decompressed, wide in itertools.product(
                args.state_shares.split(","),
                [int(n) for n in args.mla_fill_programs.split(",")],
                [int(n) for n in args.absorbed_stages.split(",")],
                args.fused_norms.split(","),
                args.decompressed_kernels.split(","),
                args.wide_kernel.split(","),
            ):
                setting = {
                    "state_share": share,
                    "mla_fill_programs": fill,
                    "absorbed_stages": stages,
                    "fused_norms": fused,
                    "decompressed_kernel": decompressed,
                    "wide_kernel": wide,
                }
                runs = (
                    built
                    if wide in ("on", "only")
                    else {name: (c, without_wide_experts(p)) for name, (c, p) in built.items()}
                )
                tag = lambda row, setting=setting: log(row | setting)
                with switched(
                    (flash_decode, "STATE_SHARE", None if share == "none" else float(share)),
                    (flash_decode, "MLA_FILL_PROGRAMS", fill),
                    (flash_decode, "PIPELINE_STAGES", flash_decode.PIPELINE_STAGES | {"absorbed": stages}),
                    (model_lib, "FUSED_NORMS", fused),
                    (flash_decode, "DECOMPRESSED_KERNEL", decompressed),
                ):
                    rows = speed(
                        runs, batches, contexts, args.repeats, tag, copy, kernels, args.loop_steps,
                        args.loop_only,
                    )  # fmt: skip
                result["rows"] += [row | setting for row in rows]
    result["command"] = command
    print(json.dumps(result), flush=True)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
