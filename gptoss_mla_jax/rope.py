"""YaRN rotary position embeddings, exactly as transformers computes them for gpt-oss.

Half-split rotation (`x1, x2 = halves`), not interleaved. `inv_freq` blends interpolated and original
frequencies with a linear ramp between the YaRN correction bounds, which are NOT rounded when the config
says `truncate: false` (rounding them is a known bug elsewhere). cos and sin carry the mscale factor.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.config import GptOssConfig


def inv_freq(config: GptOssConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], float32, following transformers' float32 formula.

    `theta ** (2i / dim)` is evaluated in float64 and rounded once (correctly rounded); torch's float32
    pow can be 1 ulp off that, which is the only difference from transformers' table.
    """
    rope, dim = config.rope, config.head_dim
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    pos_freqs = (np.float64(rope.theta) ** exponent).astype(np.float32)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    if rope.rope_type == "default":
        return extrapolation
    interpolation = (1.0 / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)

    def correction_dim(num_rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = correction_dim(rope.beta_fast or 32)
    high = correction_dim(rope.beta_slow or 1)
    if rope.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(
        np.float32
    )


def cos_sin(
    positions: Int[Array, "*batch T"], config: GptOssConfig
) -> tuple[Float[Array, "*batch T half"], Float[Array, "*batch T half"]]:
    """cos and sin tables (float32) for the given positions, with YaRN's mscale folded in."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(config))
    scale = config.yarn_attention_scale()
    return jnp.cos(freqs) * scale, jnp.sin(freqs) * scale


def apply_rope(
    x: Float[Array, "B T N d"], cos: Float[Array, "B T *N half"], sin: Float[Array, "B T *N half"]
) -> Float[Array, "B T N d"]:
    """Rotate the two halves of every head of `x` (computed in float32, returned in x's dtype).

    cos / sin are shared by all heads ([B, T, half]) or given per head ([B, T, N, half], e.g. when each
    head keeps its own subset of frequency pairs)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    if cos.ndim == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
