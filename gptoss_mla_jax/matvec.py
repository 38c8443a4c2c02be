"""One token's projections (a decode step at batch 1) in one Pallas kernel, as float32 partial sums.

XLA on the GPU lowers a one-row product as a reduction, so `attention.linear` multiplies a single token as
two rows, a copy kernel in front of each product, and XLA's GEMM then reads the weights well below the
card's bandwidth (docs/decode.md). Here the token's row multiplies each weight matrix once as it
streams by: the programs split the output columns into blocks of `MatvecLaunch.columns` and the
contraction into slices, enough of them to fill the card (`MatvecLaunch.programs`); each program reads
its [depth, columns] tiles of the weights with software pipelining, accumulates `x[:, None] * w`
elementwise in float32 (one row needs no tensor cores) and reduces the rows once at the end. Several
matrices that take the same input (q, k and v) share one launch. The slices' partial sums come out as
they are, [S, N] float32: XLA adds them in the kernels that consume the product (RoPE, the cache write),
as it does the contraction splits of its own GEMM.

Backend: `pl.pallas_call` with whole-array blocks and masked loads, lowered through Pallas' Triton backend
on the GPU and run by the CPU interpreter in CI, like the other kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from gptoss_mla_jax.flash_decode import FILL_PROGRAMS, masked_load, pl_triton, triton_launch


class MatvecLaunch(NamedTuple):
    """`depth` contraction rows a step, `columns` output columns a program, `warps` for a program and
    `stages` of software pipelining; the contraction split into slices of whole steps so that the launch
    has about `programs` programs: two an SM of an H200 by default, the fastest for q / k / v in the sweep of
    `eval.experiments.matvec_check --sweep` (eval/results/matvec_sweep_h200.json)."""

    depth: int = 32
    columns: int = 256
    warps: int = 4
    stages: int = 3
    programs: int = FILL_PROGRAMS


LAUNCH = MatvecLaunch()
# XLA adds up to 31 partial sums inside the kernels that consume them, as an elementwise loop; from 32 (a
# warp) on it runs the sum as a column reduction, a kernel of its own (`cuda_aot --step`: two kernels more
# per projection).
MOST_SLICES = 31


def contraction_slices(K: int, column_blocks: int, launch: MatvecLaunch = LAUNCH) -> tuple[int, int]:
    """(slices, rows a slice) of a contraction of K rows under `column_blocks` blocks of columns: about
    `launch.programs` programs in all and at most `MOST_SLICES` slices, each whole steps of `launch.depth`
    rows."""
    steps = pl.cdiv(K, launch.depth)
    wanted = max(1, min(steps, MOST_SLICES, pl.cdiv(launch.programs, column_blocks)))
    rows = pl.cdiv(steps, wanted) * launch.depth
    return pl.cdiv(K, rows), rows


def _matvec_kernel(x_ref, *refs, K: int, rows: int, depth: int, columns: int):
    """Program (s, j): rows [s * rows, (s + 1) * rows) of the contraction for column block j, counted over
    the matrices in order."""
    count = len(refs) // 2
    s, j, f32 = pl.program_id(0), pl.program_id(1), jnp.float32
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    first = 0
    for w_ref, out_ref in zip(refs[:count], refs[count:], strict=True):
        N = w_ref.shape[1]
        blocks = pl.cdiv(N, columns)

        @pl.when((j >= first) & (j < first + blocks))
        def _(w_ref=w_ref, out_ref=out_ref, N=N, first=first):
            at_column = (j - first) * columns
            cols_ok = at_column + iota(columns) < N

            def step(t, acc):
                at = s * rows + t * depth
                rows_ok = at + iota(depth) < K
                x = masked_load(x_ref.at[pl.ds(at, depth)], rows_ok).astype(f32)
                tile = w_ref.at[pl.ds(at, depth), pl.ds(at_column, columns)]
                w = masked_load(tile, rows_ok[:, None] & cols_ok[None, :]).astype(f32)
                return acc + x[:, None] * w

            acc = jax.lax.fori_loop(0, rows // depth, step, jnp.zeros((depth, columns), f32))
            pl_triton.store(out_ref.at[s, pl.ds(at_column, columns)], jnp.sum(acc, axis=0), mask=cols_ok)

        first += blocks


@functools.partial(jax.jit, static_argnames=("interpret", "launch"))
def matvec(
    x: Float[Array, " K"],
    kernels: tuple[Float[Array, "K _"], ...],
    interpret: bool = False,
    launch: MatvecLaunch = LAUNCH,
) -> tuple[Float[Array, "S _"], ...]:
    """x @ w for each w in `kernels`, each as float32 partial sums over S slices of the contraction
    (`contraction_slices`; their sum is the product); see the module docstring. `interpret`: the CPU
    interpreter."""
    (K,) = x.shape
    for i, w in enumerate(kernels):
        if w.ndim != 2 or w.shape[0] != K:
            raise ValueError(f"matvec: kernels[{i}] has shape {w.shape}; x has {K} values: [{K}, N] needed")
    column_blocks = sum(pl.cdiv(w.shape[1], launch.columns) for w in kernels)
    slices, rows = contraction_slices(K, column_blocks, launch)
    whole = lambda shape: pl.BlockSpec(shape, lambda *program: (0,) * len(shape))
    out_shape = [jax.ShapeDtypeStruct((slices, w.shape[1]), jnp.float32) for w in kernels]
    kernel = functools.partial(_matvec_kernel, K=K, rows=rows, depth=launch.depth, columns=launch.columns)
    return tuple(
        pl.pallas_call(
            kernel,
            grid=(slices, column_blocks),
            in_specs=[whole(x.shape), *(whole(w.shape) for w in kernels)],
            out_specs=[whole(s.shape) for s in out_shape],
            out_shape=out_shape,
            compiler_params=triton_launch(launch.warps, launch.stages, interpret),
            interpret=interpret,
        )(x, *kernels)
    )
