"""A decode step's residual add and the RMSNorm after it, in one Pallas kernel.

Between a decode step's large products sit small XLA kernels that each cost a launch and a memory latency
more than their bytes: after the attention, the residual add, the norm's reduction and the norm applied;
after the MoE, the gather of each token's expert rows (adding the down product's contraction splits), the
weighted sum with the residual add, the next layer's norm's reduction and the norm applied. `add_norm`
does each of those runs in one program per token: `x' = x + delta` rounded to x's dtype, and `h =
weight * x' / rms(x')` (float32 inside, as `norm.rms_norm`), where `delta` is an array, or the MoE's
output before its weighted sum (`ExpertRows`): `delta[n] = sum_j weights[n, j] rows[slot[n, j]]`, the
rows first summed over the contraction splits, rows and weights rounded to x's dtype, the sum taken in
float32 and rounded to x's dtype, as `moe.moe_sparse` computes it. The model's decode steps on the
kernels run both residual adds of every layer through it (`model.fuses_norms`), each layer ending with
the next layer's input norm (the last with the final norm).

`add_norm_routed` also starts the MoE's routing after the attention's add: each token's normed row times
the router's kernel, split over programs by slices of the contraction, whose float32 partial sums the
routing kernel adds (`routing.routing_of_logits`), instead of the router's weights streaming through the
routing kernel's one program, which took about half of its time (docs/decode.md).

Backend: `pl.pallas_call` with whole-array blocks and masked loads, lowered through Pallas' Triton backend
on the GPU and run by the CPU interpreter in CI, like the other kernels (a row is one power-of-two tensor:
gpt-oss-20b's 2,880 values in a masked 4,096).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.flash_decode import masked_load, pl_triton, triton_launch
from gptoss_mla_jax.norm import rms_norm


class ExpertRows(NamedTuple):
    """The MoE's output before its weighted sum: the grouped matmul's `rows` [S, M, D] (its S contraction
    splits' float32 partial sums, or S = 1), which the product rounds to the activations' dtype once
    summed; token n's pairs at rows `slot[n]`, weighed by `weights[n]`. Both may be tiles larger than the
    tokens and their k choices, as the routing kernel stores them: a real token's column past its choices
    weighs 0 and points at a real row; the rows past the tokens are never read (their slots may point past
    the rows)."""

    rows: Float[Array, "S M D"]
    slot: Int[Array, "Nt kt"]
    weights: Float[Array, "Nt kt"]


def moe_delta(rows: ExpertRows, n: int, dtype) -> Float[Array, "N D"]:
    """What the MoE adds to the residual stream of n tokens in `dtype` (the activations'), in jnp: the
    reference of the kernel's weighted sum."""
    f32 = jnp.float32
    y = rows.rows.sum(axis=0, dtype=f32).astype(dtype)[rows.slot[:n]]
    weights = rows.weights[:n].astype(dtype).astype(f32)
    return jnp.einsum("nk,nkd->nd", weights, y.astype(f32)).astype(dtype)


def add_norm_reference(
    x: Float[Array, "N D"], delta: Float[Array, "N D"] | ExpertRows, weight: Float[Array, " D"], eps: float
) -> tuple[Float[Array, "N D"], Float[Array, "N D"]]:
    """(x + delta, its RMSNorm times `weight`) in jnp, as the model computes them off the kernel."""
    if isinstance(delta, ExpertRows):
        delta = moe_delta(delta, x.shape[0], x.dtype)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def _add_norm_kernel(*refs, D: int, eps: float, k: int | None, splits: int, depth: int | None):
    """Program n (and s, with the router): token n's row (and the router's rows from s * depth)."""
    inputs = 3 if k is None else 5  # x, the delta's arrays, the norm's weight; then the router, if any
    x_ref, *delta_refs, w_ref = refs[:inputs]
    router_ref, outs = (refs[inputs], refs[inputs + 1 :]) if depth is not None else (None, refs[inputs:])
    f32, n = jnp.float32, pl.program_id(0)
    width = pl.next_power_of_2(D)
    ok = jax.lax.broadcasted_iota(jnp.int32, (width,), 0) < D
    row = lambda ref, *at: masked_load(ref.at[(*at, pl.ds(0, width))], ok).astype(f32)
    dtype, h_dtype = outs[0].dtype, outs[1].dtype
    rounded = lambda a, dtype=dtype: a.astype(dtype).astype(f32)
    if k is None:
        (delta_ref,) = delta_refs
        delta = row(delta_ref, n)
    else:
        rows_ref, slot_ref, weights_ref = delta_refs
        delta = jnp.zeros((width,), f32)
        for j in range(k):
            at = slot_ref[n, j]
            y = sum(row(rows_ref, jnp.int32(s), at) for s in range(splits))
            delta += rounded(weights_ref[n, j]) * rounded(y)
    x = rounded(row(x_ref, n) + rounded(delta))
    mean_square = jnp.sum(jnp.where(ok, x * x, 0.0)) / D
    scale = jax.lax.rsqrt(mean_square + eps)
    h = row(w_ref) * (x * scale)

    def store():
        pl_triton.store(outs[0].at[n, pl.ds(0, width)], x.astype(dtype), mask=ok)
        pl_triton.store(outs[1].at[n, pl.ds(0, width)], h.astype(h_dtype), mask=ok)

    if depth is None:
        store()
        return
    pl.when(pl.program_id(1) == 0)(store)
    # The router's rows [s * depth, (s + 1) * depth) times the same rows of h, as the jnp path rounds it: a
    # register tensor cannot be sliced at a program's offset, so they are recomputed from the inputs.
    start = pl.program_id(1) * depth
    part_ok = start + jax.lax.broadcasted_iota(jnp.int32, (depth,), 0) < D
    part = lambda ref, *at: masked_load(ref.at[(*at, pl.ds(start, depth))], part_ok).astype(f32)
    x_part = rounded(part(x_ref, n) + rounded(part(delta_ref, n)))
    h_part = rounded(part(w_ref) * (x_part * scale), h_dtype)
    E = router_ref.shape[1]
    cols = pl.next_power_of_2(E)
    cols_ok = jax.lax.broadcasted_iota(jnp.int32, (cols,), 0) < E
    w = masked_load(router_ref.at[pl.ds(start, depth), pl.ds(0, cols)], part_ok[:, None] & cols_ok[None, :])
    logits = jnp.sum(h_part[:, None] * w.astype(f32), axis=0)
    pl_triton.store(outs[2].at[pl.program_id(1), n, pl.ds(0, cols)], logits, mask=cols_ok)


# Router rows per program of `add_norm_routed`: gpt-oss-20b's 2,880 in 12 programs per token.
ROUTER_DEPTH = 256


def _call(x, delta, weight, eps: float, interpret: bool, router=None):
    N, D = x.shape
    if isinstance(delta, ExpertRows):
        k, splits = delta.weights.shape[1], delta.rows.shape[0]
        args = (x, delta.rows, delta.slot, delta.weights, weight)
    else:
        k, splits, args = None, 1, (x, delta, weight)
    out_shape = [jax.ShapeDtypeStruct((N, D), x.dtype)] * 2
    grid, depth = (N,), None
    if router is not None:
        if k is not None:
            raise ValueError(
                "add_norm_routed: the router's product follows the attention's add, not the MoE's"
            )
        if router.shape[0] != D:
            raise ValueError(f"add_norm_routed: router kernel {router.shape}, x has {D} values a token")
        depth = min(ROUTER_DEPTH, pl.next_power_of_2(D))
        grid = (N, pl.cdiv(D, depth))
        args = (*args, router)
        out_shape.append(jax.ShapeDtypeStruct((grid[1], N, router.shape[1]), jnp.float32))
    whole = lambda a: pl.BlockSpec(a.shape, lambda *program: (0,) * a.ndim)
    kernel = functools.partial(_add_norm_kernel, D=D, eps=eps, k=k, splits=splits, depth=depth)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole(a) for a in args],
        out_specs=[whole(s) for s in out_shape],
        out_shape=out_shape,
        compiler_params=triton_launch(4, 1, interpret),
        interpret=interpret,
    )(*args)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_norm(
    x: Float[Array, "N D"],
    delta: Float[Array, "N D"] | ExpertRows,
    weight: Float[Array, " D"],
    eps: float,
    interpret: bool = False,
) -> tuple[Float[Array, "N D"], Float[Array, "N D"]]:
    """(x + delta, its RMSNorm times `weight`), both in x's dtype, by one program per token; see the module
    docstring. `interpret`: the CPU interpreter."""
    x_new, h = _call(x, delta, weight, eps, interpret)
    return x_new, h


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_norm_routed(
    x: Float[Array, "N D"],
    delta: Float[Array, "N D"],
    weight: Float[Array, " D"],
    router: Float[Array, "D E"],
    eps: float,
    interpret: bool = False,
) -> tuple[Float[Array, "N D"], Float[Array, "N D"], Float[Array, "S N E"]]:
    """`add_norm`, and the router's product h @ router as S float32 partial sums over slices of its
    contraction (`ROUTER_DEPTH` rows each, one program per slice and token), for the routing kernel to add
    (`routing.routing_of_logits`): the router's 184 KB then stream through S programs instead of one."""
    x_new, h, partials = _call(x, delta, weight, eps, interpret, router)
    return x_new, h, partials
