"""The KV cache: a plain pytree, one entry per layer, that goes through `jax.jit` with donation.

    {"lengths": int32 [B],                       # tokens already cached, per sequence
     "layers": [{"k": [B, S, G, d], "v": [B, S, G, d]},       # a GQA layer
                {"c": [B, S, r], "k_rope": [B, S, G, 2n]},    # an MLA layer (k_rope: partial mode only;
                                                              # rorope: one shared key [B, S, 1, m d])
                ...]}

Full-attention layers hold `S = max_len` slots indexed by position. Sliding-window layers hold a ring
buffer of exactly `sliding_window` slots: position p lives in slot p % window, and which position a slot
holds follows from `lengths`, so no positions are stored. Sequences are left-aligned (token i of a
sequence sits at position i), so batched prompts of different lengths need only per-sequence lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from gptoss_mla_jax.config import GptOssConfig

Cache = dict[str, Any]


def layer_slots(config: GptOssConfig, layer: int, max_len: int) -> int:
    return config.sliding_window if config.is_sliding(layer) else max_len


def entry_shapes(config: GptOssConfig, layer: int, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's cache entry."""
    slots = layer_slots(config, layer, max_len)
    G, d = config.num_key_value_heads, config.head_dim
    mla = config.mla
    if not config.is_mla(layer):
        return {"k": (batch, slots, G, d), "v": (batch, slots, G, d)}
    shapes = {"c": (batch, slots, mla.latent_dims[mla.index(layer)])}
    if mla.rope_mode == "partial":
        shapes["k_rope"] = (batch, slots, G, 2 * mla.num_rope_pairs(layer))
    if mla.rope_mode == "rorope":  # one RoPE key that every query head reads
        shapes["k_rope"] = (batch, slots, 1, mla.rope_values(layer, d, G))
    return shapes


def values_per_token(config: GptOssConfig, layer: int) -> int:
    """Cached values per token of one layer, by the formula of docs/design.md: GQA 2Gd, decompressed r,
    partial r + G * d_rope (d_rope = 2 dims per kept pair), rorope r + m d (m components kept per pair)."""
    G, d, mla = config.num_key_value_heads, config.head_dim, config.mla
    if not config.is_mla(layer):
        return 2 * G * d
    return mla.latent_dims[mla.index(layer)] + mla.rope_values(layer, d, G)


def init_cache(config: GptOssConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt plus generated)."""
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"cache max_len {max_len} exceeds the model context max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    return {
        "lengths": jnp.zeros((batch,), jnp.int32),
        "layers": [
            {name: jnp.zeros(shape, dtype) for name, shape in entry_shapes(config, i, batch, max_len).items()}
            for i in range(config.num_hidden_layers)
        ],
    }


def cache_max_len(cache: Cache, config: GptOssConfig) -> int:
    """Capacity of a cache in tokens: the slot count of its full-attention layers."""
    full = [i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]
    if not full:
        return config.max_position_embeddings
    return next(iter(cache["layers"][full[0]].values())).shape[1]


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
        expected = entry_shapes(config, i, batch, max_len)
        if set(entry) != set(expected):
            raise ValueError(f"cache['layers'][{i}] has entries {sorted(entry)}, expected {sorted(expected)}")
        for name, want in expected.items():
            if entry[name].shape != want:
                raise ValueError(
                    f"cache['layers'][{i}]['{name}'] has shape {entry[name].shape}, expected {want}"
                )


def cached_positions(
    lengths: Int[Array, " B"], slots: int, sliding: bool
) -> tuple[Int[Array, "B S"], Bool[Array, "B S"]]:
    """Position held by each cache slot, and whether the slot holds a token at all."""
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    last = lengths[:, None] - 1
    # Ring buffer: slot s holds the latest position p < length with p % slots == s.
    pos = last - jnp.mod(last - slot, slots) if sliding else jnp.broadcast_to(slot, (lengths.shape[0], slots))
    return pos, (pos >= 0) & (pos <= last)


def slot_index(
    positions: Int[Array, "B T"], valid: Bool[Array, "B T"], new_lengths, slots: int, sliding: bool
) -> Int[Array, "B T"]:
    """The slot each of a chunk's tokens goes to in a layer's cache of `slots`; padding (and, for a ring,
    tokens that the chunk itself overwrites) get the out-of-range index `slots`, to be dropped, so no slot
    gets two different rows."""
    if sliding:
        valid = valid & (positions >= new_lengths[:, None] - slots)
        index = jnp.mod(positions, slots)
    else:
        index = positions
    return jnp.where(valid, index, slots)


def write(
    entry: Array,
    new: Array,
    positions: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    new_lengths,
    sliding: bool,
) -> Array:
    """Scatter the chunk's rows into the layer's slots (`slot_index`); a single token is written twice, the
    same row to the same slot."""
    index = slot_index(positions, valid, new_lengths, entry.shape[1], sliding)
    batch = jnp.arange(entry.shape[0])[:, None]
    new = new.astype(entry.dtype)
    if index.size == 1:
        # One token written twice (the same value to the same slot): XLA turns a one-row scatter into a
        # dynamic-update-slice, which cannot fuse the row's producer (RoPE), and a scatter can.
        batch, index, new = (jnp.concatenate([a, a], axis=1) for a in (batch, index, new))
    return entry.at[batch, index].set(new, mode="drop")


def layer_bytes(config: GptOssConfig, layer: int, batch: int, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes one layer's cache takes for `batch` sequences of `context` tokens (a sliding layer keeps at
    most `sliding_window` of them)."""
    slots = min(layer_slots(config, layer, context), context)
    return batch * slots * values_per_token(config, layer) * jnp.dtype(dtype).itemsize


def device_memory() -> dict[str, int]:
    """The default device's allocator figures (`bytes_limit`, `bytes_in_use`, `largest_free_block_bytes`,
    ...); empty where the backend keeps none (CPU)."""
    return jax.local_devices()[0].memory_stats() or {}


def free_device_bytes() -> float:
    """Bytes the default device can still allocate: its limit (on a GPU, the share of the card JAX takes,
    XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set) less what is in use; unbounded where the backend does
    not say (CPU)."""
    stats = device_memory()
    if "bytes_limit" not in stats:
        return float("inf")
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


# Free device memory counts as in pieces where its largest block is less than this share of it.
FRAGMENTED = 0.9


def compacted(tree: Any) -> Any:
    """`tree` with its device arrays moved to the host and back where the device's free memory lies in
    pieces, so that the free memory is one block again; as it was where it is one block already, or the
    backend keeps no such figures (CPU). Arrays made and deleted one after another (a layout conversion that
    consumes its input, a checkpoint converted layer by layer) leave holes between the arrays kept, and a
    cache allocates whole layers' entries: near capacity the free bytes would suffice but no hole holds an
    entry. The caller gives `tree` up: its device arrays are deleted (an array appearing twice is moved
    once, its sharding kept; two array objects on one buffer come back as two buffers). Arrays spanning
    processes stay as they are (the host holds only its own shards)."""
    largest = device_memory().get("largest_free_block_bytes")
    if largest is None or largest >= FRAGMENTED * free_device_bytes():
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    arrays = {id(leaf): leaf for leaf in leaves if isinstance(leaf, jax.Array) and leaf.is_fully_addressable}
    host = dict(zip(arrays, jax.device_get(list(arrays.values())), strict=True))
    shardings = {key: array.sharding for key, array in arrays.items()}
    for array in arrays.values():
        array.delete()
    moved = {key: jax.device_put(host.pop(key), shardings[key]) for key in list(host)}
    return jax.tree.unflatten(treedef, [moved.get(id(leaf), leaf) for leaf in leaves])


def total_bytes(config: GptOssConfig, batch: int, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes the whole cache takes for `batch` sequences of `context` tokens (`layer_bytes` summed)."""
    return sum(layer_bytes(config, i, batch, context, dtype) for i in range(config.num_hidden_layers))


class CacheDoesNotFit(ValueError):
    """A cache (beside what its steps allocate) that the device has no room for."""


# What a refusal for want of device memory offers beside smaller requests.
MORE_MEMORY = "or let JAX take more of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set)"


def check_fits(config: GptOssConfig, batch: int, max_len: int, dtype, allocated: int = 0) -> None:
    """Refuse (`CacheDoesNotFit`), before allocating it, a cache of `batch` sequences of `max_len` tokens
    that the device has no room for beside the bytes its steps allocate (`allocated`), saying how many
    tokens a sequence could have and which setting gives JAX more of the card."""
    need, free = total_bytes(config, batch, max_len, dtype), free_device_bytes()
    room = free - allocated
    if need <= room:
        return
    if room <= 0:
        raise CacheDoesNotFit(
            f"the steps of {batch} sequences x {max_len} tokens allocate {_size(allocated)} beside the cache "
            f"and the device has {_size(free)} free, before any KV cache: fewer or shorter prompts, "
            f"{MORE_MEMORY}"
        )
    fits, over = 0, max_len  # the longest sequences that fit: bytes grow with the tokens
    while over - fits > 1:
        mid = (fits + over) // 2
        fits, over = (mid, over) if total_bytes(config, batch, mid, dtype) <= room else (fits, mid)
    taken = f", {_size(allocated)} of it for what its steps allocate beside it" if allocated else ""
    raise CacheDoesNotFit(
        f"a KV cache of {batch} sequences x {max_len} tokens ({jnp.dtype(dtype).name}) needs {_size(need)} "
        f"and the device has {_size(free)} free{taken}: at most {fits} tokens a sequence fit (shorter "
        f"prompts or max_new_tokens, fewer prompts), {MORE_MEMORY}"
    )


def _size(nbytes: float) -> str:
    unit, scale = next(
        ((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if nbytes >= s), ("bytes", 1)
    )
    return f"{nbytes / scale:.2f} {unit}" if scale > 1 else f"{int(nbytes)} bytes"


def nbytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def layer_kind(config: GptOssConfig, layer: int) -> str:
    kind = "sliding" if config.is_sliding(layer) else "full"
    mla = config.mla
    if not config.is_mla(layer):
        return f"{kind} GQA"
    r = mla.latent_dims[mla.index(layer)]
    kept = {
        "partial": f", {mla.num_rope_pairs(layer)} rope pairs/head",
        "rorope": f", {mla.num_rope_components(layer)} rope components/"
        + ("pair" if mla.rope_fold == 1 else f"{mla.rope_fold} pairs"),
    }.get(mla.rope_mode, "")
    return f"{kind} MLA {mla.rope_mode} r={r}{kept}"


def accounting(config: GptOssConfig, batch: int, context: int, dtype) -> dict:
    """Per layer kind and total bytes, with the same for the original (unconverted) model."""
    original = dataclasses.replace(config, mla=None)
    rows: dict[str, dict] = {}
    for i in range(config.num_hidden_layers):
        row = rows.setdefault(
            layer_kind(config, i), {"layers": 0, "values_per_token": values_per_token(config, i), "bytes": 0}
        )
        row["layers"] += 1
        row["bytes"] += layer_bytes(config, i, batch, context, dtype)
    total = sum(r["bytes"] for r in rows.values())
    base = total_bytes(original, batch, context, dtype)
    return {
        "batch": batch,
        "context": context,
        "dtype": jnp.dtype(dtype).name,
        "rows": rows,
        "total_bytes": total,
        "original_bytes": base,
        "reduction": 1 - total / base,
    }
