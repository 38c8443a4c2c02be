"""Batched generation with a KV cache: one prefill, then decode steps in a loop on the device, up to
DEVICE_STEPS tokens per call, the cache donated. The command line is `python -m gptoss_mla_jax.generate`."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax import flash_decode
from gptoss_mla_jax.cache import (
    MORE_MEMORY,
    CacheDoesNotFit,
    check_fits,
    compacted,
    free_device_bytes,
    init_cache,
    total_bytes,
)
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.mla import decode_key_layers, with_decode_keys, with_up_projections
from gptoss_mla_jax.model import (
    ForwardOptions,
    Params,
    check_tokens,
    forward,
    has_wide,
    wide_experts_bytes,
    with_aligned_scales,
    with_wide_experts,
    without_wide_experts,
)
from gptoss_mla_jax.moe import wide_batch

BUCKET = 16  # prompt and cache lengths are padded to multiples of this to limit recompilation


class Sampling(NamedTuple):
    """How each next token is chosen: greedy at `temperature` 0, else softmax sampling at `temperature`
    over the `top_k` best logits (None: all), with random draws from `seed`."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    @property
    def rule(self) -> Sampling:
        """What a compiled step depends on (a static argument): the seed enters as a key instead."""
        return self._replace(seed=0)


GREEDY = Sampling()


def sample(logits: Float[Array, "B V"], key: Array, sampling: Sampling) -> Int[Array, " B"]:
    """The next token of each row under `sampling` (its seed is already in `key`)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("cache",))
def prefill(params, cache, tokens, lengths, key, config: GptOssConfig, sampling: Sampling = GREEDY):
    """Run the padded prompts through the model, fill the cache, sample each sequence's first new token."""
    logits, cache, _ = forward(params, tokens, cache, config, lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample(last, key, sampling), cache


@functools.partial(
    jax.jit, static_argnames=("config", "sampling", "decode_kernels"), donate_argnames=("cache",)
)
def decode_step(
    params,
    cache,
    tokens,
    key,
    config: GptOssConfig,
    sampling: Sampling = GREEDY,
    decode_kernels: bool = False,
):
    """One token per sequence: append it to the cache and sample the next one (attending with the Pallas
    flash-decoding kernels if `decode_kernels`)."""
    return _step(params, cache, tokens, key, config, sampling, decode_kernels)


def _step(params, cache, tokens, key, config, sampling, decode_kernels):
    """`decode_step`'s work, traced inside another computation (`decode_steps`' loop)."""
    options = ForwardOptions(decode_kernels=decode_kernels)
    logits, cache, _ = forward(params, tokens[:, None], cache, config, options=options)
    return sample(logits[:, 0], key, sampling), cache


# Tokens per sequence that one `decode_steps` call may produce: the host waits for the device once per call
# instead of once per token (a batch-1 step of gpt-oss-20b launches hundreds of kernels in a few ms, and
# the host's dispatch and read-back of each step would otherwise add to every token).
DEVICE_STEPS = 64


class Decoded(NamedTuple):
    """What `decode_steps` returns: `tokens` [B, steps] (the first `count` columns produced), the last
    token of each sequence, the key to go on with, which sequences are `done` (produced the eos token),
    and the cache."""

    tokens: Int[Array, "B S"]
    count: Int[Array, ""]
    last: Int[Array, " B"]
    key: Array
    done: Array
    cache: dict


@functools.partial(
    jax.jit, static_argnames=("config", "sampling", "decode_kernels", "steps"), donate_argnames=("cache",)
)
def decode_steps(
    params,
    cache,
    tokens: Int[Array, " B"],
    key,
    done,
    limit: Int[Array, ""],
    eos_id: Int[Array, ""],
    config: GptOssConfig,
    sampling: Sampling = GREEDY,
    decode_kernels: bool = False,
    steps: int = DEVICE_STEPS,
) -> Decoded:
    """Up to `min(limit, steps)` decode steps in one device-side loop, stopping early once every sequence
    is `done` (has produced `eos_id`; -1: none). Each step draws its key as `generate` always has (split the
    running key, use the second half), so the tokens equal those of `decode_step` called once per token."""
    B = tokens.shape[0]
    keyed = decode_key_layers(config)
    if decode_kernels and keyed:  # derived once for the loop's steps, not inside it
        c = cache["layers"][keyed[0]]["c"]
        params = with_decode_keys(params, config, c.shape[1], c.dtype)

    def running(carry):
        i, done = carry[0], carry[3]
        return (i < jnp.minimum(limit, steps)) & ~jnp.all(done)

    def step(carry):
        i, token, key, done, out, cache = carry
        key, sub = jax.random.split(key)
        token, cache = _step(params, cache, token, sub, config, sampling, decode_kernels)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, token, key, done | (token == eos_id), out, cache

    out = jnp.zeros((B, steps), jnp.int32)
    i, token, key, done, out, cache = jax.lax.while_loop(
        running, step, (jnp.int32(0), tokens, key, done, out, cache)
    )
    return Decoded(out, i, token, key, done, cache)


def kernels_by_default(cache_dtype) -> bool:
    """Decode on the Pallas kernels on a GPU with a 16-bit cache: there every measured step was faster
    (H200, gpt-oss-20b shapes: batch 1 x 32K 10.5 -> 7.0 ms with GQA, batch 64 x 32K 103 -> 62 ms; README,
    "Pallas decode kernels"). Elsewhere the jnp path: off the GPU the kernels only run interpreted, and
    in float32 they run (H200: TF32-level agreement) but their speed has not been measured; and a JAX
    without the Pallas Triton backend (deprecated in JAX 0.11) cannot lower them for the GPU."""
    return flash_decode.runs_compiled() and jnp.dtype(cache_dtype).itemsize == 2


def experts_for_batch(
    params: Params, config: GptOssConfig, batch: int, decode_kernels: bool | None
) -> Params:
    """For a caller that gives up `params` and generates for `batch` sequences: the experts in the
    wide-batch kernel's layout alone (`with_wide_experts(..., replace=True, consume=True)`: their bytes held
    once, prefill and steps on it; the checkpoint's arrays deleted layer by layer) where `generate` would
    take that kernel (a GPU, bf16 on the kernels, `moe.wide_batch`), then in one piece of device memory
    (`cache.compacted`: the deleted arrays' holes would not hold a cache's layer entries), else `params` as
    they are."""
    dtype = params["embed_tokens"].dtype
    kernels = kernels_by_default(dtype) if decode_kernels is None else decode_kernels
    if wants_wide_layout(params, config, batch, kernels):
        return compacted(with_wide_experts(params, config, replace=True, consume=True))
    return params


def wants_wide_layout(params: Params, config: GptOssConfig, batch: int, decode_kernels: bool) -> bool:
    """Whether `generate`'s `batch` sequences take the wide-batch kernel, whose layout the experts do not
    carry yet: on the kernels, compiled (a GPU), bf16 activations (the kernel's), a wide batch."""
    return (
        decode_kernels
        and flash_decode.runs_compiled()
        and params["embed_tokens"].dtype == jnp.bfloat16
        and wide_batch(batch, config)
        and not has_wide(params)
    )


# XLA flags that put every run of a step's kernels, Pallas calls included, into CUDA graphs (command
# buffers): a batch-1 decode step launches hundreds of small kernels, and launched one by one from the host
# they leave the GPU idle between them. They take effect only before JAX starts its GPU backend.
CUDA_GRAPH_FLAGS = (
    "--xla_gpu_graph_min_graph_size=1 "
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
)


def request_cuda_graphs() -> None:
    """Add CUDA_GRAPH_FLAGS to XLA_FLAGS unless command buffers are already configured there (call it
    before the first computation; the CPU backend ignores the flags)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_command_buffer" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CUDA_GRAPH_FLAGS}".strip()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@contextlib.contextmanager
def out_of_memory_said(batch: int, max_len: int):
    """A step that runs out of device memory beside the KV cache, past what its plan allocates (which the
    cache was checked against), raises CacheDoesNotFit saying what to change, from XLA's error."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise CacheDoesNotFit(
            f"generating {batch} sequences x {max_len} tokens ran out of device memory beside the KV cache, "
            f"past what its compiled steps plan ({str(e).splitlines()[0][:200]}): fewer or shorter prompts, "
            f"{MORE_MEMORY}"
        ) from e


def allocated_bytes(compiled) -> int:
    """What a compiled computation's plan allocates beside its arguments: its temporaries and the outputs
    not written into a donated argument (a cache the plan does not update in place counts whole); 0 where
    the backend gives no plan."""
    plan = compiled.memory_analysis()
    if plan is None:
        return 0
    return plan.temp_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes


def generate(
    params: Params,
    config: GptOssConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    cache_dtype=None,
    decode_kernels: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens chosen by `sampling` (stopping a sequence at
    `eos_id`).
    `decode_kernels`: decode steps on the Pallas kernels (flash_decode.py, gmm.py); None picks them where
    they were measured to win, see `kernels_by_default`. (`request_cuda_graphs` before the first
    computation makes the steps' many small kernels run as CUDA graphs; the command line does.)"""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model context "
            f"of {config.max_position_embeddings} tokens (max_position_embeddings)"
        )
    B = len(prompts)
    padded = np.zeros((B, _round_up(longest, BUCKET)), np.int32)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    check_tokens(padded, config)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    max_len = min(_round_up(longest + max_new_tokens, BUCKET), config.max_position_embeddings)
    cache_dtype = cache_dtype or params["embed_tokens"].dtype
    decode_kernels = kernels_by_default(cache_dtype) if decode_kernels is None else decode_kernels

    params = with_up_projections(params, config)  # derived once for all the steps
    if decode_kernels:  # the grouped matmul's pipelined loads of the experts' scales
        params = with_aligned_scales(params)
    wide = wants_wide_layout(params, config, B, decode_kernels)
    if wide:  # the wide-batch kernel's second layout of the experts (prefill's and the steps'), where it fits
        room = free_device_bytes() - total_bytes(config, B, max_len, cache_dtype)
        wide = wide_experts_bytes(params) <= room
    key = jax.random.key(sampling.seed)
    key, sub = jax.random.split(key)
    tokens, eos = jnp.asarray(padded), jnp.int32(-1 if eos_id is None else eos_id)
    by_row = lambda dtype: jax.ShapeDtypeStruct((B,), dtype)

    def fitting_steps(params):
        """Prefill and (for a second token on) the decode loop, compiled from the cache's shapes before the
        cache is allocated, the cache checked to fit beside what they allocate (compiling needs none of its
        room). The loop gets the arrays those shapes stand for, so it runs as compiled."""
        cache = jax.eval_shape(lambda: init_cache(config, B, max_len, cache_dtype))
        steps = [prefill.lower(params, cache, tokens, lengths, sub, config, sampling.rule).compile()]
        if max_new_tokens > 1:
            steps.append(
                decode_steps.lower(
                    params, cache, by_row(jnp.int32), key, by_row(jnp.bool_), jnp.int32(0), eos, config,
                    sampling.rule, decode_kernels,
                ).compile()
            )  # fmt: skip
        check_fits(config, B, max_len, cache_dtype, max(allocated_bytes(step) for step in steps))
        return steps[0], steps[1] if max_new_tokens > 1 else None

    if wide:
        try:
            params = with_wide_experts(params, config)
            fill, loop = fitting_steps(params)
        except CacheDoesNotFit:  # what the steps allocate left no room for the layout: the steps without it
            params = without_wide_experts(params)
            fill, loop = fitting_steps(params)
    else:
        fill, loop = fitting_steps(params)
    with out_of_memory_said(B, max_len):
        cache = init_cache(config, B, max_len, cache_dtype)
        token, cache = fill(params, cache, tokens, lengths, sub)
        out = [np.asarray(token)[:, None]]
        done = token == eos
        left = max_new_tokens - 1
        while left > 0 and not bool(done.all()):
            run = loop(params, cache, token, key, done, jnp.int32(left), eos)
            count = int(run.count)
            out.append(np.asarray(run.tokens)[:, :count])
            token, key, done, cache, left = run.last, run.key, run.done, run.cache, left - count
    rows = np.concatenate(out, axis=1)
    results = []
    for row in rows.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results


DEMO_CONFIG = GptOssConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=16,
    max_position_embeddings=1024,
)
