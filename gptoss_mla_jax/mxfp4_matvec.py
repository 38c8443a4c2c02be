"""Pallas kernel: a few rows times their own MXFP4-packed expert, dequantized on chip.

At decode a token's k experts are read once each for one row, so the step is a matrix-vector product per
(token, expert) pair and its floor is the packed bytes (0.53 bytes per weight). The jnp path
(`moe._selected_experts`) gathers the experts, dequantizes them to bf16 in memory and multiplies; this
kernel reads the packed blocks and scales where they lie and never writes a dequantized weight.

Program (p, t) takes pair p's expert `experts[p]` and output rows [t * rows, (t + 1) * rows): for each
chunk of the 32-value groups along the input it decodes the low and high nibbles of every byte (elements
2j and 2j + 1) to their E2M1 values, multiplies them with the matching even and odd input columns, sums
each group, applies the group's power-of-two scale and accumulates in float32. Chunks are powers of two
wide, as Triton's tensors must be (gpt-oss's 90 groups: 11 chunks of 8, then 2). Same backend-neutral
`pl.pallas_call` as flash_decode: CPU interpreter in CI, Triton on the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt8

from gptoss_mla_jax.flash_decode import pow2_columns, triton_launch

BLOCK = 32  # values per MXFP4 group (16 bytes, one scale)


def e2m1(code: Array) -> Array:
    """E2M1 codes (int32, 0..15) -> float32 values [0, .5, 1, 1.5, 2, 3, 4, 6] with the sign bit 8.

    Magnitude m: 0.5 * mantissa * 2^shift with mantissa m (m < 2) or 2 + (m & 1), shift (m >> 1) - 1."""
    m = code & 7
    high = m >= 2
    mantissa = jnp.where(high, 2 + (m & 1), m)
    magnitude = (mantissa << jnp.where(high, (m >> 1) - 1, 0)).astype(jnp.float32) * 0.5
    return jnp.where(code >= 8, -magnitude, magnitude)


def mx_scale(exponent: Array) -> Array:
    """The MXFP4 scale byte (int32, bias 127) -> 2^(exponent - 127) in float32, built from its bits
    (exponent 0, 2^-127, is a float32 subnormal: its bit pattern is 1 << 22)."""
    bits = jnp.where(exponent > 0, exponent << 23, 1 << 22)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kernel(experts_ref, x_even_ref, x_odd_ref, blocks_ref, scales_ref, bias_ref, out_ref, *, rows, chunk):
    p, t = pl.program_id(0), pl.program_id(1)
    expert = experts_ref[p]
    out_rows = pl.ds(t * rows, rows)

    def add(groups: pl.Slice, acc):
        packed = blocks_ref[expert, out_rows, groups, :].astype(jnp.int32)  # [rows, groups, 16]
        x_even = x_even_ref[p, groups, :].astype(jnp.float32)[None]  # [1, groups, 16]
        x_odd = x_odd_ref[p, groups, :].astype(jnp.float32)[None]
        per_group = (e2m1(packed & 0xF) * x_even + e2m1(packed >> 4) * x_odd).sum(axis=2)
        scale = mx_scale(scales_ref[expert, out_rows, groups].astype(jnp.int32))
        return acc + (per_group * scale).sum(axis=1)

    # `chunk` groups at a time (a [rows, chunk, 16] tile stays in registers), then the remainder in
    # power-of-two slices.
    G = scales_ref.shape[2]
    chunk = min(chunk, 1 << (G.bit_length() - 1))  # a loop body that fits the groups there are
    full = G // chunk
    acc = jax.lax.fori_loop(0, full, lambda i, acc: add(pl.ds(i * chunk, chunk), acc), jnp.zeros((rows,)))
    for rest in pow2_columns(G - full * chunk):
        acc = add(pl.ds(full * chunk + rest.start, rest.size), acc)
    out_ref[p, out_rows] = acc + bias_ref[expert, out_rows].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("rows", "chunk", "warps", "stages", "interpret"))
def mxfp4_matvec(
    x: Float[Array, "P n_in"],
    experts: Int[Array, " P"],
    blocks: UInt8[Array, "E n_out G 16"],
    scales: UInt8[Array, "E n_out G"],
    bias: Float[Array, "E n_out"],
    *,
    rows: int = 32,
    chunk: int = 8,
    warps: int = 4,
    stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "P n_out"]:
    """`x[p] @ W[experts[p]]^T + bias[experts[p]]` for every pair p, W the dequantized [n_out, n_in]
    expert (as `gptoss_mla_jax.mxfp4.dequantize` gives it), summed in float32. Program (p, t) computes `rows`
    outputs, reading `chunk` groups of 32 inputs per step (chunk a power of two)."""
    P, n_in = x.shape
    E, n_out, G, half_block = blocks.shape
    if half_block != BLOCK // 2 or scales.shape != (E, n_out, G) or n_in != G * BLOCK:
        raise ValueError(f"MXFP4 blocks {blocks.shape} / scales {scales.shape} do not pack inputs of {n_in}")
    rows = next((r for r in (rows, 32, 16, 8) if n_out % r == 0), None)
    if rows is None:
        raise ValueError(f"{n_out} output rows: not a multiple of 8")
    pairs = x.reshape(P, G, BLOCK // 2, 2)  # element 2j in the low nibble of byte j, 2j + 1 in the high
    whole = lambda a: pl.BlockSpec(a.shape, lambda p, t: (0,) * a.ndim)
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows, chunk=chunk),
        grid=(P, n_out // rows),
        in_specs=[whole(experts), *(whole(pairs[..., 0]),) * 2, whole(blocks), whole(scales), whole(bias)],
        out_specs=pl.BlockSpec((P, n_out), lambda p, t: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((P, n_out), jnp.float32),
        compiler_params=triton_launch(warps, stages, interpret),
        interpret=interpret,
    )(experts.astype(jnp.int32), pairs[..., 0], pairs[..., 1], blocks, scales, bias)
