"""A batch-1 GQA decode step's query, key and value finished from their projection's partial sums in one
Pallas kernel: the attention kernel's query tile made, the key and value written into the cache in place.

After `matvec` the q / k / v products are float32 partial sums over slices of the contraction. XLA finished
them in three kernels a layer, each adding its sums: the query's bias, RoPE, scale and padding to the
attention kernel's 16 rows; the key's bias and RoPE with its scatter into the cache; the value's bias with
its scatter. Here one program per kv head does all three: each sum rounded to the activations' dtype and the
bias added there (as `attention.linears` rounds), RoPE in float32 rounded back (`rope.apply_rope`), the
query times head_dim^-0.5 in the cache's dtype (as `flash_decode.gqa_decode` scales it) with zero rows up to
the tile, and the key and value stored at the token's slot (`cache.slot_index`; none for a token that is
dropped) of caches that are the kernel's outputs as well as its inputs (aliased: written in place).

Backend: `pl.pallas_call` with whole-array blocks and masked loads, lowered through Pallas' Triton backend
on the GPU and run by the CPU interpreter in CI, like the other kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.flash_decode import MIN_ROWS, masked_load, pl_triton, triton_launch


def _finish_kernel(
    slot_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, cos_ref, sin_ref, _k_in, _v_in, q_out, k_out,
    v_out, *, R: int, dtype,
):  # fmt: skip
    """Program g: kv head g's query heads, key and value."""
    f32, g, first = jnp.float32, pl.program_id(0), jnp.int32(0)  # the one sequence
    S, d = q_ref.shape[0], q_ref.shape[-1]
    Sp, Rp, half = pl.next_power_of_2(S), q_out.shape[2], d // 2
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    rounded = lambda a: a.astype(dtype).astype(f32)
    s_ok = iota(Sp) < S
    cos, sin = cos_ref[...].astype(f32), sin_ref[...].astype(f32)

    def finished(sums_ref, bias_ref, heads, rows_ok, cols):
        """Rows `heads` of columns `cols`: the sums over the slices rounded, plus the bias, rounded."""
        mask = s_ok[:, None, None] & rows_ok[None, :, None]
        total = jnp.sum(masked_load(sums_ref.at[pl.ds(0, Sp), heads, cols], mask), axis=0)
        bias = masked_load(bias_ref.at[heads, cols], rows_ok[:, None]).astype(f32)
        return rounded(rounded(total) + bias)  # [len(heads), len(cols)]

    def roped(sums_ref, bias_ref, heads, rows_ok):
        x1, x2 = (finished(sums_ref, bias_ref, heads, rows_ok, pl.ds(c, half)) for c in (0, half))
        return rounded(x1 * cos - x2 * sin), rounded(x2 * cos + x1 * sin)

    q_ok = iota(Rp) < R
    for part, c in zip(roped(q_ref, qb_ref, pl.ds(g * R, Rp), q_ok), (0, half), strict=True):
        q_out[first, g, :, pl.ds(c, half)] = (part * d**-0.5).astype(q_out.dtype)
    one = iota(1) < 1
    slot = slot_ref[0]
    k_parts = roped(k_ref, kb_ref, pl.ds(g, 1), one)
    v = finished(v_ref, vb_ref, pl.ds(g, 1), one, pl.ds(0, d))

    @pl.when(slot < k_out.shape[1])
    def _():
        for part, c in zip(k_parts, (0, half), strict=True):
            pl_triton.store(k_out.at[first, slot, pl.ds(g, 1), pl.ds(c, half)], part.astype(k_out.dtype))
        pl_triton.store(v_out.at[first, slot, pl.ds(g, 1), pl.ds(0, d)], v.astype(v_out.dtype))


@functools.partial(jax.jit, static_argnames=("dtype", "interpret"))
def finish_qkv(
    sums: tuple[Float[Array, "S Hd"], Float[Array, "S Gd"], Float[Array, "S Gd"]],
    biases: tuple[Float[Array, " Hd"], Float[Array, " Gd"], Float[Array, " Gd"]],
    cos: Float[Array, " half"],
    sin: Float[Array, " half"],
    slot: Int[Array, " 1"],
    k_cache: Float[Array, "1 slots G d"],
    v_cache: Float[Array, "1 slots G d"],
    dtype,
    interpret: bool = False,
) -> tuple[Float[Array, "1 G Rp d"], Float[Array, "1 slots G d"], Float[Array, "1 slots G d"]]:
    """(the attention kernel's query tile [1, G, Rp, d]: each kv head's R query heads RoPE'd and scaled, zero
    rows up to Rp = max(16, R) a power of two; the caches with the token's key (RoPE'd) and value at
    `slot`) of one token from its q / k / v projections' partial sums [S, N] (`matvec`) and biases,
    rounded to `dtype` (the activations') as `attention.linears` rounds them; see the module docstring.
    `cos` / `sin`: the token's RoPE table (`rope.cos_sin`); `slot`: its slot (`cache.slot_index`; `slots`
    drops it)."""
    G, d = k_cache.shape[2:]
    H = sums[0].shape[1] // d
    R = H // G
    Rp = max(MIN_ROWS, pl.next_power_of_2(R))
    heads = lambda a, n: a.reshape(*a.shape[:-1], n, d)
    args = (
        slot.astype(jnp.int32),
        *(heads(s, n) for s, n in zip(sums, (H, G, G), strict=True)),
        *(heads(b, n) for b, n in zip(biases, (H, G, G), strict=True)),
        cos,
        sin,
        k_cache,
        v_cache,
    )
    whole = lambda a: pl.BlockSpec(a.shape, lambda g: (0,) * a.ndim)
    out_shape = [jax.ShapeDtypeStruct((1, G, Rp, d), k_cache.dtype), k_cache, v_cache]
    kernel = functools.partial(_finish_kernel, R=R, dtype=dtype)
    return tuple(
        pl.pallas_call(
            kernel,
            grid=(G,),
            in_specs=[whole(a) for a in args],
            out_specs=[whole(s) for s in out_shape],
            out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shape],
            input_output_aliases={len(args) - 2: 1, len(args) - 1: 2},
            compiler_params=triton_launch(4, 1, interpret),
            interpret=interpret,
        )(*args)
    )
