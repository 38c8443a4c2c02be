"""A decode step's expert routing in one Pallas kernel: the router, top-k, the softmax over the chosen k
and where each token-expert pair goes in the grouped matmul's aligned layout.

`moe.route` followed by the layout's bookkeeping in jnp is about six small XLA kernels per
layer (router multiply, reduce and bias add, top-k, the padded group sizes, the pairs' ranks): at batch 1
they are mostly launches around 184 KB of router weights. One program does it all here:

- logits `x W + b` with float32 sums rounded to x's dtype before the bias, as `moe.route` computes them
  up to the order of the sums (in bf16 a near-tie can rank two experts differently);
- top-k by k rounds of arg-max (ties to the lower expert, as `jax.lax.top_k`), softmax in float32;
- each pair's row: its expert's pairs start at a multiple of `align` rows (experts in order, each padded
  up to a multiple of `align`) and keep token order there. A pair's rank among its expert's pairs is the
  count of earlier tokens that chose that expert (a token's k experts are distinct), a lower-triangular
  product over the tokens' one-hot choices;
- the layout the other way round: each row's token, or -1 for padding (`Routing.row_token`), from which
  one gather makes the layout's rows (`moe.expert_rows`), with no scatter into a zeroed buffer.

One program holds every token, so this serves decode batches (`MAX_TOKENS`); `moe` keeps its jnp path
above that. `routing_of_logits` starts from the router's product instead, given as partial sums over
slices of its contraction: the model's decode steps take that product in the kernel of the residual add
before the MoE (`add_norm.add_norm_routed`, over many programs), so the router's weights need not stream
through this one. The router's weights stream through that one program, `RouterLaunch.depth` rows a step with
`stages` of software pipelining, so the steps' loads overlap instead of each waiting out the memory's
latency (`LAUNCH`, chosen among the candidates `eval.bench.decode --moe` times). Backend: `pl.pallas_call`
with whole-array blocks and masked loads, lowered through Pallas' Triton backend on the GPU and run by the
CPU interpreter in CI, like the other kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.flash_decode import MIN_ROWS, masked_load, triton_launch

MAX_TOKENS = 64  # one program holds every token: decode batches up to 64
ROW_CHUNK_PAIRS = 8192  # rows x pairs compared at once for `Routing.row_token` (64 a thread at 4 warps)
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class RouterLaunch:
    """The kernel's launch: `depth` rows of the router's kernel (its contraction) per step, `warps` for the
    program, `stages` of software pipelining of those steps."""

    depth: int = 256
    warps: int = 4
    stages: int = 3


LAUNCH = RouterLaunch()


def _iota(shape: tuple[int, ...], axis: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _pick(table: Array, index: Array) -> Array:
    """table[n, index[n]] for a [N, E] table and [N] indices, as a masked sum (no gathers on chip)."""
    return jnp.sum(jnp.where(_iota(table.shape, 1) == index[:, None], table, 0), axis=1)


def _routing_kernel(
    x_ref, w_ref, b_ref, weights_ref, experts_ref, slot_ref, padded_ref, row_token_ref, *, n: int, D: int,
    E: int, k: int, align: int, depth: int,
):  # fmt: skip
    rows, cols = weights_ref.shape[0], w_ref.shape[1]  # tokens and experts, padded to powers of two
    rows_ok = _iota((rows, 1), 0) < n
    experts_ok = _iota((1, cols), 1) < E

    def step(i, acc):
        at = pl.ds(i * depth, depth)
        x = masked_load(x_ref.at[:, at], rows_ok & (i * depth + _iota((1, depth), 1) < D))
        w = masked_load(w_ref.at[at, pl.ds(0, cols)], (i * depth + _iota((depth, 1), 0) < D) & experts_ok)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(D, depth), step, jnp.zeros((rows, cols), jnp.float32))
    bias = masked_load(b_ref, experts_ok.reshape(cols))
    logits = (acc.astype(x_ref.dtype) + bias[None, :]).astype(jnp.float32)
    outs = (weights_ref, experts_ref, slot_ref, padded_ref, row_token_ref)
    _choose(logits, rows_ok, experts_ok, *outs, k=k, align=align)


def _logits_kernel(
    partials_ref, b_ref, weights_ref, experts_ref, slot_ref, padded_ref, row_token_ref, *, n: int, S: int,
    E: int, k: int, align: int, dtype,
):  # fmt: skip
    splits, rows, cols = partials_ref.shape  # partial sums, tokens and experts, padded to powers of two
    rows_ok = _iota((rows, 1), 0) < n
    experts_ok = _iota((1, cols), 1) < E
    ok = (_iota((splits, 1, 1), 0) < S) & (rows_ok & experts_ok)[None]
    summed = jnp.sum(masked_load(partials_ref, ok).astype(jnp.float32), axis=0)
    bias = masked_load(b_ref, experts_ok.reshape(cols))
    logits = (summed.astype(dtype) + bias[None, :]).astype(jnp.float32)
    outs = (weights_ref, experts_ref, slot_ref, padded_ref, row_token_ref)
    _choose(logits, rows_ok, experts_ok, *outs, k=k, align=align)


def _choose(
    logits, rows_ok, experts_ok, weights_ref, experts_ref, slot_ref, padded_ref, row_token_ref, *, k: int,
    align: int,
):  # fmt: skip
    """Top-k of the float32 logits [rows, cols], the softmax over them and the aligned layout, stored."""
    rows, cols = logits.shape
    logits = jnp.where(experts_ok, logits, NEG)

    expert_ids = _iota((rows, cols), 1)
    choice_ids = _iota((rows, weights_ref.shape[1]), 1)
    top = jnp.zeros(weights_ref.shape, jnp.float32)
    chosen = jnp.zeros(weights_ref.shape, jnp.int32)
    onehot = jnp.zeros((rows, cols), jnp.float32)  # which experts each real token chose
    picks = []  # each round's expert per token
    for j in range(k):
        best = jnp.max(logits, axis=1)
        e = jnp.min(jnp.where(logits == best[:, None], expert_ids, cols), axis=1)
        top = jnp.where(choice_ids == j, best[:, None], top)
        chosen = jnp.where(choice_ids == j, e[:, None], chosen)
        hit = expert_ids == e[:, None]
        onehot = jnp.where(hit & rows_ok, 1.0, onehot)
        logits = jnp.where(hit, NEG, logits)
        picks.append(e)
        if j == 0:
            largest = best  # the softmax's shift (the columns past k hold no logit)

    valid = choice_ids < k
    p = jnp.where(valid, jnp.exp(top - largest[:, None]), 0.0)
    weights_ref[...] = p / jnp.sum(p, axis=1, keepdims=True)
    experts_ref[...] = chosen

    # Layout: experts in order, each from a multiple of `align` rows, tokens in order within an expert.
    sizes = jnp.sum(onehot, axis=0)  # [E]
    padded = jnp.ceil(sizes / align) * align
    before = _iota((cols, cols), 1) < _iota((cols, cols), 0)  # [e, e']: e' < e
    start = jnp.sum(jnp.where(before, padded[None, :], 0.0), axis=1)
    earlier = (_iota((rows, rows), 1) < _iota((rows, rows), 0)).astype(jnp.float32)  # [n, n']: n' < n
    taken = jnp.dot(earlier, onehot, preferred_element_type=jnp.float32)  # [n, e]: earlier tokens' picks
    slot = jnp.zeros(weights_ref.shape, jnp.int32)
    for j, e in enumerate(picks):
        row = _pick(jnp.broadcast_to(start[None, :], (rows, cols)), e) + _pick(taken, e)
        slot = jnp.where(choice_ids == j, row.astype(jnp.int32)[:, None], slot)
    slot_ref[...] = slot
    padded_ref[...] = padded.astype(jnp.int32)
    # The layout's rows the other way round: each row's token, or -1 for a row of padding; compared with
    # every pair a chunk of rows at a time, so that a chunk's comparisons stay in registers.
    pairs = rows * slot.shape[1]
    real = (rows_ok & (choice_ids < k)).reshape(1, pairs)
    slots, token = slot.reshape(1, pairs), _iota((rows, slot.shape[1]), 0).reshape(1, pairs)
    chunk = min(row_token_ref.shape[0], max(1, ROW_CHUNK_PAIRS // pairs))

    def rows_of_chunk(c, carry):
        hit = (c * chunk + _iota((chunk, 1), 0) == slots) & real
        row_token_ref[pl.ds(c * chunk, chunk)] = jnp.sum(jnp.where(hit, token + 1, 0), axis=1) - 1
        return carry

    jax.lax.fori_loop(0, row_token_ref.shape[0] // chunk, rows_of_chunk, 0)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, pl.next_power_of_2(n))


def layout_rows(n: int, k: int, E: int, align: int) -> int:
    """The most rows the aligned layout of n tokens' k pairs over E experts can need: every pair, and up to
    `align` - 1 rows of padding after each expert that any pair chose, rounded down to a multiple of
    `align` (every expert's rows are one), so that the grouped matmul's row tiles cover it exactly."""
    P = n * k
    return (P + min(P, E) * (align - 1)) // align * align


class Routing(NamedTuple):
    """`decode_routing`'s result: each token's routing `weights` and `experts` [N, k], each pair's `slot`
    in the aligned layout [N * k] in token order, the `padded` group sizes [E], and `row_token`, each of
    the layout's `layout_rows` rows' token (-1: padding), by which the layout's rows are gathered.
    With `tiles`, the first three as the kernel stores them, [rows, kp] tiles of at least N tokens and k
    choices (a choice past k weighs 0 and its slot is 0), and `row_token` over a power-of-two tile of
    rows."""

    weights: Float[Array, "N k"]
    experts: Int[Array, "N k"]
    slot: Int[Array, " Nk"]
    padded: Int[Array, " E"]
    row_token: Int[Array, " M"]


@functools.partial(jax.jit, static_argnames=("k", "align", "interpret", "launch", "tiles"))
def decode_routing(
    x: Float[Array, "N D"],
    kernel: Float[Array, "D E"],
    bias: Float[Array, " E"],
    k: int,
    align: int,
    interpret: bool = False,
    launch: RouterLaunch = LAUNCH,
    tiles: bool = False,
) -> Routing:
    """The `Routing` of N <= MAX_TOKENS tokens; see the module docstring. (A NaN row of logits, from NaN
    inputs, is not detected: its pairs get arbitrary slots, where `jax.lax.top_k` would return the NaN.)
    `tiles`: the outputs as the kernel stores them (`Routing`), for a Pallas consumer, which would
    otherwise read copies cut from them."""
    n, D = x.shape
    E = kernel.shape[1]
    kernel_fn = functools.partial(_routing_kernel, n=n, D=D, E=E, k=k, align=align, depth=launch.depth)
    blocks = lambda rows, cols: [(rows, D), (D, cols), (cols,)]
    return _launch(kernel_fn, blocks, (x, kernel, bias), n, E, k, align, launch, interpret, tiles)


@functools.partial(jax.jit, static_argnames=("k", "align", "dtype", "interpret", "tiles"))
def routing_of_logits(
    partials: Float[Array, "S N E"],
    bias: Float[Array, " E"],
    k: int,
    align: int,
    dtype,
    interpret: bool = False,
    tiles: bool = False,
) -> Routing:
    """`decode_routing` from the router's product x W given as S partial sums over slices of its
    contraction (`add_norm.add_norm_routed`'s; S = 1: the product itself): the logits are their sum rounded
    to `dtype` (the activations') plus the bias, as `moe.route` computes them up to the order of the
    sums."""
    S, n, E = partials.shape
    kernel_fn = functools.partial(_logits_kernel, n=n, S=S, E=E, k=k, align=align, dtype=dtype)
    blocks = lambda rows, cols: [(_pow2(S), rows, cols), (cols,)]
    return _launch(kernel_fn, blocks, (partials, bias), n, E, k, align, LAUNCH, interpret, tiles)


def _launch(
    kernel_fn,
    blocks,
    args,
    n: int,
    E: int,
    k: int,
    align: int,
    launch: RouterLaunch,
    interpret: bool,
    tiles: bool = False,
) -> Routing:
    if n > MAX_TOKENS:
        raise ValueError(f"decode_routing: {n} tokens; one program serves at most {MAX_TOKENS}")
    rows, cols, kp = _pow2(n, MIN_ROWS), _pow2(E, MIN_ROWS), _pow2(k)
    height = layout_rows(n, k, E, align)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    out_shape = [
        jax.ShapeDtypeStruct((rows, kp), jnp.float32),
        jax.ShapeDtypeStruct((rows, kp), jnp.int32),
        jax.ShapeDtypeStruct((rows, kp), jnp.int32),
        jax.ShapeDtypeStruct((cols,), jnp.int32),
        jax.ShapeDtypeStruct((_pow2(height),), jnp.int32),
    ]
    # The blocks are tiles of `rows` tokens and `cols` experts, larger than the arrays where n or E are
    # not such tiles: the kernel's masked loads read only what the arrays hold (no padded copies).
    weights, experts, slot, padded, row_token = pl.pallas_call(
        kernel_fn,
        grid=(1,),
        in_specs=[whole(shape) for shape in blocks(rows, cols)],
        out_specs=[whole(s.shape) for s in out_shape],
        out_shape=out_shape,
        compiler_params=triton_launch(launch.warps, launch.stages, interpret),
        interpret=interpret,
    )(*args)
    if tiles:
        return Routing(weights, experts, slot, padded[:E], row_token)
    return Routing(weights[:n, :k], experts[:n, :k], slot[:n, :k].reshape(-1), padded[:E], row_token[:height])
