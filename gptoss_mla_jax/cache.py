"""The KV cache: a plain pytree, one entry per layer, that goes through `jax.jit` with donation.

    {"lengths": int32 [B],                       # tokens already cached, per sequence
     "layers": [{"k": [B, S, G, d], "v": [B, S, G, d]}, ...]}

Full-attention layers hold `S = max_len` slots indexed by position. Sliding-window layers hold a ring
buffer of exactly `sliding_window` slots: position p lives in slot p % window, and which position a slot
holds follows from `lengths`, so no positions are stored. Sequences are left-aligned (token i of a
sequence sits at position i), so batched prompts of different lengths need only per-sequence lengths.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from gptoss_mla_jax.config import GptOssConfig

Cache = dict[str, Any]


def layer_slots(config: GptOssConfig, layer: int, max_len: int) -> int:
    return config.sliding_window if config.is_sliding(layer) else max_len


def init_cache(config: GptOssConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt plus generated)."""
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"cache max_len {max_len} exceeds the model context max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    shape = lambda i: (batch, layer_slots(config, i, max_len), config.num_key_value_heads, config.head_dim)
    return {
        "lengths": jnp.zeros((batch,), jnp.int32),
        "layers": [
            {"k": jnp.zeros(shape(i), dtype), "v": jnp.zeros(shape(i), dtype)}
            for i in range(config.num_hidden_layers)
        ],
    }


def cache_max_len(cache: Cache, config: GptOssConfig) -> int:
    """Capacity of a cache in tokens: the slot count of its full-attention layers."""
    full = [i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]
    return cache["layers"][full[0]]["k"].shape[1] if full else config.max_position_embeddings


def check_cache(cache: Cache, config: GptOssConfig, batch: int, chunk: int) -> None:
    """Raise a ValueError naming the first entry of `cache` that does not fit `config` and the batch."""
    if not isinstance(cache, dict) or set(cache) != {"lengths", "layers"}:
        raise ValueError("cache must be a dict with keys 'lengths' and 'layers' (see gptoss_mla_jax.cache)")
    if cache["lengths"].shape != (batch,):
        raise ValueError(f"cache['lengths'] has shape {cache['lengths'].shape}, expected ({batch},)")
    if len(cache["layers"]) != config.num_hidden_layers:
        raise ValueError(f"cache has {len(cache['layers'])} layers, the model has {config.num_hidden_layers}")
    max_len = cache_max_len(cache, config)
    if chunk > max_len:
        raise ValueError(f"{chunk} tokens do not fit a cache of {max_len} positions")
    for i, entry in enumerate(cache["layers"]):
        want = (batch, layer_slots(config, i, max_len), config.num_key_value_heads, config.head_dim)
        for name in ("k", "v"):
            if name not in entry or entry[name].shape != want:
                got = entry[name].shape if name in entry else "missing"
                raise ValueError(f"cache['layers'][{i}]['{name}'] has shape {got}, expected {want}")


def cached_positions(
    lengths: Int[Array, " B"], slots: int, sliding: bool
) -> tuple[Int[Array, "B S"], Bool[Array, "B S"]]:
    """Position held by each cache slot, and whether the slot holds a token at all."""
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    last = lengths[:, None] - 1
    # Ring buffer: slot s holds the latest position p < length with p % slots == s.
    pos = last - jnp.mod(last - slot, slots) if sliding else jnp.broadcast_to(slot, (lengths.shape[0], slots))
    return pos, (pos >= 0) & (pos <= last)


def write(
    entry: Array,
    new: Array,
    positions: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    new_lengths,
    sliding: bool,
) -> Array:
    """Scatter the chunk's rows into the layer's slots; padding (and, for a ring, rows that the chunk
    itself overwrites) go to an out-of-range index and are dropped, so no slot is written twice."""
    slots = entry.shape[1]
    if sliding:
        valid = valid & (positions >= new_lengths[:, None] - slots)
        index = jnp.mod(positions, slots)
    else:
        index = positions
    index = jnp.where(valid, index, slots)
    batch = jnp.arange(entry.shape[0])[:, None]
    return entry.at[batch, index].set(new.astype(entry.dtype), mode="drop")


def nbytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
