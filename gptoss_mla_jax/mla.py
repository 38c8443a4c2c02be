"""Multi-head Latent Attention: the KV cache holds one small latent per token (docs/design.md).

Per converted layer, with `h` the normed input, G kv heads of dim d and H query heads:

- `decompressed`: latent `c = h W_a` (width r). Keys before RoPE and values are up-projected,
  `[k_pre, v] = c W_b + b`, RoPE is applied to `k_pre` after decompression, then ordinary GQA attention
  with sinks. RoPE geometry is untouched; at r = 2Gd the layer is exact.
- `partial`: each kv head keeps a few RoPE frequency pairs exactly: those key dims are projected straight
  from `h` (`k_rope`, cached after RoPE, per kv head). The other key dims lose RoPE (scored as RoPE at
  angle 0, so YaRN's mscale^2 stays) and are compressed jointly with V into the latent:
  `[k_nope, v] = c W_b + b`. Decode absorbs the up-projections and attends over the latent directly:
  `score = (W_bk^T q_nope) . c + q_nope . b_k + q_rope . k_rope` and `out = W_bv (sum_t p_t c_t) +
  (sum_t p_t) b_v` (with sinks the weights sum to less than one, so the value bias is scaled, and the
  constant `q_nope . b_k` does not cancel).
- `rorope`: frequency pair f of the G kv heads' keys is mixed by an orthogonal G x G matrix U_f
  (`rope_mix`, from PCA of calibration keys), `k'_j = sum_g U_f[j, g] k_g` on both coordinates of the pair,
  which commutes with RoPE (every head's pair f turns by the same angle). The leading m components of
  every pair keep RoPE (`k_rope`, m d values cached after RoPE, one key that all query heads read); the
  other components lose it and join V in the latent as in partial. Query head h of kv group g reads
  component j through `U_f[j, g] q_h`: its RoPE query is that mixed query, and its no-RoPE scores fold the
  mixing into per-kv-head up-projections `W_bk[g] = sum_{j >= m} U_f[j, g] W_bk'[j]`, so decode is partial's
  absorbed attention with one shared RoPE key. FreqFold (`rope_fold` F > 1): U mixes a group of F adjacent
  pairs of all kv heads (G F components of d / F values) and the kept components turn at the group's first
  frequency, so RoPE is approximated (its F frequencies taken as one) in exchange for a PCA over more dims.

Params of a converted layer's `self_attn`: `q_proj`, `o_proj`, `sinks` as in GQA, plus `kv_a` {kernel
[D, r]}, `kv_b` {kernel [r, W], bias [W]} with W = 2Gd (decompressed), G(d - 2n) + Gd (partial, n pairs
kept) or (GF - m)d/F + Gd (rorope, m components kept, F pairs folded), for partial `k_rope` {kernel
[D, G*2n], bias [G*2n]}, for rorope `k_rope` {kernel [D, m*d/F], bias [m*d/F]} and `rope_mix`
[d/2F, GF, G, F] (group of pairs, component, kv head, pair in the group). Cache entry: {"c": [B, S, r]}
and, for partial, "k_rope": [B, S, G, 2n], for rorope "k_rope": [B, S, 1, m*d/F].
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax import cache as kv_cache
from gptoss_mla_jax import flash_decode
from gptoss_mla_jax.attention import (
    Chunk,
    attend,
    attend_chunk,
    decode_plan,
    key_mask,
    linear,
    linears,
    on_flash_kernel,
    sink_softmax,
)
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.execution import ForwardOptions
from gptoss_mla_jax.rope import apply_rope, cos_sin

Params = dict[str, Any]


def rope_dims(config: GptOssConfig, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Per kv head, the head dims that keep RoPE ([G, 2n]: the pairs' first halves, then their second
    halves, as the half-split rotation wants) and the dims that lose it ([G, d - 2n], ascending)."""
    d = config.head_dim
    pairs = np.asarray(config.mla.rope_pairs[config.mla.index(layer)], np.int32).reshape(
        config.num_key_value_heads, -1
    )
    keep = np.concatenate([pairs, pairs + d // 2], axis=1)
    nope = np.stack([np.setdiff1d(np.arange(d), row) for row in keep]).astype(np.int32)
    return keep, nope.reshape(config.num_key_value_heads, d - keep.shape[1])


def mla_param_shapes(config: GptOssConfig, layer: int) -> dict[str, Any]:
    D, H, G, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    r = config.mla.latent_dims[config.mla.index(layer)]
    width = config.mla_target_width(layer)
    shapes = {
        "q_proj": {"kernel": (D, H * d), "bias": (H * d,)},
        "o_proj": {"kernel": (H * d, D), "bias": (D,)},
        "sinks": (H,),
        "kv_a": {"kernel": (D, r)},
        "kv_b": {"kernel": (r, width), "bias": (width,)},
    }
    if config.mla.partial_rope:
        kept = config.mla.rope_values(layer, d, G)
        shapes["k_rope"] = {"kernel": (D, kept), "bias": (kept,)}
    if config.mla.rope_mode == "rorope":
        F = config.mla.rope_fold
        shapes["rope_mix"] = (d // (2 * F), G * F, G, F)
    return shapes


def _per_head(table: Float[Array, "B T half"], pairs: np.ndarray) -> Float[Array, "B T G n"]:
    """cos or sin of each kv head's own kept pairs."""
    return table[:, :, pairs]


# rorope's keys and mixed components share one layout: a head's d dims are [coordinate (2), group of
# pairs (Q = d / 2F), pair in the group (F)] (the half-split rotation's two halves, each pair by frequency),
# and a component's d / F values are [coordinate, group]. `rope_mix` U is [Q, GF, G, F]: for group q,
# component j mixes `k'_j = sum_{g, i} U[q, j, g, i] k_{g, pair qF + i}` on both coordinates.


def mix(
    keys: Float[Array, "*batch G d"], rope_mix: Float[Array, "Q J G F"], components: slice = slice(None)
) -> Float[Array, "*batch Jc dF"]:
    """The mixed components `components` of per-kv-head keys (rows of `rope_mix`)."""
    Q, F = rope_mix.shape[0], rope_mix.shape[-1]
    k = keys.reshape(*keys.shape[:-1], 2, Q, F)
    out = jnp.einsum("...gcqi,qjgi->...jcq", k, rope_mix[:, components].astype(keys.dtype))
    return out.reshape(*out.shape[:-2], 2 * Q)


def demix(
    mixed: Float[Array, "*batch Jc dF"], rope_mix: Float[Array, "Q J G F"], components: slice
) -> Float[Array, "*batch G d"]:
    """Per kv head, what the mixed components `components` carry of its keys: `k_g = sum_j U[j, g] k'_j`
    (U orthogonal per group, so this inverts `mix` when every component is given)."""
    Q = rope_mix.shape[0]
    k = mixed.reshape(*mixed.shape[:-1], 2, Q)
    out = jnp.einsum("...jcq,qjgi->...gcqi", k, rope_mix[:, components].astype(mixed.dtype))
    return out.reshape(*out.shape[:-3], -1)


def folded(table: Float[Array, "B T half"], fold: int, expand: bool = False) -> Array:
    """cos or sin at each group of `fold` pairs' first frequency ([B, T, half / fold]; `expand`: repeated
    for every pair of the group, [B, T, half]): FreqFold turns a group's mixed components as one pair."""
    first = table[..., ::fold]
    return jnp.repeat(first, fold, axis=-1) if expand else first


def attention_mla(
    p: Params,
    x: Float[Array, "B T D"],
    chunk: Chunk,
    layer_cache: dict[str, Array] | None,
    sliding: bool,
    config: GptOssConfig,
    layer: int,
    options: ForwardOptions = ForwardOptions(),
) -> tuple[Float[Array, "B T D"], dict[str, Array] | None]:
    """One converted attention block (after the input norm); same contract as `attention.attention`.

    `options.mla_absorb` (partial, rorope): attend over the latent with absorbed up-projections (default for
    single-token decode) or materialize K and V (default otherwise: cheaper when many queries share the
    keys); materialized keys and values of a chunk without a cache go through `attention.attend_chunk`
    when `options` pick the flash-attention kernel.
    """
    positions, valid, cos, sin, lengths = chunk
    B, T, _ = x.shape
    H, d = config.num_attention_heads, config.head_dim
    window = config.sliding_window if sliding else None
    names = ["q_proj", *projected_entries(config)]
    projected = dict(zip(names, linears(x, [p[name] for name in names]), strict=True))
    q = projected["q_proj"].reshape(B, T, H, d)
    new = cache_entries(p, x, cos, sin, config, layer, projected)
    partial = config.mla.partial_rope

    # Key blocks as (entries, positions, valid): the cached tokens (if any), then this chunk.
    blocks = [(new, positions, valid)]
    new_cache = None
    if layer_cache is not None:
        slots = layer_cache["c"].shape[1]
        c_pos, c_valid = kv_cache.cached_positions(lengths, slots, sliding)
        blocks.insert(0, (layer_cache, c_pos, c_valid))
        new_lengths = lengths + valid.sum(axis=1, dtype=jnp.int32)
        new_cache = {
            name: kv_cache.write(layer_cache[name], value, positions, valid, new_lengths, sliding)
            for name, value in new.items()
        }

    absorb = T == 1 if options.mla_absorb is None else options.mla_absorb
    G = config.num_key_value_heads
    head_block, most_splits = None, None
    if partial and new_cache is not None:  # absorbed: one program per sequence and block of query heads
        slot_bytes = sum(math.prod(x.shape[2:]) * x.dtype.itemsize for x in new_cache.values())
        head_block, most_splits = flash_decode.absorbed_split(
            B, new_cache["c"].shape[1], H, slot_bytes, new_cache["c"].shape[-1], flash_decode.STATE_SHARE
        )
    kind = "absorbed" if partial else "decompressed"  # decompressed: one program per group of kv heads
    programs = flash_decode.programs_per_slice(kind, B, G, H // G, head_block)
    steps = decode_plan(
        options.decode_kernels and T == 1, new_cache, "c", kind, programs, most_splits=most_splits,
        head_block=head_block,
    )  # fmt: skip
    if steps is not None:
        slots = flash_decode.Slots(new_lengths, config.sliding_window if sliding else None, sliding)
        out = _kernel_decode(p, q, chunk, new_cache, slots, config, layer, steps)
    elif partial and absorb:
        q_rope, q_nope = _partial_queries(q, cos, sin, config, layer, p.get("rope_mix"))
        up = _partial_up_projections(p, config, layer)
        out = _absorbed(q_rope, q_nope, up, blocks, positions, p["sinks"], window)
    elif on_flash_kernel(options, layer_cache):
        k, v = keys_values(p, new, positions, config, layer)
        out = attend_chunk(
            scoring_queries(q, cos, sin, config, layer), k, v, valid, p["sinks"], window, options
        )
    else:
        keys = [(*keys_values(p, entries, pos, config, layer), pos, ok) for entries, pos, ok in blocks]
        out = attend(scoring_queries(q, cos, sin, config, layer), keys, positions, p["sinks"], window)
    out = linear(out.reshape(B, T, H * d), p["o_proj"])
    return out, new_cache


def _kernel_decode(
    p: Params, q, chunk: Chunk, cache: dict, slots: flash_decode.Slots, config: GptOssConfig, layer: int,
    launch: flash_decode.Launch,
):  # fmt: skip
    """A single-token step on the Pallas flash-decoding kernels, over the cache that holds the token."""
    if config.mla.partial_rope:
        q_rope, q_nope = _partial_queries(q, chunk.cos, chunk.sin, config, layer, p.get("rope_mix"))
        return flash_decode.mla_absorbed_decode(
            q_rope[:, 0], q_nope[:, 0], _partial_up_projections(p, config, layer), cache, slots, p["sinks"],
            launch,
        )[:, None]  # fmt: skip
    derived = p.get(DECODE_KEYS)
    if derived is None or slots.sliding:
        rotations = slot_rotations(slots.lengths, cache["c"].shape[1], slots.sliding, config)
        key_up = None
    else:  # derived once for the steps of a device loop (`with_decode_keys`)
        rotations, key_up = (derived["cos"], derived["sin"]), (derived["kernel"], derived["bias"])
    return flash_decode.mla_decompressed_decode(
        scoring_queries(q, chunk.cos, chunk.sin, config, layer)[:, 0], p["kv_b"], cache["c"], slots,
        p["sinks"], rotations, launch, key_up,
    )[:, None]  # fmt: skip


DECODE_KEYS = "decode_keys"  # a decompressed full-attention layer's derived entry, `with_decode_keys`


def decode_key_layers(config: GptOssConfig) -> list[int]:
    """The layers `with_decode_keys` derives for: decompressed, full attention (slot = position)."""
    if config.mla is None or config.mla.rope_mode != "decompressed":
        return []
    return [i for i in config.mla.layers if not config.is_sliding(i)]


def with_decode_keys(params: Params, config: GptOssConfig, slots: int, dtype) -> Params:
    """`params` with what a decode step on the kernels derives for each decompressed full-attention layer
    computed once, under DECODE_KEYS: the slots' cos / sin for a cache of `slots` (`slot_rotations`: one
    table, shared by the layers) and the key up-projection in the kernel's layout for a cache of `dtype`
    (`flash_decode.grouped_key_up`, at the default launch's kv heads a program). `generation.decode_steps`
    adds it before its loop: XLA keeps both in the loop otherwise (2 x slots x head_dim / 2 float32 values
    written and read a layer a step, 8 MB at 32K, and a copy of the layer's key weights). For inference
    only, like `with_up_projections`."""
    if not decode_key_layers(config):
        return params
    layers = list(params["layers"])
    cos, sin = slot_rotations(jnp.zeros((1,), jnp.int32), slots, False, config)
    G, d = config.num_key_value_heads, config.head_dim
    P = flash_decode.kv_heads_per_program(G, config.num_attention_heads // G)
    for i in decode_key_layers(config):
        attn = layers[i]["self_attn"]
        r = attn["kv_b"]["kernel"].shape[0]
        w = attn["kv_b"]["kernel"].reshape(r, 2, G, d)[:, 0]
        kernel, bias = flash_decode.grouped_key_up(w, attn["kv_b"]["bias"].reshape(2, G, d)[0], P, dtype)
        derived = {"cos": cos, "sin": sin, "kernel": kernel, "bias": bias}
        layers[i] = {**layers[i], "self_attn": {**attn, DECODE_KEYS: derived}}
    return {**params, "layers": layers}


def slot_rotations(
    lengths: Int[Array, " B"], slots: int, sliding: bool, config: GptOssConfig
) -> tuple[Float[Array, "Bc S half"], Float[Array, "Bc S half"]]:
    """cos / sin (`rope.cos_sin`) of the positions a cache's slots hold, for the decompressed decode
    kernel: per sequence on a ring buffer (Bc = B), shared by all sequences otherwise (Bc = 1, slot =
    position). Tabled rather than computed in the kernel, where every kv head would redo the sines."""
    if sliding:
        positions = kv_cache.cached_positions(lengths, slots, True)[0]
    else:
        positions = jnp.arange(slots, dtype=jnp.int32)[None]
    return cos_sin(positions, config)


def projected_entries(config: GptOssConfig) -> list[str]:
    """The projections of a token that `cache_entries` keeps: the latent's, and the RoPE key's (partial,
    rorope)."""
    return ["kv_a"] if config.mla.rope_mode == "decompressed" else ["kv_a", "k_rope"]


def cache_entries(
    p: Params, x: Float[Array, "B T D"], cos, sin, config: GptOssConfig, layer: int, projected=None
) -> dict:
    """What the cache keeps of each token: {"c": the latent [B,T,r]} and, partial, {"k_rope": the kept
    RoPE key dims after RoPE [B,T,G,2n]}, rorope, {"k_rope": the kept mixed components after RoPE
    [B,T,1,m*d]}. `projected`: x's `projected_entries` already computed, by name."""
    names = projected_entries(config)
    if projected is None:
        projected = dict(zip(names, linears(x, [p[name] for name in names]), strict=True))
    new = {"c": projected["kv_a"]}
    if config.mla.rope_mode == "rorope":
        F = config.mla.rope_fold
        k_rope = projected["k_rope"].reshape(*x.shape[:2], -1, config.head_dim // F)
        new["k_rope"] = apply_rope(k_rope, folded(cos, F), folded(sin, F)).reshape(*x.shape[:2], 1, -1)
    if config.mla.rope_mode == "partial":
        keep, _ = rope_dims(config, layer)
        pairs = keep[:, : keep.shape[1] // 2]
        k_rope = projected["k_rope"].reshape(*x.shape[:2], config.num_key_value_heads, -1)
        new["k_rope"] = apply_rope(k_rope, _per_head(cos, pairs), _per_head(sin, pairs))
    return new


def scoring_queries(
    q: Float[Array, "B T H d"], cos, sin, config: GptOssConfig, layer: int
) -> Float[Array, "B T H d"]:
    """The queries in the layout of `keys_values`' keys: RoPE'd (decompressed), per head the kept RoPE
    dims RoPE'd followed by the other dims (partial), or the whole query RoPE'd followed by the whole query
    at angle 0 (rorope: [B, T, H, 2d], each half against its kv head's RoPE'd and unrotated key parts)."""
    if config.mla.rope_mode == "decompressed":
        return apply_rope(q, cos, sin)
    if config.mla.rope_mode == "rorope":
        F = config.mla.rope_fold
        roped = apply_rope(q, folded(cos, F, expand=True), folded(sin, F, expand=True))
        return jnp.concatenate([roped, _at_angle_zero(q, config)], axis=-1)
    q_rope, q_nope = _partial_queries(q, cos, sin, config, layer)
    return jnp.concatenate([q_rope, q_nope], axis=-1).reshape(q.shape)


def keys_values(
    p: Params, entries: dict[str, Array], positions: Int[Array, "B S"], config: GptOssConfig, layer: int
) -> tuple[Float[Array, "B S G d"], Float[Array, "B S G d"]]:
    """Keys and values materialized from cache entries ({"c"[, "k_rope"]}) at their `positions`; rorope's
    keys are [B, S, G, 2d]: what the kept components carry of each kv head's key (RoPE'd), then what the
    others carry (unrotated)."""
    G, d = config.num_key_value_heads, config.head_dim
    lat = entries["c"]
    if config.mla.rope_mode == "decompressed":
        kv = (lat @ p["kv_b"]["kernel"] + p["kv_b"]["bias"]).reshape(*lat.shape[:2], 2, G, d)
        k_cos, k_sin = cos_sin(positions, config)
        return apply_rope(kv[:, :, 0], k_cos, k_sin), kv[:, :, 1]
    w_k, b_k, w_v, b_v = _partial_up_projections(p, config, layer)
    k_nope = jnp.einsum("bsl,lgn->bsgn", lat, w_k) + b_k
    v = jnp.einsum("bsl,lgd->bsgd", lat, w_v) + b_v
    k_rope = entries["k_rope"]
    if config.mla.rope_mode == "rorope":
        m = config.mla.num_rope_components(layer)
        k_rope = demix(k_rope.reshape(*lat.shape[:2], m, -1), p["rope_mix"], slice(None, m))
    return jnp.concatenate([k_rope.astype(lat.dtype), k_nope.astype(lat.dtype)], axis=-1), v


def _at_angle_zero(q: Array, config: GptOssConfig) -> Array:
    """Query dims whose keys lost RoPE score as RoPE at angle 0: both sides keep YaRN's mscale, hence
    mscale^2 on q."""
    return q * config.yarn_attention_scale() ** 2


def _partial_queries(q, cos, sin, config: GptOssConfig, layer: int, rope_mix: Array | None = None):
    """(q_rope [B,T,G,R,n2], q_nope [B,T,G,R,n]) per kv group g and query r, against the RoPE keys and the
    no-RoPE keys of `_partial_up_projections`: partial, the kept dims RoPE'd (n2 = 2n) and the others
    (n = d - 2n); rorope, the RoPE'd query (FreqFold: at its groups' first frequencies) mixed by the
    layer's `rope_mix` into the m kept components (n2 = m d / F, laid out as the cached key; head h of kv
    group g reads component j through `U[j, g] q_h`) and the whole query (n = d)."""
    B, T, H, d = q.shape
    G = config.num_key_value_heads
    qg = q.reshape(B, T, G, H // G, d)
    if config.mla.rope_mode == "rorope":
        F, m = config.mla.rope_fold, config.mla.num_rope_components(layer)
        roped = apply_rope(q, folded(cos, F, expand=True), folded(sin, F, expand=True))
        roped = roped.reshape(B, T, G, H // G, 1, 2, d // (2 * F), F)
        # U[q, j, g, i] as [G, 1, m, 1, Q, F], applied as a broadcast product summed over i: written as an
        # einsum it is a dot whose batch-major output XLA transposes back to heads-major in a kernel of its
        # own (eval.experiments.cuda_aot's census)
        mixing = jnp.transpose(rope_mix[:, :m], (2, 1, 0, 3))[:, None, :, None].astype(jnp.float32)
        q_rope = (roped.astype(jnp.float32) * mixing).sum(-1).astype(q.dtype)
        return q_rope.reshape(B, T, G, H // G, m * d // F), _at_angle_zero(qg, config)
    roped = apply_rope(q, cos, sin).reshape(qg.shape)
    keep, nope = rope_dims(config, layer)
    q_rope = jnp.take_along_axis(roped, keep[None, None, :, None], axis=-1)
    q_nope = _at_angle_zero(jnp.take_along_axis(qg, nope[None, None, :, None], axis=-1), config)
    return q_rope, q_nope


UP = "up_projections"  # a converted layer's derived entry, `with_up_projections`
UP_NAMES = ("w_k", "b_k", "w_v", "b_v")


def with_up_projections(params: Params, config: GptOssConfig) -> Params:
    """`params` with each absorbable (partial, rorope) layer's per-kv-head up-projections
    (`_partial_up_projections`) computed once and kept beside its weights under UP, for a loop of decode
    steps (`generation.generate`): a step then reads them instead of re-deriving them from `kv_b` (and,
    rorope, `rope_mix`) in a few small kernels per layer. Nothing else changes; `model.check_params`
    accepts the entry where this function puts it, with these shapes. For inference only: a forward pass
    uses the entry instead of `kv_b`, so training such params would leave `kv_b` without gradient."""
    if config.mla is None or not config.mla.partial_rope:
        return params
    layers = list(params["layers"])
    for i in config.mla.layers:
        attn = layers[i]["self_attn"]
        up = dict(zip(UP_NAMES, _partial_up_projections(attn, config, i), strict=True))
        layers[i] = {**layers[i], "self_attn": {**attn, UP: up}}
    return {**params, "layers": layers}


def _partial_up_projections(p: Params, config: GptOssConfig, layer: int):
    """(w_k [r,G,n], b_k [G,n], w_v [r,G,d], b_v [G,d]): `kv_b` split into each kv head's no-RoPE keys
    and values; partial, the dims that lost RoPE (n = d - 2n); rorope, the whole head (n = d), from the
    latent's GF - m mixed components mixed back per kv head (`demix`). Taken from UP where
    `with_up_projections` put them."""
    if UP in p:
        return tuple(p[UP][name] for name in UP_NAMES)
    G, d = config.num_key_value_heads, config.head_dim
    kv_b, kv_bias = p["kv_b"]["kernel"], p["kv_b"]["bias"]
    k_width = G * d - config.mla.rope_values(layer, d, G)
    r = kv_b.shape[0]
    w_v = kv_b[:, k_width:].reshape(r, G, d)
    b_v = kv_bias[k_width:].reshape(G, d)
    if config.mla.rope_mode == "rorope":
        m, per_component = config.mla.num_rope_components(layer), d // config.mla.rope_fold
        dropped = lambda x: demix(x.reshape(*x.shape[:-1], -1, per_component), p["rope_mix"], slice(m, None))
        return dropped(kv_b[:, :k_width]), dropped(kv_bias[:k_width]), w_v, b_v
    w_k = kv_b[:, :k_width].reshape(r, G, k_width // G)
    b_k = kv_bias[:k_width].reshape(G, k_width // G)
    return w_k, b_k, w_v, b_v


def _absorbed(q_rope, q_nope, up, blocks, q_pos, sinks, window):
    """Attention directly over the cached latent: every query head of kv group g reads the shared latent
    through its own absorbed query `W_bk[g]^T q_nope`, plus its kv head's rope keys (partial) or the one
    shared rope key (rorope). `up`: the up-projections (W_bk, b_k, W_bv, b_v)."""
    w_k, b_k, w_v, b_v = up
    d = w_v.shape[-1]
    B, T, G, R, _ = q_nope.shape
    f32 = jnp.float32
    q_lat = jnp.einsum("btgrn,lgn->btgrl", q_nope, w_k, preferred_element_type=f32)
    q_bias = jnp.einsum("btgrn,gn->bgrt", q_nope, b_k, preferred_element_type=f32)  # constant per query
    scores = []
    for entries, pos, ok in blocks:
        s = jnp.einsum("btgrl,bsl->bgrts", q_lat, entries["c"], preferred_element_type=f32)
        s += _rope_scores(q_rope, entries["k_rope"])
        s = (s + q_bias[..., None]) * d**-0.5
        scores.append(jnp.where(key_mask(q_pos, pos, ok, window)[:, None, None], s, -jnp.inf))
    probs = sink_softmax(scores, sinks)
    latent = sum(
        jnp.einsum("bgrts,bsl->btgrl", p, entries["c"].astype(f32))
        for p, (entries, _, _) in zip(probs, blocks, strict=True)
    )
    mass = sum(p.sum(-1) for p in probs).transpose(0, 3, 1, 2)  # [B, T, G, R], < 1 because of the sink
    out = jnp.einsum("btgrl,lgd->btgrd", latent, w_v.astype(f32)) + mass[..., None] * b_v.astype(f32)[:, None]
    return out.reshape(B, T, G * R, d).astype(q_nope.dtype)


def _rope_scores(q_rope: Float[Array, "B T G R n2"], k_rope: Float[Array, "B S Gk n2"]) -> Array:
    """[B, G, R, T, S]: each query head's RoPE query against its own kv head's RoPE keys (partial, Gk = G)
    or against the one RoPE key that all heads share (rorope, Gk = 1)."""
    if k_rope.shape[2] == 1:
        return jnp.einsum("btgrk,bsk->bgrts", q_rope, k_rope[:, :, 0], preferred_element_type=jnp.float32)
    return jnp.einsum("btgrk,bsgk->bgrts", q_rope, k_rope, preferred_element_type=jnp.float32)
