"""Pallas flash attention, forward and backward, for a chunk that attends to itself: training, perplexity
and a prompt's first chunk (no cache). gpt-oss's attention as `attention.attend` computes it: grouped
queries (query head h reads kv head h // R), each head's sink logit in every softmax row, causal, an
optional sliding window of `window` keys, and right padding (key t of row b is real while t < lengths[b]).

Forward: program (i, b, h) keeps query block i of head h in registers and walks the key blocks it can see
(causal: none past the diagonal; sliding: none before the window) with an online softmax whose running
max and sum start at the sink (m = sink, l = 1), so the sink is counted once and a row with no visible key
comes out zero, as in the jnp path. It writes the output and each row's log-sum-exp (base 2, sink included).

Backward (`jax.custom_vjp`, FlashAttention-2): with D = rowsum(dO * O), the probabilities rebuilt from the
log-sum-exp and dS = P * (dO V^T - D):
- d(K), d(V): program (j, b, g) holds key block j of kv head g and walks every query block that sees it,
  for each of the R query heads that read kv head g, so the grouped heads' contributions are summed on chip;
- d(Q): program (i, b, h) walks the same key blocks as the forward;
- d(sink_h) = -sum over rows of p_sink * D (the sink's value is zero), from the log-sum-exp in jnp.

Products in the inputs' dtype (bf16: tensor cores), sums in float32. Written against the backend-neutral
`pl.pallas_call` with block specs: the CPU interpreter runs it in CI; on the GPU JAX lowers it through its
Triton backend. Launch settings sit in `LAUNCH`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.flash_decode import triton_launch

LOG2E = math.log2(math.e)
NEG = -1e30  # masked score: finite, so exp2(NEG - m) is exactly 0 and never NaN


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One kernel's launch: `queries` x `keys` score tiles, `warps` per program, `stages` of pipelining."""

    queries: int = 64
    keys: int = 64
    warps: int = 4
    stages: int = 2


# Launch settings per kernel ("forward", "dkdv", "dq") for head dim 64 on an H200, chosen by
# `eval.bench.attention --sweep` (results in eval/results).
LAUNCH: dict[str, Blocks] = {
    "forward": Blocks(queries=128, keys=64, warps=4, stages=3),
    "dkdv": Blocks(queries=64, keys=128, warps=8, stages=2),
    "dq": Blocks(queries=64, keys=64, warps=4, stages=2),
}


def _iota(n: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _visible(q_pos, k_pos, length, window: int | None):
    """[queries, keys] mask: causal, a real key, and inside the sliding window if there is one."""
    mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < length)
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _key_range(q_start, queries: int, keys: int, window: int | None, length):
    """Key blocks [lo, hi) that queries [q_start, q_start + queries) can see."""
    hi = jnp.minimum(jax.lax.div(q_start + queries + keys - 1, keys), jax.lax.div(length + keys - 1, keys))
    lo = 0 if window is None else jnp.maximum(jax.lax.div(q_start - window + 1, keys), 0)
    return lo, hi


def _query_range(k_start, keys: int, queries: int, window: int | None, n_query_blocks: int):
    """Query blocks [lo, hi) that see some key in [k_start, k_start + keys)."""
    lo = jax.lax.div(k_start, queries)
    if window is None:
        return lo, n_query_blocks
    return lo, jnp.minimum(jax.lax.div(k_start + keys + window - 2, queries) + 1, n_query_blocks)


def _scores(q, k, scale: float):
    """Base-2 scores: q k^T times scale and log2(e), float32."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * (
        scale * LOG2E
    )


def _forward_kernel(q_ref, k_ref, v_ref, len_ref, sink_ref, o_ref, lse_ref, *, keys, window, scale):
    queries = q_ref.shape[0]
    q_start = pl.program_id(0) * queries
    q_pos = q_start + _iota(queries)
    length = len_ref[0]
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * keys, keys), :]
        v = v_ref[pl.ds(j * keys, keys), :]
        s = _scores(q, k, scale)
        s = jnp.where(_visible(q_pos, j * keys + _iota(keys), length, window), s, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, m_new, l * correction + p.sum(axis=1)

    m = jnp.full((queries,), sink_ref[0] * LOG2E, jnp.float32)  # the sink: exp2(sink - m) = 1
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    lo, hi = _key_range(q_start, queries, keys, window, length)
    acc, m, l = jax.lax.fori_loop(lo, hi, body, (acc, m, jnp.ones((queries,), jnp.float32)))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dkdv_kernel(
    k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, len_ref, dk_ref, dv_ref, *, queries, window, scale
):
    keys = k_ref.shape[0]
    k_start = pl.program_id(0) * keys
    k_pos = k_start + _iota(keys)
    length = len_ref[0]
    k, v = k_ref[...], v_ref[...]
    n_query_blocks = q_ref.shape[0] // queries
    lo, hi = _query_range(k_start, keys, queries, window, n_query_blocks)

    def per_head(r, carry):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * queries, queries)
            q, do = q_ref[rows, r, :], do_ref[rows, r, :]
            visible = _visible(i * queries + _iota(queries), k_pos, length, window)
            s = _scores(q, k, scale)
            p = jnp.where(visible, jnp.exp2(s - lse_ref[r, rows][:, None]), 0.0)
            dv = dv + jax.lax.dot_general(
                p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = p * (dp - delta_ref[r, rows][:, None])
            dk = dk + jax.lax.dot_general(
                ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            return dk, dv

        return jax.lax.fori_loop(lo, hi, body, carry)

    zeros = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[1], per_head, zeros)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, len_ref, dq_ref, *, keys, window, scale):
    queries = q_ref.shape[0]
    q_start = pl.program_id(0) * queries
    q_pos = q_start + _iota(queries)
    length = len_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        k = k_ref[pl.ds(j * keys, keys), :]
        v = v_ref[pl.ds(j * keys, keys), :]
        visible = _visible(q_pos, j * keys + _iota(keys), length, window)
        p = jnp.where(visible, jnp.exp2(_scores(q, k, scale) - lse[:, None]), 0.0)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    lo, hi = _key_range(q_start, queries, keys, window, length)
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ---- launches ---------------------------------------------------------------------------------------------


def _row_spec(block: int, width: int, head):
    """Rows [i * block, (i + 1) * block) of one head of a [B, T, heads, width] array; `head(h)` picks it."""
    return pl.BlockSpec((None, block, None, width), lambda i, b, h: (b, i, head(h), 0))


def _whole_spec(length: int, width: int, head):
    return pl.BlockSpec((None, length, None, width), lambda i, b, h: (b, 0, head(h), 0))


def _forward(q, k, v, lengths, sinks, window, scale, interpret):
    B, T, H, d = q.shape
    R, width_v = H // k.shape[2], v.shape[3]
    launch = LAUNCH["forward"]
    row_stats = pl.BlockSpec((None, None, launch.queries), lambda i, b, h: (b, h, i))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, keys=launch.keys, window=window, scale=scale),
        grid=(T // launch.queries, B, H),
        in_specs=[
            _row_spec(launch.queries, d, lambda h: h),
            _whole_spec(T, d, lambda h: h // R),
            _whole_spec(T, width_v, lambda h: h // R),
            pl.BlockSpec((1,), lambda i, b, h: (b,)),
            pl.BlockSpec((1,), lambda i, b, h: (h,)),
        ],
        out_specs=[_row_spec(launch.queries, width_v, lambda h: h), row_stats],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, H, width_v), q.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        compiler_params=triton_launch(launch.warps, launch.stages, interpret),
        interpret=interpret,
        name="flash_attention_forward",
    )(q, k, v, lengths, sinks)
    return out, lse


def _backward_kernels(q, k, v, lengths, lse, delta, do, *, window, scale, interpret):
    B, T, H, d = q.shape
    G, width_v = k.shape[2], v.shape[3]
    R = H // G
    kv = LAUNCH["dkdv"]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, queries=kv.queries, window=window, scale=scale),
        grid=(T // kv.keys, B, G),
        in_specs=[
            _row_spec(kv.keys, d, lambda g: g),
            _row_spec(kv.keys, width_v, lambda g: g),
            pl.BlockSpec((None, T, R, d), lambda j, b, g: (b, 0, g, 0)),  # the R query heads of kv head g
            pl.BlockSpec((None, T, R, width_v), lambda j, b, g: (b, 0, g, 0)),
            pl.BlockSpec((None, R, T), lambda j, b, g: (b, g, 0)),
            pl.BlockSpec((None, R, T), lambda j, b, g: (b, g, 0)),
            pl.BlockSpec((1,), lambda j, b, g: (b,)),
        ],
        out_specs=[_row_spec(kv.keys, d, lambda g: g), _row_spec(kv.keys, width_v, lambda g: g)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=triton_launch(kv.warps, kv.stages, interpret),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(k, v, q, do, lse, delta, lengths)
    qb = LAUNCH["dq"]
    row_stats = pl.BlockSpec((None, None, qb.queries), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, keys=qb.keys, window=window, scale=scale),
        grid=(T // qb.queries, B, H),
        in_specs=[
            _row_spec(qb.queries, d, lambda h: h),
            _row_spec(qb.queries, width_v, lambda h: h),
            row_stats,
            row_stats,
            _whole_spec(T, d, lambda h: h // R),
            _whole_spec(T, width_v, lambda h: h // R),
            pl.BlockSpec((1,), lambda i, b, h: (b,)),
        ],
        out_specs=_row_spec(qb.queries, d, lambda h: h),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_launch(qb.warps, qb.stages, interpret),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, do, lse, delta, k, v, lengths)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, lengths, sinks, window, scale, interpret):
    return _forward(q, k, v, lengths, sinks, window, scale, interpret)[0]


def _attention_fwd(q, k, v, lengths, sinks, window, scale, interpret):
    out, lse = _forward(q, k, v, lengths, sinks, window, scale, interpret)
    return out, (q, k, v, lengths, sinks, out, lse)


def _attention_bwd(window, scale, interpret, residuals, do):
    q, k, v, lengths, sinks, out, lse = residuals
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _backward_kernels(
        q, k, v, lengths, lse, delta, do.astype(q.dtype), window=window, scale=scale, interpret=interpret
    )
    p_sink = jnp.exp2(sinks.astype(jnp.float32)[None, :, None] * LOG2E - lse)
    d_sinks = -(p_sink * delta).sum(axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, None, d_sinks


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("window", "interpret"))
def flash_attention(
    q: Float[Array, "B T H dk"],
    k: Float[Array, "B T G dk"],
    v: Float[Array, "B T G dv"],
    lengths: Int[Array, " B"],
    sinks: Float[Array, " H"],
    window: int | None = None,
    interpret: bool | None = None,
) -> Float[Array, "B T H dv"]:
    """Softmax attention with sinks of T queries over the same T tokens' keys and values (key t of row b
    real while t < lengths[b]), causal, within `window` keys if given; differentiable in q, k, v and sinks.
    Equals `attention.attend(q, [(k, v, positions, valid)], positions, sinks, window)` for positions
    0..T-1 and `valid` the first lengths[b] tokens: scores scale by the values' width, which keys may exceed
    (rorope MLA scores a RoPE'd and an unrotated half side by side). `interpret` defaults to the CPU
    interpreter off the GPU.
    """
    B, T, H, d = q.shape
    dv = v.shape[3]
    if k.shape[:3] != v.shape[:3] or k.shape[:2] != (B, T) or k.shape[3] != d or H % k.shape[2]:
        raise ValueError(f"flash_attention: q {q.shape} and k, v {k.shape}, {v.shape} do not fit")
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    step = max(max(b.queries, b.keys) for b in LAUNCH.values())
    padded_T = -(-T // step) * step
    # Triton tensors have power-of-two sizes; zero columns add 0
    width = lambda x: max(16, pl.next_power_of_2(x.shape[3]))
    q, k, v = (_pad_axis(_pad_axis(x, 1, padded_T), 3, width(x)) for x in (q, k, v.astype(k.dtype)))
    out = _attention(
        q, k, v, lengths.astype(jnp.int32), sinks.astype(jnp.float32), window, dv**-0.5, interpret
    )
    return out[:, :T, :, :dv]
