"""Pallas flash-decoding over the cached latent: one decode step of a `partial`-mode MLA layer, absorbed.

Every query head of the step reads the shared latent `c` [S, r] through its absorbed query
`q_lat = W_bk[g]^T q_nope` plus its kv head's RoPE keys (mla.py, "Decode absorbs the up-projections"). The
cache slots are split across programs (flash-decoding) so that batch 1 fills the GPU: program (b, j) walks
its slice of slots in blocks and keeps an online softmax per head (max m, sum l, weighted latent acc);
`combine` merges the slices, adding each head's sink logit exactly once. Slots past a sequence's length
are not read (ragged lengths); ring-buffer slots of sliding layers map back to positions as in
`cache.cached_positions`, and the window masks them.

Written against `pl.pallas_call` with block specs and jnp inside: the CPU interpreter (`interpret=True`)
checks it in CI. NOT yet run on a GPU; `mla.attention_mla` does not call it (see the README's decode
section for the state of the GPU kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

NEG = -1e30  # masked score: finite, so a block with no visible slot keeps m finite and exp() at 0


def _split_kernel(
    length_ref, q_lat_ref, q_rope_ref, q_bias_ref, c_ref, k_rope_ref, acc_ref, m_ref, l_ref,
    *, block: int, window: int | None, sliding: bool, slots: int,
):  # fmt: skip
    """Program (b, j): online softmax of all heads over slots [j * split, (j + 1) * split)."""
    split = c_ref.shape[0]
    start = pl.program_id(1) * split
    length = length_ref[0]
    last = length - 1  # the query's position: the step's own token is already in the cache
    f32 = jnp.float32
    H, r = q_lat_ref.shape
    # The latent in power-of-two column slices (192 = 128 + 64): Triton tensors must have such sizes.
    parts = [pl.ds(r & ~((bit << 1) - 1), bit) for bit in (1 << i for i in range(r.bit_length())) if r & bit]
    q_lat = [q_lat_ref[:, cols].astype(f32) for cols in parts]
    q_rope = q_rope_ref[...].astype(f32)
    q_bias = q_bias_ref[...].astype(f32)
    contract_last = (((1,), (1,)), ((), ()))

    def body(i, carry):
        acc, m, l = carry
        rows = pl.ds(i * block, block)
        c = [c_ref[rows, cols].astype(f32) for cols in parts]
        s = jax.lax.dot_general(
            q_rope, k_rope_ref[rows, :].astype(f32), contract_last, preferred_element_type=f32
        )
        for q_part, c_part in zip(q_lat, c, strict=True):
            s += jax.lax.dot_general(q_part, c_part, contract_last, preferred_element_type=f32)
        s += q_bias[:, None]
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
            a * scale[:, None] + jnp.dot(p, c_part, preferred_element_type=f32)
            for a, c_part in zip(acc, c, strict=True)
        ]
        return acc, m_new, l * scale + p.sum(axis=1)

    # Occupied slots are always a prefix [0, min(length, slots)), ring buffer or not.
    blocks = jnp.clip(pl.cdiv(jnp.minimum(length, slots) - start, block), 0, split // block)
    init = (
        [jnp.zeros((H, cols.size), f32) for cols in parts],
        jnp.full((H,), NEG, f32),
        jnp.zeros((H,), f32),
    )
    acc, m, l = jax.lax.fori_loop(0, blocks, body, init)
    for cols, a in zip(parts, acc, strict=True):
        acc_ref[:, cols] = a
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("window", "sliding", "splits", "block", "interpret"))
def latent_attention_splits(
    q_lat: Float[Array, "B H r"],
    q_rope: Float[Array, "B H K"],
    q_bias: Float[Array, "B H"],
    c: Float[Array, "B S r"],
    k_rope: Float[Array, "B S K"],
    lengths: Int[Array, " B"],
    window: int | None = None,
    sliding: bool = False,
    splits: int = 8,
    block: int = 64,
    interpret: bool = False,
) -> tuple[Float[Array, "B J H r"], Float[Array, "B J H"], Float[Array, "B J H"]]:
    """Per slice j of the slots: (sum_t e^(s_t - m) c_t, m, sum_t e^(s_t - m)) with scores
    `s_t = q_lat . c_t + q_rope . k_rope_t + q_bias` (scale already applied to the queries)."""
    B, H, r = q_lat.shape
    S, K = c.shape[1], k_rope.shape[2]
    if S % (splits * block):
        raise ValueError(f"cache of {S} slots: not a multiple of splits x block = {splits} x {block}")
    split = S // splits
    kernel = functools.partial(_split_kernel, block=block, window=window, sliding=sliding, slots=S)
    return pl.pallas_call(
        kernel,
        grid=(B, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, j: (b,)),
            pl.BlockSpec((None, H, r), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, H, K), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, H), lambda b, j: (b, 0)),
            pl.BlockSpec((None, split, r), lambda b, j: (b, j, 0)),
            pl.BlockSpec((None, split, K), lambda b, j: (b, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, H, r), lambda b, j: (b, j, 0, 0)),
            pl.BlockSpec((None, None, H), lambda b, j: (b, j, 0)),
            pl.BlockSpec((None, None, H), lambda b, j: (b, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, splits, H, r), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, H), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, H), jnp.float32),
        ],
        interpret=interpret,
    )(lengths.astype(jnp.int32), q_lat, q_rope, q_bias, c, k_rope)


def combine(
    acc: Float[Array, "B J H r"],
    m: Float[Array, "B J H"],
    l: Float[Array, "B J H"],
    sinks: Float[Array, " H"],
) -> tuple[Float[Array, "B H r"], Float[Array, "B H"]]:
    """Merge the slices with each head's sink logit counted once: (attention-weighted latent, total
    attention mass on the tokens, < 1 because of the sink)."""
    sinks = sinks.astype(jnp.float32)
    top = jnp.maximum(m.max(axis=1), sinks[None])  # [B, H]
    weight = jnp.exp(m - top[:, None])  # [B, J, H]; 0 for a slice that saw no token
    tokens = (weight * l).sum(axis=1)
    total = tokens + jnp.exp(sinks[None] - top)
    latent = (weight[..., None] * acc).sum(axis=1) / total[..., None]
    return latent, tokens / total


def absorbed_decode(
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
    that already holds the step's token (`lengths` count it): the layer's attention output per head, as
    `mla._absorbed` computes it."""
    B, G, R, n2 = q_rope.shape
    f32 = jnp.float32
    scale = d**-0.5
    q_lat = jnp.einsum("bgrn,lgn->bgrl", q_nope, w_k, preferred_element_type=f32).reshape(B, G * R, -1)
    q_bias = jnp.einsum("bgrn,gn->bgr", q_nope, b_k, preferred_element_type=f32).reshape(B, G * R)
    # Each head's RoPE query placed in its own kv head's columns of the flattened k_rope [S, G * 2n].
    own = jnp.eye(G, dtype=f32)[None, :, None, :, None]  # [1, G, 1, G', 1]
    q_rope_flat = (q_rope.astype(f32)[:, :, :, None] * own).reshape(B, G * R, G * n2)
    k_rope = entries["k_rope"].reshape(*entries["k_rope"].shape[:2], G * n2)
    acc, m, l = latent_attention_splits(
        q_lat * scale, q_rope_flat * scale, q_bias * scale, entries["c"], k_rope, lengths,
        window, sliding, splits, block, interpret,
    )  # fmt: skip
    latent, mass = combine(acc, m, l, sinks)
    latent = latent.reshape(B, G, R, -1)
    out = (
        jnp.einsum("bgrl,lgd->bgrd", latent, w_v.astype(f32))
        + mass.reshape(B, G, R, 1) * b_v.astype(f32)[:, None]
    )
    return out.reshape(B, G * R, -1).astype(q_nope.dtype)
