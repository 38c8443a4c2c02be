"""Pallas flash-decoding: one decode step's attention over the cache, for GQA layers and absorbed MLA ones.

One kernel serves both. Program (b, g, j) takes kv head g of sequence b and the j-th slice of the cache
slots (flash-decoding: the slots are split across programs so that batch 1 fills the GPU). It walks its
slice in blocks keeping an online softmax per query head (max m, sum l, weighted values acc) over scores
`sum_i q_i . k_i + bias`; `combine` merges the slices and adds each head's sink logit exactly once.
- GQA (`gqa_decode`): the R query heads of kv head g, keys k, values v.
- MLA partial, absorbed (`mla_absorbed_decode`): one "kv head" whose H query heads read the shared latent
  c through their absorbed queries `W_bk[g]^T q_nope` plus their own kv head's RoPE keys (mla.py,
  "Decode absorbs the up-projections"); the values are the latent itself, up-projected after the merge.
Slots past a sequence's length are not read (ragged lengths: blocks after the last occupied slot are
skipped); ring-buffer slots of sliding layers map back to positions as in `cache.cached_positions` and the
window masks them.

Written against the backend-neutral `pl.pallas_call` (block specs, jnp inside): CI checks it with the CPU
interpreter (`interpret=True`); on the GPU, JAX lowers it through its Triton backend (deprecated in JAX
0.11; see the README's decode section). `generate` does not call it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

NEG = -1e30  # masked score: finite, so a slice with no visible slot keeps m finite and exp() at 0


def pow2_columns(width: int) -> list[pl.Slice]:
    """Columns [0, width) as power-of-two slices, widest first (192 -> 128 + 64): Triton tensors must
    have such sizes."""
    bits = [1 << i for i in reversed(range(width.bit_length())) if width & (1 << i)]
    return [pl.ds(sum(bits[:i]), bit) for i, bit in enumerate(bits)]


def _split_kernel(length_ref, *refs, n_keys: int, shared_values: bool, block: int, window, sliding, slots):
    """Program (b, g, j): online softmax of the query heads over slots [j * split, (j + 1) * split)."""
    q_refs, bias_ref, k_refs = refs[:n_keys], refs[n_keys], refs[n_keys + 1 : 2 * n_keys + 1]
    rest = refs[2 * n_keys + 1 :]
    v_ref, (acc_ref, m_ref, l_ref) = (k_refs[0], rest) if shared_values else (rest[0], rest[1:])
    split = v_ref.shape[0]
    start = pl.program_id(2) * split
    length = length_ref[0]
    last = length - 1  # the query's position: the step's own token is already in the cache
    f32 = jnp.float32
    contract_last = (((1,), (1,)), ((), ()))
    queries = [
        (q_ref, k_ref, pow2_columns(q_ref.shape[1])) for q_ref, k_ref in zip(q_refs, k_refs, strict=True)
    ]
    queries = [
        (k_ref, cols, q_ref[:, cols].astype(f32)) for q_ref, k_ref, all_cols in queries for cols in all_cols
    ]
    value_cols = pow2_columns(v_ref.shape[1])
    bias = bias_ref[...].astype(f32)
    heads = bias.shape[0]

    def body(i, carry):
        acc, m, l = carry
        rows = pl.ds(i * block, block)
        s = bias[:, None]
        for k_ref, cols, q in queries:
            k = k_ref[rows, cols].astype(f32)
            s = s + jax.lax.dot_general(q, k, contract_last, preferred_element_type=f32)
        slot = start + i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        pos = last - jax.lax.rem(last - slot + slots, slots) if sliding else slot
        visible = (pos >= 0) & (pos <= last)
        if window is not None:
            visible &= pos > last - window
        s = jnp.where(visible, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        scale = jnp.exp(m - m_new)
        acc = [
            a * scale[:, None] + jnp.dot(p, v_ref[rows, cols].astype(f32), preferred_element_type=f32)
            for a, cols in zip(acc, value_cols, strict=True)
        ]
        return acc, m_new, l * scale + p.sum(axis=1)

    # Occupied slots are always a prefix [0, min(length, slots)), ring buffer or not.
    blocks = jnp.clip(pl.cdiv(jnp.minimum(length, slots) - start, block), 0, split // block)
    init = (
        [jnp.zeros((heads, cols.size), f32) for cols in value_cols],
        jnp.full((heads,), NEG, f32),
        jnp.zeros((heads,), f32),
    )
    acc, m, l = jax.lax.fori_loop(0, blocks, body, init)
    for cols, a in zip(value_cols, acc, strict=True):
        acc_ref[:, cols] = a
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("window", "sliding", "splits", "block", "interpret"))
def attention_splits(
    queries: tuple[Float[Array, "B G Hq _"], ...],
    bias: Float[Array, "B G Hq"],
    keys: tuple[Float[Array, "B S G _"], ...],
    values: Float[Array, "B S G dv"] | None,
    lengths: Int[Array, " B"],
    window: int | None = None,
    sliding: bool = False,
    splits: int = 8,
    block: int = 64,
    interpret: bool = False,
) -> tuple[Float[Array, "B G J Hq dv"], Float[Array, "B G J Hq"], Float[Array, "B G J Hq"]]:
    """Per kv head g and slice j of the slots: (sum_t e^(s_t - m) v_t, m, sum_t e^(s_t - m)) with scores
    `s_t = sum_i queries[i] . keys[i]_t + bias` (scale already in the queries). `values=None`: the values
    are `keys[0]` (the latent of absorbed MLA)."""
    B, G, Hq = bias.shape
    S = keys[0].shape[1]
    if S % (splits * block):
        raise ValueError(f"cache of {S} slots: not a multiple of splits x block = {splits} x {block}")
    split = S // splits
    shared = values is None
    dv = (keys[0] if shared else values).shape[-1]
    cache_spec = lambda width: pl.BlockSpec((None, split, None, width), lambda b, g, j: (b, j, g, 0))
    kernel = functools.partial(
        _split_kernel, n_keys=len(keys), shared_values=shared, block=block, window=window,
        sliding=sliding, slots=S,
    )  # fmt: skip
    out_shape = [(B, G, splits, Hq, dv), (B, G, splits, Hq), (B, G, splits, Hq)]
    return pl.pallas_call(
        kernel,
        grid=(B, G, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, g, j: (b,)),
            *[pl.BlockSpec((None, None, Hq, q.shape[-1]), lambda b, g, j: (b, g, 0, 0)) for q in queries],
            pl.BlockSpec((None, None, Hq), lambda b, g, j: (b, g, 0)),
            *[cache_spec(k.shape[-1]) for k in keys],
            *([] if shared else [cache_spec(dv)]),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Hq, dv), lambda b, g, j: (b, g, j, 0, 0)),
            pl.BlockSpec((None, None, None, Hq), lambda b, g, j: (b, g, j, 0)),
            pl.BlockSpec((None, None, None, Hq), lambda b, g, j: (b, g, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape in out_shape],
        interpret=interpret,
    )(lengths.astype(jnp.int32), *queries, bias, *keys, *([] if shared else [values]))


def combine(
    acc: Float[Array, "B G J Hq dv"],
    m: Float[Array, "B G J Hq"],
    l: Float[Array, "B G J Hq"],
    sinks: Float[Array, " H"],
) -> tuple[Float[Array, "B G Hq dv"], Float[Array, "B G Hq"]]:
    """Merge the slices with each head's sink logit (heads in kv-head-major order) counted once: (the
    attention-weighted values, the total attention mass on the tokens, < 1 because of the sink)."""
    sinks = sinks.astype(jnp.float32).reshape(m.shape[1], m.shape[3])[None]  # [1, G, Hq]
    top = jnp.maximum(m.max(axis=2), sinks)
    weight = jnp.exp(m - top[:, :, None])  # 0 for a slice that saw no token
    tokens = (weight * l).sum(axis=2)
    total = tokens + jnp.exp(sinks - top)
    return (weight[..., None] * acc).sum(axis=2) / total[..., None], tokens / total


def gqa_decode(
    q: Float[Array, "B H d"],
    k: Float[Array, "B S G d"],
    v: Float[Array, "B S G d"],
    lengths: Int[Array, " B"],
    sinks: Float[Array, " H"],
    window: int | None,
    sliding: bool,
    splits: int = 8,
    block: int = 64,
    interpret: bool = False,
) -> Float[Array, "B H d"]:
    """One decode query per sequence (RoPE applied) over a GQA layer's cache that already holds the step's
    token (`lengths` count it): the attention output per head, as `attention.attend` computes it."""
    B, H, d = q.shape
    G = k.shape[2]
    qg = (q.astype(jnp.float32) * d**-0.5).reshape(B, G, H // G, d)
    acc, m, l = attention_splits(
        (qg,),
        jnp.zeros(qg.shape[:3], jnp.float32),
        (k,),
        v,
        lengths,
        window,
        sliding,
        splits,
        block,
        interpret,
    )
    out, _ = combine(acc, m, l, sinks)
    return out.reshape(B, H, d).astype(q.dtype)


def mla_absorbed_decode(
    q_rope: Float[Array, "B G R n2"],
    q_nope: Float[Array, "B G R n"],
    w_k: Float[Array, "r G n"],
    b_k: Float[Array, "G n"],
    w_v: Float[Array, "r G d"],
    b_v: Float[Array, "G d"],
    entries: dict[str, Array],
    lengths: Int[Array, " B"],
    sinks: Float[Array, " H"],
    window: int | None,
    sliding: bool,
    d: int,
    splits: int = 8,
    block: int = 64,
    interpret: bool = False,
) -> Float[Array, "B H d"]:
    """One decode query per sequence over a partial-mode layer's cache {"c" [B,S,r], "k_rope" [B,S,G,2n]}
    that already holds the step's token: the attention output per head, as `mla._absorbed` computes it."""
    B, G, R, n2 = q_rope.shape
    f32 = jnp.float32
    scale = d**-0.5
    q_lat = jnp.einsum("bgrn,lgn->bgrl", q_nope, w_k, preferred_element_type=f32).reshape(B, 1, G * R, -1)
    q_bias = jnp.einsum("bgrn,gn->bgr", q_nope, b_k, preferred_element_type=f32).reshape(B, 1, G * R)
    # Each head's RoPE query placed in its own kv head's columns of the flattened k_rope [S, G * 2n].
    own = jnp.eye(G, dtype=f32)[None, :, None, :, None]  # [1, G, 1, G', 1]
    q_rope_flat = (q_rope.astype(f32)[:, :, :, None] * own).reshape(B, 1, G * R, G * n2)
    c = entries["c"][:, :, None]  # one "kv head": the latent is shared by all heads
    k_rope = entries["k_rope"].reshape(*entries["k_rope"].shape[:2], 1, G * n2)
    acc, m, l = attention_splits(
        (q_lat * scale, q_rope_flat * scale), q_bias * scale, (c, k_rope), None, lengths, window, sliding,
        splits, block, interpret,
    )  # fmt: skip
    latent, mass = combine(acc, m, l, sinks)
    latent, mass = latent.reshape(B, G, R, -1), mass.reshape(B, G, R, 1)
    out = jnp.einsum("bgrl,lgd->bgrd", latent, w_v.astype(f32)) + mass * b_v.astype(f32)[:, None]
    return out.reshape(B, G * R, -1).astype(q_nope.dtype)
