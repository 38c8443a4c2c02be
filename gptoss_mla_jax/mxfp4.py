"""MXFP4 (OCP microscaling FP4) as gpt-oss stores its expert weights.

Blocks of 32 values along the input (last) dimension share one power-of-two scale: 16 bytes per block,
byte j holding element 2j in the low nibble and 2j+1 in the high nibble, each an E2M1 code
`[+0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]`; the scale byte is an exponent with
bias 127. Dequantized orientation is [..., out, in].

Dequantization builds the bfloat16 bit patterns with integer arithmetic, so it is bit-exact with
`transformers.integrations.mxfp4.convert_moe_packed_tensors` on any device, subnormal scales included
(XLA on CPU flushes subnormal floats to zero, so float arithmetic would not be).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, UInt8

FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
BLOCK = 32
_BF16_INF = 0x7F80  # values past bfloat16's range overflow to inf, as in the reference's ldexp


def e2m1(code: Array) -> Array:
    """E2M1 codes (int32, 0..15) -> their values in float32, by arithmetic (what a kernel can do without a
    table): magnitude m = mantissa << shift / 2 with mantissa m (m < 2) or 2 + (m & 1) and shift
    (m >> 1) - 1, the sign bit 8."""
    m = code & 7
    high = m >= 2
    mantissa = jnp.where(high, 2 + (m & 1), m)
    magnitude = (mantissa << jnp.where(high, (m >> 1) - 1, 0)).astype(jnp.float32) * 0.5
    return jnp.where(code >= 8, -magnitude, magnitude)


def mx_scale(exponent: Array) -> Array:
    """A scale byte (int32, bias 127) -> 2^(exponent - 127) in float32, built from its bits (exponent 0,
    2^-127, is a float32 subnormal: its bit pattern is 1 << 22)."""
    bits = jnp.where(exponent > 0, exponent << 23, 1 << 22)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# Scale-exponent rows padded to a multiple of this many bytes (`pad_scales`): gpt-oss's 90 exponents per
# row leave rows 2-byte aligned, too narrow for the asynchronous copies by which the Pallas grouped matmul
# pipelines its loads, so without padding each step of its loop waits for them.
SCALE_ALIGN = 16
# The largest exponent whose scale times 2^126 is a bfloat16 (2^(e - 1) <= 2^127): a block maximum under
# 16. The compiled kernels decode a tensor whose exponents are all at most this with one multiply per pair
# of values instead of two (`gmm.E2M1_ASM`); trained weights' blocks are far smaller.
FOLDABLE_EXPONENT = 128


def aligned_groups(groups: int) -> int:
    """The width of a scale-exponent row of `groups` exponents once padded (`pad_scales`)."""
    return -(-groups // SCALE_ALIGN) * SCALE_ALIGN


def pad_scales(scales: UInt8[Array, "*rows G"]) -> UInt8[Array, "*rows Ga"]:
    """Scale exponents with each row padded to `aligned_groups`. The padding is never read as exponents:
    its first byte in every row says whether all of the tensor's exponents are at most `FOLDABLE_EXPONENT`
    (1) or not (0), the rest are zeros; rows that need no padding are returned as they are (and carry no
    such flag). `dequantize` and the grouped matmul take either layout."""
    pad = aligned_groups(scales.shape[-1]) - scales.shape[-1]
    if pad == 0:
        return scales
    foldable = (jnp.max(scales) <= FOLDABLE_EXPONENT).astype(jnp.uint8)
    tail = jnp.zeros((*scales.shape[:-1], pad), jnp.uint8).at[..., 0].set(foldable)
    return jnp.concatenate([jnp.asarray(scales, jnp.uint8), tail], axis=-1)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(
    blocks: UInt8[Array, "*rows G 16"], scales: UInt8[Array, "*rows G"], dtype=jnp.bfloat16
) -> Array:
    """[..., G, 16] blocks and [..., G] scales (or their rows padded by `pad_scales`) -> values [..., G * 32]
    in `dtype` (exact in bfloat16).

    Jitted, so the integer steps fuse into one elementwise pass instead of materialising each one."""
    groups = blocks.shape[-2]
    if scales.shape[-1] == aligned_groups(groups) != groups:
        scales = scales[..., :groups]
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up")
    blocks = jnp.asarray(blocks, jnp.uint8).astype(jnp.int32)
    codes = jnp.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    scale = jnp.asarray(scales, jnp.uint8).astype(jnp.int32)[..., None]
    magnitude = codes & 7
    # E2M1 magnitude m (1..7) = 2**exponent * mantissa2 / 2: exponent -1 for m = 1, else (m >> 1) - 1;
    # mantissa2 2 for m = 1, else 2 + (m & 1). Arithmetic, not table lookups: XLA turns a lookup into a
    # gather, which made dequantizing a decode step's experts 5x slower than its matmuls.
    high = magnitude >= 2
    biased = jnp.where(high, (magnitude >> 1) - 1, -1) + scale  # bf16 biased exponent of the value
    mantissa2 = jnp.where(high, 2 + (magnitude & 1), 2)
    normal = (biased << 7) | ((mantissa2 - 2) << 6)
    # Below the normal range (biased exponent -1 or 0): value = mantissa2/2 * 2**(biased - 127) written as
    # a bf16 subnormal m * 2**-133, i.e. m = mantissa2 << (biased + 5).
    subnormal = mantissa2 << jnp.maximum(biased + 5, 0)
    bits = jnp.where(biased >= 255, _BF16_INF, jnp.where(biased >= 1, normal, subnormal))
    bits = jnp.where(magnitude == 0, 0, bits)  # an exact ldexp: zero stays (signed) zero at any scale
    bits = bits | ((codes >> 3) << 15)
    values = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
    return values.reshape(*values.shape[:-2], -1).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_experts(
    blocks: UInt8[Array, "E out G 16"], scales: UInt8[Array, "E out G"], dtype=jnp.bfloat16
):
    """Packed expert weights [E, out, in/32, ...] -> dense [E, in, out] (the `x @ W` layout), with the
    transpose fused into the dequantization."""
    return dequantize(blocks, scales, dtype).transpose(0, 2, 1)


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values [..., N] (N a multiple of 32) -> (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]).

    The shared scale is the smallest power of two that brings the block's largest magnitude to <= 6
    (OCP: floor(log2(amax)) - 2), codes are the nearest E2M1 value with ties to even, and the sign of zero
    is kept, so `dequantize(quantize(w)) == w` for every block of representable values and requantizing a
    dequantized tensor reproduces its bytes.
    """
    x = np.asarray(values, np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {x.shape}")
    x = x.reshape(*x.shape[:-1], -1, BLOCK)
    amax = np.abs(x).max(axis=-1)
    _, exponent = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = f * 2**exponent, f in [0.5, 1)
    shared = np.clip(exponent - 1 - 2 + 127, 0, 254).astype(np.int32)  # floor(log2 amax) - 2, biased
    shared = np.where(amax > 0, shared, 0)
    scaled = np.abs(x) * np.ldexp(np.float32(1), 127 - shared)[..., None].astype(np.float32)
    mids = (FP4_VALUES[1:8] + FP4_VALUES[:7]) / 2
    code = (scaled[..., None] > mids).sum(-1)
    tie = (scaled[..., None] == mids).any(-1)
    code = np.where(tie & (code % 2 == 1), code + 1, code)  # ties to the even code
    code = np.minimum(code, 7) | (np.signbit(x).astype(np.int64) << 3)
    code = code.astype(np.uint8).reshape(*code.shape[:-1], BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(shared, np.uint8)
