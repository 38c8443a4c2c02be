"""Grouped-query attention with per-head sinks, q/k/v/o biases and an optional sliding window.

Query head h reads kv head h // (H / G). Every softmax row gets one extra logit, the head's learned sink,
which is dropped after normalisation, so a row's weights sum to less than one. On sliding layers query
position i sees keys i - window + 1 .. i (`window` keys including itself).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gptoss_mla_jax import cache as kv_cache
from gptoss_mla_jax import flash_attention, flash_decode
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.execution import ForwardOptions, by_rows
from gptoss_mla_jax.rope import apply_rope, cos_sin

Params = dict[str, Any]


class Chunk(NamedTuple):
    """Where a chunk of T new tokens per sequence sits: their `positions`, which of them are real
    (`valid`; right padding is not), RoPE's `cos` / `sin` at those positions, and `cached` [B], the tokens
    each sequence already has in the cache (None without a cache)."""

    positions: Int[Array, "B T"]
    valid: Bool[Array, "B T"]
    cos: Float[Array, "B T half"]
    sin: Float[Array, "B T half"]
    cached: Int[Array, " B"] | None = None


def chunk_at(
    B: int,
    T: int,
    config: GptOssConfig,
    start: Int[Array, " B"] | None = None,
    real: Int[Array, " B"] | None = None,
) -> Chunk:
    """The chunk of T tokens per sequence after `start` cached ones (None: no cache, positions 0..T-1),
    of which the first `real` are real (default all)."""
    offset = jnp.zeros((B,), jnp.int32) if start is None else start
    positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    valid = jnp.ones((B, T), bool) if real is None else jnp.arange(T)[None, :] < real[:, None]
    return Chunk(positions, valid, *cos_sin(positions, config), start)


def key_mask(
    q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"], k_valid: Bool[Array, "B S"], window: int | None
) -> Bool[Array, "B T S"]:
    """Which keys each query may see: valid, causal, and within the sliding window if there is one."""
    mask = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return mask


def sink_softmax(scores: list[Float[Array, "B G R T S"]], sinks: Float[Array, " H"]) -> list[Array]:
    """Softmax over the keys of all blocks plus each head's sink logit; the sink column is dropped, so
    a row's weights sum to less than one. Scores must already be masked with -inf."""
    B, G, R, T = scores[0].shape[:4]
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, G, R, 1, 1), (B, G, R, T, 1))
    # The sink column is finite, so every row has a finite max even when all keys are masked.
    probs = jax.nn.softmax(jnp.concatenate([*scores, sink], axis=-1), axis=-1)
    bounds = np.cumsum([s.shape[-1] for s in scores])[:-1]
    return jnp.split(probs[..., :-1], bounds, axis=-1)


def attend(
    q: Float[Array, "B T H d"],
    keys: list[tuple[Array, Array, Int[Array, "B S"], Bool[Array, "B S"]]],
    q_pos: Int[Array, "B T"],
    sinks: Float[Array, " H"],
    window: int | None,
) -> Float[Array, "B T H d"]:
    """Softmax attention with sinks over one or more key blocks `(k, v, key_positions, key_valid)`.

    Blocks (e.g. the cache and the new chunk) are never concatenated: their scores are, which is cheap,
    and each block's values are read in place. Queries and keys may be wider than the values (rorope MLA
    scores a RoPE'd and an unrotated part side by side); scores scale by the head dim, the values' width.
    """
    B, T, H, _ = q.shape
    d = keys[0][1].shape[-1]
    G = keys[0][0].shape[2]
    qg = q.reshape(B, T, G, H // G, -1)
    scores = []
    for k, _, k_pos, k_valid in keys:
        s = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
        scores.append(jnp.where(key_mask(q_pos, k_pos, k_valid, window)[:, None, None], s, -jnp.inf))
    out = jnp.zeros((B, T, G, H // G, d), jnp.float32)
    for (_, v, _, _), p in zip(keys, sink_softmax(scores, sinks), strict=True):
        out += jnp.einsum("bgrts,bsgd->btgrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, d).astype(q.dtype)


def on_flash_kernel(options: ForwardOptions, layer_cache: dict[str, Array] | None) -> bool:
    """Whether a chunk attends on the flash-attention kernel: it has no cache, and the options ask for
    the kernel or leave it to the machine (a GPU that can lower it)."""
    if layer_cache is not None or options.attention == "jnp":
        return False
    return options.attention == "flash" or flash_decode.runs_compiled()


def attend_chunk(
    q: Float[Array, "B T H dk"],
    k: Float[Array, "B T G dk"],
    v: Float[Array, "B T G dv"],
    valid: Bool[Array, "B T"],
    sinks: Float[Array, " H"],
    window: int | None,
    options: ForwardOptions,
) -> Float[Array, "B T H dv"]:
    """A chunk without a cache (positions 0..T-1, `valid` its real tokens, right padding only) attending
    to itself on the flash-attention kernel, each device on its own rows on a mesh (`options.mesh`)."""
    interpret = not flash_decode.runs_compiled()
    on_device = lambda sinks, q, k, v, lengths: flash_attention.flash_attention(
        q, k, v, lengths, sinks, window, interpret=interpret
    )
    lengths = valid.sum(axis=1, dtype=jnp.int32)
    return by_rows(on_device, options.activation_sharding)(sinks, q, k, v, lengths)


def decode_plan(
    decode_kernels: bool,
    new_cache: dict[str, Array] | None,
    entry: str,
    kind: flash_decode.KernelKind,
    programs: int,
    block: int = 64,
    most_splits: int | None = None,
    head_block: int | None = None,
) -> flash_decode.Launch | None:
    """The `kind` flash-decoding kernel's launch when this step runs on it: asked for, one token per
    sequence, a cache whose slot count the kernel can split (`flash_decode.plan_for`), its pipeline's stages
    by `flash_decode.pipeline_stages`; else None (the jnp path)."""
    if not decode_kernels or new_cache is None or new_cache[entry].shape[1] == 0:
        return None
    steps = flash_decode.plan_for(kind, new_cache[entry].shape[1], programs, block, most_splits)
    interpret = jax.default_backend() != "gpu"
    if steps is None:
        return None
    splits, planned_block = steps
    # a slot's bytes over all the layer's entries: what an absorbed program reads (a GQA program reads one
    # kv head's: were GQA given more than two stages, this would cap it too early)
    slot_bytes = sum(math.prod(a.shape[2:]) * a.dtype.itemsize for a in new_cache.values())
    stages = flash_decode.pipeline_stages(kind, new_cache[entry].shape[1], splits, planned_block, slot_bytes)
    return flash_decode.Launch(splits, planned_block, interpret, stages=stages, head_block=head_block)


def linears(x: Float[Array, "B T In"], ps: list[Params]) -> list[Array]:
    """x @ kernel (+ bias, where it has one) for each p of `ps`, in x's dtype. A single token is multiplied
    as two rows (its row broadcast, which XLA takes into the product's kernel, where a concatenation of two
    copies was a kernel of its own) and the copy dropped: XLA on the GPU lowers a one-row product as a
    reduction, which it neither merges with the other products of the same input (q, k and v: one matmul at
    two rows) nor fuses with its neighbours as it does a matmul. Whether XLA keeps it so is a compiler's
    choice: the kernel census of a decode step (`eval.experiments.cuda_aot`, docs/decode.md) shows it."""
    bias = lambda y, p: y + p["bias"] if "bias" in p else y
    rows = x if x.shape[0] * x.shape[1] != 1 else jnp.broadcast_to(x, (2, *x.shape[1:]))
    return [bias(rows @ p["kernel"], p)[: x.shape[0]] for p in ps]


def linear(x: Float[Array, "B T In"], p: Params) -> Float[Array, "B T Out"]:
    """x @ kernel (+ bias, where `p` has one); see `linears`."""
    return linears(x, [p])[0]


def project_qkv(p: Params, x: Float[Array, "B T D"], cos, sin, config: GptOssConfig):
    """q [B,T,H,d] and k, v [B,T,G,d] with RoPE applied to q and k."""
    B, T, _ = x.shape
    d = config.head_dim
    q, k, v = linears(x, [p["q_proj"], p["k_proj"], p["v_proj"]])
    q = q.reshape(B, T, config.num_attention_heads, d)
    k = k.reshape(B, T, config.num_key_value_heads, d)
    v = v.reshape(B, T, config.num_key_value_heads, d)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention(
    p: Params,
    x: Float[Array, "B T D"],
    chunk: Chunk,
    layer_cache: dict[str, Array] | None,
    sliding: bool,
    config: GptOssConfig,
    options: ForwardOptions = ForwardOptions(),
) -> tuple[Float[Array, "B T D"], dict[str, Array] | None]:
    """One attention block (after the input norm). With a cache, the chunk attends to the cached tokens
    (`chunk.cached` of them per sequence) and to itself, and the updated layer cache is returned; without
    one, positions are 0..T-1 and `valid` a prefix of each row, as `chunk_at` makes them. `options`: the
    flash-attention kernel for chunks without a cache (`attention`), the Pallas flash-decoding kernel for a
    single-token step (`decode_kernels`)."""
    positions, valid, cos, sin, lengths = chunk
    B, T = x.shape[:2]
    G, R = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    window = config.sliding_window if sliding else None
    # Blocks of 128 slots: GQA's fastest at >= 32K on an H200 (eval/results/decode_kernels_h200.json).
    programs = flash_decode.programs_per_slice("gqa", B, G, R)
    steps = decode_plan(options.decode_kernels and T == 1, layer_cache, "k", "gqa", programs, 128)
    q, k, v = project_qkv(p, x, cos, sin, config)
    blocks = [(k, v, positions, valid)]
    new_cache = None
    if layer_cache is not None:
        slots = layer_cache["k"].shape[1]
        c_pos, c_valid = kv_cache.cached_positions(lengths, slots, sliding)
        blocks.insert(0, (layer_cache["k"], layer_cache["v"], c_pos, c_valid))
        new_lengths = lengths + valid.sum(axis=1, dtype=jnp.int32)
        new_cache = {
            name: kv_cache.write(layer_cache[name], new, positions, valid, new_lengths, sliding)
            for name, new in (("k", k), ("v", v))
        }
    if on_flash_kernel(options, layer_cache):
        out = attend_chunk(q, k, v, valid, p["sinks"], window, options)
    elif steps is not None:
        slots = flash_decode.Slots(new_lengths, window, sliding)
        out = flash_decode.gqa_decode(q[:, 0], new_cache["k"], new_cache["v"], slots, p["sinks"], steps)
        out = out[:, None]
    else:
        out = attend(q, blocks, positions, p["sinks"], window)
    out = linear(out.reshape(B, T, -1), p["o_proj"])
    return out, new_cache
