"""Pallas grouped matmul for the MoE's experts: forward and both gradients, bf16 or MXFP4-packed weights.

`gmm(lhs [M, K], rhs, group_sizes [G], bias) -> [M, N]` is `jax.lax.ragged_dot` plus a per-group bias:
the rows of lhs are sorted by group, group g's rows are multiplied by rhs[g], and rows past
`sum(group_sizes)` come out zero. rhs is either dense [G, K, N] or `Mxfp4(blocks, scales)` in the
checkpoint's packed orientation ([G, N, K / 32, 16] bytes, [G, N, K / 32] scale exponents), which the
kernels decode tile by tile on chip: no dequantized copy of the experts is ever written.

Tiling. Row tiles of `rows` rows are paired with the groups they overlap ((group, tile) pairs, computed
from `group_sizes` by `tile_map`; a tile that straddles a group boundary is visited once per group and
each visit stores only its own group's rows; where every group starts at a multiple of the tile, as the MoE
lays out decode batches, program i takes tile i and finds its group from the sizes itself). Program (n, i)
computes output columns block n of pair i, looping over the contraction in steps of `depth` with float32
accumulation. The column blocks are the fastest grid axis, so the programs running at once share their row
tiles (read once from memory) and stream their groups' weights through L2.

Backward (`jax.custom_vjp`): d(lhs) is the same kernel against the transposed weights (dense: the
[G, K, N] array read as [G, N, K]; MXFP4: the packed rows contracted instead of the packed columns);
d(rhs) of dense weights is `tgmm`, per group lhs^T @ d(out) over that group's rows; d(bias) a segment sum.
MXFP4 weights get no gradient (they are not trainable).

MXFP4 decoding splits the contraction into even and odd columns: byte j of a packed row holds elements 2j
(low nibble) and 2j + 1 (high nibble), so the decoded low nibbles multiply the even columns of lhs and the
high nibbles the odd ones, two products per step and no interleaving on chip.

Backend: the backend-neutral `pl.pallas_call` with whole-array block specs and explicit (masked) loads and
stores, lowered through Pallas' Triton backend on the GPU and run by the CPU interpreter in CI, as the
decode kernels are. Launch settings per kernel and shape sit in `LAUNCH`, chosen by `eval.bench.moe
--sweep`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt8

from gptoss_mla_jax.flash_decode import FILL_PROGRAMS, masked_load, pl_triton, triton_launch
from gptoss_mla_jax.mxfp4 import BLOCK, e2m1, mx_scale


class Mxfp4(NamedTuple):
    """Packed expert weights as the checkpoint stores them: W[g] is [N, K], K packed 32 values a group."""

    blocks: UInt8[Array, "G N Kg 16"]
    scales: UInt8[Array, "G N Kg"]


Weights = Float[Array, "G K N"] | Mxfp4


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch: an output tile of `rows` x `cols`, `depth` contraction values per step,
    `warps` per program and `stages` of software pipelining; `splits` (forward products only): the
    contraction divided among that many programs per tile, their float32 partial sums added after the
    kernel, for products with too few tiles to keep the GPU's SMs streaming (decode batches);
    `fill_programs`: a forward product of fewer programs than this splits its contraction in two (the
    number of programs is the product's tiles, known from the shapes: a decode batch's few experts)."""

    rows: int = 128
    cols: int = 128
    depth: int = 64
    warps: int = 4
    stages: int = 3
    splits: int = 1
    fill_programs: int | None = None


class Glu(NamedTuple):
    """gpt-oss's clamped SwiGLU over a product's interleaved (gate, up) column pairs, halving its width:
    `(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with `g = min(gate, limit)`. A forward product
    given one applies it to each output tile before storing it (`gmm(..., glu=)`)."""

    alpha: float
    limit: float

    def __call__(self, gate_up: Float[Array, "... N"]) -> Float[Array, "... N/2"]:
        pairs = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
        gate, up = (a.reshape(pairs.shape[:-1]) for a in jnp.split(pairs, 2, axis=-1))
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


# Launch settings by (kernel, contraction K, output width N; for tgmm the weight's K and N); (kernel, None,
# None) is the default for other shapes. The sweep (eval.bench.moe --sweep, results in eval/results) chose
# them at gpt-oss-20b's expert shapes on an H200. Kernels: "gmm" (dense forward), "gmm_t" (dense d(lhs)),
# "tgmm" (dense d(rhs); rows is the contraction step there), "mxfp4" and "mxfp4_t" (packed forward and
# d(lhs)); a kind with "_small" appended launches the products whose row tile is at most SMALL_ROWS or whose
# groups are aligned to the tile (decode batches: few rows per group, so the weights' bytes and their
# decoding set the time, not the tensor cores),
# and "_small_wide" those of them whose groups average more than WIDE_GROUP_ROWS rows (decode batches that
# select every expert: wider, shallower steps read each program's activations for more columns).
# `grouped_product` shortens the row tile when groups are small (`_fit_rows`).
LAUNCH: dict[tuple[str, int | None, int | None], Tiles] = {
    ("gmm", None, None): Tiles(rows=128, cols=128, depth=64, warps=4, stages=3),
    ("gmm", 2880, 5760): Tiles(rows=128, cols=256, depth=64, warps=8, stages=3),
    ("gmm_t", None, None): Tiles(rows=128, cols=128, depth=64, warps=4, stages=3),
    ("gmm_t", 5760, 2880): Tiles(rows=128, cols=256, depth=64, warps=8, stages=3),
    ("tgmm", None, None): Tiles(rows=64, cols=128, warps=4, stages=3),
    ("tgmm", 2880, 2880): Tiles(rows=32, cols=128, warps=4, stages=4),
    ("mxfp4", None, None): Tiles(rows=256, cols=64, depth=64, warps=8, stages=3),
    ("mxfp4", 2880, 2880): Tiles(rows=128, cols=64, depth=64, warps=4, stages=3),
    ("mxfp4_t", None, None): Tiles(rows=256, cols=64, depth=64, warps=8, stages=3),
    ("gmm_small", None, None): Tiles(rows=16, cols=64, depth=128, warps=4, stages=4),
    ("mxfp4_small", None, None): Tiles(
        rows=16, cols=64, depth=256, warps=4, stages=3, fill_programs=FILL_PROGRAMS
    ),
    ("mxfp4_small_wide", None, None): Tiles(rows=16, cols=128, depth=128, warps=4, stages=3),
}
SMALL_ROWS = 32
WIDE_GROUP_ROWS = 16
# The tallest row tile of a decode layout (groups aligned to the tile) whose packed forward product splits
# lhs into even and odd columns on chip; taller ones take the halves as two arrays that XLA makes, which
# their `wgmma` reads from shared memory. Halves would spare batch 256's 64-row tiles registers (four
# programs an SM instead of three) but cost XLA's split of each input, and measured slower at batches 128
# and 256 (`eval.bench.decode --moe 128,256 --split-rows 64,16`, docs/decode.md), so every decode tile
# splits on chip.
SPLIT_ROWS = 64


def launch_for(kind: str, K: int, N: int) -> Tiles:
    """The launch settings of kernel `kind` for a product contracting K values into N outputs (tgmm: the
    weight gradient [K, N])."""
    return LAUNCH.get((kind, K, N), LAUNCH[(kind, None, None)])


def choose_launch(kind: str, K: int, N: int, m: int, groups: int, rows: int | None = None) -> Tiles:
    """The launch of a product of `m` rows in `groups` groups: `LAUNCH`'s, its row tile fitted to the rows
    per group (`_fit_rows`) or set to `rows`, and the "_small" (or "_small_wide") settings where that tile
    is short or set (`rows`: groups aligned to it, a decode batch's layout, whose every tile decodes its
    expert's weights for few rows)."""
    tiles = launch_for(kind, K, N)
    tiles = _fit_rows(tiles, m, groups) if rows is None else dataclasses.replace(tiles, rows=rows)
    if (rows is None and tiles.rows > SMALL_ROWS) or (f"{kind}_small", None, None) not in LAUNCH:
        return tiles
    wide = _cdiv(m, groups) > WIDE_GROUP_ROWS and (f"{kind}_small_wide", None, None) in LAUNCH
    short = launch_for(f"{kind}_small_wide" if wide else f"{kind}_small", K, N)
    return dataclasses.replace(short, rows=tiles.rows)


def _fit_rows(tiles: Tiles, m: int, groups: int) -> Tiles:
    """Row tiles no taller than the rows an average group has (at least 16, Triton's smallest matrix
    operand): with few rows per group (batched decode) a tall tile would multiply mostly padding."""
    rows = max(16, pl.next_power_of_2(_cdiv(m, groups)))
    return dataclasses.replace(tiles, rows=rows) if rows < tiles.rows else tiles


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _iota(n: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _pad_rows(x: Array, rows: int) -> Array:
    pad = -x.shape[0] % rows
    return x if pad == 0 else jnp.pad(x, ((0, pad), (0, 0)))


# ---- which (group, row tile) pairs there are ---------------------------------------------------------------


class TileMap(NamedTuple):
    """Pair i covers row tile `tile[i]` for group `group[i]` (`group` G: rows past the groups, stored as
    zeros; G + 1: no pair, the program does nothing). Group g owns rows [start[g], end[g])."""

    group: Int[Array, " T"]
    tile: Int[Array, " T"]
    start: Int[Array, " G1"]
    end: Int[Array, " G1"]


def count_at_or_below(edges: Int[Array, " E"], values: Int[Array, " V"]) -> Int[Array, " V"]:
    """`searchsorted(edges, values, side="right")` for sorted `edges`, as a comparison count: jnp's
    searchsorted fails to trace inside shard_map on JAX 0.11 (the per-device MoE runs there)."""
    return (edges[None, :] <= values[:, None]).sum(axis=1, dtype=jnp.int32)


def tile_map(group_sizes: Int[Array, " G"], m: int, rows: int) -> TileMap:
    """The (group, row tile) pairs for `m` rows (a multiple of `rows`) in tiles of `rows`. A group of
    size 0 has no pair; each boundary inside a tile adds one, so there are at most m / rows + G pairs
    (the rows past the groups counting as group G)."""
    G = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(jnp.append(group_sizes.astype(jnp.int32), m)), m)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first = starts // rows
    count = jnp.where(ends > starts, (ends - 1) // rows - first + 1, 0)
    pair_end = jnp.cumsum(count)
    i = jnp.arange(m // rows + G, dtype=jnp.int32)
    group = count_at_or_below(pair_end, i)
    g = jnp.minimum(group, G)
    return TileMap(group, first[g] + i - (pair_end - count)[g], starts, ends)


def _whole(a) -> pl.BlockSpec:
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


class _Site(NamedTuple):
    """Where a program of the row-tile kernels works: its pair's group (`g`; `gc` clamped to a real group
    for reading weights), row slice, which of those rows are its group's, and its output columns."""

    g: Array
    gc: Array
    rows: pl.Slice
    mine: Array
    cols: pl.Slice
    col_ok: Array


def _site(map_refs, n_groups: int, tiles: Tiles, width: int, cols: int) -> _Site:
    """Program (n, i): pair i's row tile, output columns [n * cols, (n + 1) * cols) of `width`. `map_refs`:
    the `TileMap`, or only the group sizes for groups that start at multiples of the tile (pair i is tile
    i, and the program finds its group itself: no map to build in XLA, whose small kernels cost a decode
    step more than their bytes)."""
    n, i = pl.program_id(0), pl.program_id(1)
    if len(map_refs) == 1:
        first = i * tiles.rows
        g, start, end = _aligned_group(map_refs[0], n_groups, first)
    else:
        group_ref, tile_ref, start_ref, end_ref = map_refs
        g = group_ref[i]
        first = tile_ref[i] * tiles.rows
        last = jnp.minimum(g, n_groups)
        start, end = start_ref[last], end_ref[last]
    row_ids = first + _iota(tiles.rows)
    mine = (row_ids >= start) & (row_ids < end)
    col_ok = n * cols + _iota(cols) < width
    return _Site(
        g, jnp.minimum(g, n_groups - 1), pl.ds(first, tiles.rows), mine, pl.ds(n * cols, cols), col_ok
    )


def _aligned_group(sizes_ref, n_groups: int, first) -> tuple[Array, Array, Array]:
    """(group, its first row, its end) of the row tile starting at `first` when every group starts at a
    multiple of the tile (group `n_groups` past them, to the end of the rows). The sizes are read as one
    vector (`sizes_ref`'s block is `_sizes_block`) and their running sums taken on chip: a scalar load per
    group, one after the other, would put their memory latencies in series before every program's work."""
    ids = _iota(_sizes_block(n_groups))
    sizes = masked_load(sizes_ref, ids < n_groups)
    ends = jnp.sum(jnp.where(ids[None, :] <= ids[:, None], sizes[None, :], 0), axis=1)  # [g]: sizes <= g
    done = ends <= first  # groups ending at or before the tile (padding: only once every group is)
    g = jnp.sum((done & (ids < n_groups)).astype(jnp.int32))
    start = jnp.max(jnp.where(done, ends, 0))
    end = jnp.min(jnp.where(done, jnp.iinfo(jnp.int32).max, ends))
    return g, start, end


def _sizes_block(n_groups: int) -> int:
    """The group sizes' block: a power of two (a vector on chip), masked past the groups."""
    return pl.next_power_of_2(n_groups)


def _lhs_tile(lhs_ref, site: _Site, start, width: int, limit: int, ragged: bool) -> Array:
    """lhs's tile of the pair's rows and `width` columns from `start` (zero at and past column `limit` where
    `ragged`). An lhs of one row stands for every row (`grouped_product(..., broadcast=)`; any other lhs is
    padded to whole row tiles): its row, loaded once and repeated."""
    mask = (start + _iota(width) < limit)[None, :] if ragged else None
    if lhs_ref.shape[0] == 1:
        row = masked_load(lhs_ref.at[pl.ds(0, 1), pl.ds(start, width)], mask)
        return jnp.broadcast_to(row, (site.rows.size, width))
    return masked_load(lhs_ref.at[site.rows, pl.ds(start, width)], mask)


def _store_tile(out_refs, site: _Site, n_groups: int, compute):
    """The pair's group's rows of each output tile from `compute()` (one tile per ref), or zeros for the
    rows past the groups; nothing for an empty pair."""
    mask = site.mine[:, None] & site.col_ok[None, :]

    @pl.when(site.g < n_groups)
    def _():
        for ref, tile in zip(out_refs, compute(), strict=True):
            pl_triton.store(ref, tile.astype(ref.dtype), mask=mask)

    @pl.when(site.g == n_groups)
    def _():
        for ref in out_refs:
            pl_triton.store(ref, jnp.zeros(ref.shape, ref.dtype), mask=mask)


def _store_product(
    out_ref,
    bias_ref,
    site: _Site,
    step,
    steps: int,
    tiles: Tiles,
    n_groups: int,
    ragged: bool,
    glu: Glu | None,
    width: int,
):
    """The forward kernels' common end: `steps` of `step` summed over the contraction in float32, plus the
    group's bias, stored into the pair's tile (through `glu` into half as many columns, if given; `width`:
    the product's). With `tiles.splits` > 1, program (n, i, s) sums split s's share of the steps into
    out[s] (float32; the bias in split 0's)."""
    split = pl.program_id(2) if tiles.splits > 1 else 0
    share = _cdiv(steps, tiles.splits)

    def compute():
        zeros = jnp.zeros((tiles.rows, tiles.cols), jnp.float32)
        if tiles.splits == 1:  # static bounds
            acc = jax.lax.fori_loop(0, steps, step, zeros)
        else:
            acc = jax.lax.fori_loop(split * share, jnp.minimum(split * share + share, steps), step, zeros)
        if bias_ref is not None:
            bias = masked_load(bias_ref.at[site.gc, site.cols], site.col_ok if ragged else None)
            acc += jnp.where(split == 0, bias.astype(jnp.float32), 0.0)[None, :]
        return [acc if glu is None else glu(acc)]

    out_site = site
    if glu is not None:  # the tile's column pairs land in half as many output columns
        n, half = pl.program_id(0), tiles.cols // 2
        out_site = site._replace(cols=pl.ds(n * half, half), col_ok=n * half + _iota(half) < width // 2)
    tile = (split, out_site.rows, out_site.cols) if tiles.splits > 1 else (out_site.rows, out_site.cols)
    _store_tile([out_ref.at[tile]], out_site, n_groups, compute)


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32
    )


def _e2m1_asm(nibble: str, folded: bool) -> str:
    """PTX (sm_90) for `elementwise_inline_asm` with pack=4: $2 holds 4 packed bytes, $3 / $4 the bf16
    scales of bytes (0, 1) / (2, 3); out: the values of their "low" or "high" nibbles ($0: bytes 0-1, $1:
    bytes 2-3), bf16x2 each. (One call per nibble: Pallas lowers a single result per call.)

    A mask keeps the 4 bytes' low (or high) nibbles, and prmt spreads two bytes to the two halves of a
    word; one integer multiply by 2^a + 2^b adds two shifted copies of each nibble (disjoint bits, so no
    carries), whose sign bit lands on bf16's and whose 3 magnitude bits on its lowest 2 exponent bits and
    top mantissa bit, and a second mask keeps those: the code's value times 2^-126 (E2M1's 0.5 lands on
    bf16's subnormal 2^-127, which bf16x2 arithmetic keeps). bf16x2 multiplies apply 2^126 and the block's
    scale, both exact: two of them, or, `folded`, one by the scale times 2^126 (a bf16 only for exponents
    up to `mxfp4.FOLDABLE_EXPONENT`). Nine instructions per 4 values, folded."""
    # (nibble mask, multiplier): the sign bit (nibble bit 3) to bit 15, magnitude bits 0-2 to bits 6-8.
    mask, multiplier = {"low": (0x0F0F0F0F, (1 << 12) + (1 << 6)), "high": (0xF0F0F0F0, (1 << 8) + (1 << 2))}[
        nibble
    ]
    lines = ["{", ".reg .b32 z, n, w, a, bias;", "mov.b32 z, 0;", "mov.b32 bias, 0x7E807E80;"]
    lines.append(f"and.b32 n, $2, {mask:#010x};")
    for out, (select, scale) in enumerate(((0x4140, "$3"), (0x4342, "$4"))):
        lines += [
            f"prmt.b32 w, n, z, {select:#x};",  # bytes 2 out and 2 out + 1 at bits 0-7 and 16-23
            f"mul.lo.u32 a, w, {multiplier:#x};",
            "and.b32 a, a, 0x81C081C0;",
            *([] if folded else ["mul.rn.bf16x2 a, a, bias;"]),
            f"mul.rn.bf16x2 ${out}, a, {scale};",
        ]
    return "\n".join([*lines, "}"])


E2M1_ASM = {
    (nibble, folded): _e2m1_asm(nibble, folded) for nibble in ("low", "high") for folded in (False, True)
}


def _decode(packed: Array, exponents: Array, dtype, interpret: bool, foldable=None) -> tuple[Array, Array]:
    """A packed tile [r, c / 2] bytes with its scale exponents [r, c / 32] -> (low, high) nibbles as
    values [r, c / 2] each in `dtype`: the tile's even and odd columns, exact.

    Compiled for bfloat16, the bytes decode in inline PTX (`E2M1_ASM`), with one multiply per pair of
    values less where `foldable` (the flag `mxfp4.pad_scales` leaves in the padding: every exponent of the
    tensor at most `mxfp4.FOLDABLE_EXPONENT`; None: no flag); interpreted (and for other dtypes) by jnp
    arithmetic on the codes (`mxfp4.e2m1`), which gives the same values."""
    r, half = packed.shape
    expand = lambda a: jnp.broadcast_to(a[:, :, None], (r, half // (BLOCK // 2), BLOCK // 2)).reshape(r, half)
    exponents = exponents.astype(jnp.int32)
    if interpret or dtype != jnp.bfloat16:
        scale = expand(mx_scale(exponents))
        codes = packed.astype(jnp.int32)
        return (e2m1(codes & 0xF) * scale).astype(dtype), (e2m1(codes >> 4) * scale).astype(dtype)

    def decode(folded: bool):
        # Folded: 2^(e - 1), the scale times 2^126 (exponent 0 too: 2^-127 times 2^126); else 2^(e - 127).
        bits = (exponents + 126) << 7 if folded else jnp.where(exponents > 0, exponents << 7, 0x40)
        scale = expand(jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16))
        result = jax.ShapeDtypeStruct(packed.shape, jnp.bfloat16)
        nibble = lambda name: pl_triton.elementwise_inline_asm(
            E2M1_ASM[name, folded],
            args=[packed, scale],
            constraints="=r,=r,r,r,r",
            pack=4,
            result_shape_dtypes=[result],
        )[0]
        return nibble("low"), nibble("high")

    if foldable is None:
        return decode(False)
    return jax.lax.cond(foldable, lambda: decode(True), lambda: decode(False))


# ---- the kernels -------------------------------------------------------------------------------------------


def _gmm_kernel(
    *refs,
    tiles: Tiles,
    n_groups: int,
    n_map: int,
    transpose_rhs: bool,
    K: int,
    N: int,
    has_bias: bool,
    glu: Glu | None,
):
    """out[tile rows, cols] = lhs[rows] @ rhs[g] (+ bias[g]); rhs [G, K, N], or [G, N, K] when
    `transpose_rhs` (d(lhs): the forward's weights read transposed)."""
    map_refs, (lhs_ref, rhs_ref, *rest) = refs[:n_map], refs[n_map:]
    bias_ref, out_ref = rest if has_bias else (None, rest[0])
    site = _site(map_refs, n_groups, tiles, N, tiles.cols)
    ragged_n, ragged_k = N % tiles.cols != 0, K % tiles.depth != 0

    def step(kk, acc):
        depth = pl.ds(kk * tiles.depth, tiles.depth)
        k_ok = kk * tiles.depth + _iota(tiles.depth) < K
        x = _lhs_tile(lhs_ref, site, kk * tiles.depth, tiles.depth, K, ragged_k)
        if transpose_rhs:
            mask = site.col_ok[:, None] & k_ok[None, :] if ragged_n or ragged_k else None
            return acc + _dot(
                x, masked_load(rhs_ref.at[site.gc, site.cols, depth], mask).astype(x.dtype), (1, 1)
            )
        mask = k_ok[:, None] & site.col_ok[None, :] if ragged_n or ragged_k else None
        return acc + _dot(x, masked_load(rhs_ref.at[site.gc, depth, site.cols], mask).astype(x.dtype), (1, 0))

    _store_product(out_ref, bias_ref, site, step, _cdiv(K, tiles.depth), tiles, n_groups, ragged_n, glu, N)


def _mxfp4_kernel(
    *refs,
    tiles: Tiles,
    n_groups: int,
    n_map: int,
    K: int,
    N: int,
    has_bias: bool,
    interpret: bool,
    glu: Glu | None,
):
    """out[tile rows, cols] = lhs[rows] @ W[g]^T (+ bias[g]), W[g] [N, K] packed, blocks as [G, N, K / 2]
    bytes. The low and high nibbles multiply lhs's even and odd columns: short row tiles (decode,
    `_splits_lhs_on_chip`) take lhs [M, K] and split each step's tile on chip (a reshape to pairs), which
    spares a decode step the kernel that splits it; taller ones take the two halves [M, K / 2] as arrays,
    which their tensor-core operands read straight from shared memory."""
    inputs, (*bias_refs, out_ref) = refs[: -1 - has_bias], refs[-1 - has_bias :]
    map_refs, (*lhs_refs, blocks_ref, scales_ref) = inputs[:n_map], inputs[n_map:]
    bias_ref = bias_refs[0] if has_bias else None
    site = _site(map_refs, n_groups, tiles, N, tiles.cols)
    half, groups = tiles.depth // 2, tiles.depth // BLOCK
    ragged = N % tiles.cols != 0 or K % tiles.depth != 0
    # Scale rows padded by `mxfp4.pad_scales` carry its flag in their first pad byte.
    foldable = scales_ref[0, 0, K // BLOCK] != 0 if scales_ref.shape[-1] > K // BLOCK else None

    def step(kk, acc):
        byte_ok = kk * half + _iota(half) < K // 2
        # To the scales' stored width: exponents past K / 32 (rows padded by `mxfp4.pad_scales`) belong
        # to masked-out bytes, and a mask constant over aligned runs lets the load be one vector.
        group_ok = kk * groups + _iota(groups) < scales_ref.shape[-1]
        mask = lambda ok: site.col_ok[:, None] & ok[None, :] if ragged else None
        packed = masked_load(blocks_ref.at[site.gc, site.cols, pl.ds(kk * half, half)], mask(byte_ok))
        exponents = masked_load(scales_ref.at[site.gc, site.cols, pl.ds(kk * groups, groups)], mask(group_ok))
        low, high = _decode(packed, exponents, lhs_refs[0].dtype, interpret, foldable)
        if len(lhs_refs) == 1:
            x = _lhs_tile(lhs_refs[0], site, kk * tiles.depth, tiles.depth, K, ragged)
            pairs = jnp.split(x.reshape(tiles.rows, half, 2), 2, axis=2)
            x_even, x_odd = (a.reshape(tiles.rows, half) for a in pairs)
        else:
            at, x_mask = pl.ds(kk * half, half), byte_ok[None, :] if ragged else None
            x_even, x_odd = (masked_load(ref.at[site.rows, at], x_mask) for ref in lhs_refs)
        return acc + _dot(x_even, low, (1, 1)) + _dot(x_odd, high, (1, 1))

    _store_product(out_ref, bias_ref, site, step, _cdiv(K, tiles.depth), tiles, n_groups, ragged, glu, N)


def _splits_lhs_on_chip(tiles: Tiles, aligned: bool) -> bool:
    """Whether the packed forward kernel splits lhs into even and odd columns itself: for short row tiles
    and decode layouts (`aligned`) in tiles of up to `SPLIT_ROWS`, whose steps are bound by the weights'
    bytes, not by the tensor cores (see `_mxfp4_kernel`)."""
    return tiles.rows <= (SPLIT_ROWS if aligned else SMALL_ROWS)


def _mxfp4_t_kernel(*refs, tiles: Tiles, n_groups: int, n_map: int, K: int, N: int, interpret: bool):
    """d(lhs) of the packed product: out[tile rows, cols] = dout[rows] @ W[g] over W's N rows, written as
    its even and odd columns (two outputs [M, K / 2]); `cols` counts values (cols / 2 bytes)."""
    map_refs, (dout_ref, blocks_ref, scales_ref, even_ref, odd_ref) = refs[:n_map], refs[n_map:]
    half, groups = tiles.cols // 2, tiles.cols // BLOCK
    site = _site(map_refs, n_groups, tiles, K // 2, half)  # columns in bytes: one of each output's
    kb = pl.program_id(0)
    group_ok = kb * groups + _iota(groups) < K // BLOCK
    ragged = N % tiles.depth != 0 or K % tiles.cols != 0

    def step(c, accs):
        n_ok = c * tiles.depth + _iota(tiles.depth) < N
        w_rows = pl.ds(c * tiles.depth, tiles.depth)
        mask = lambda ok: n_ok[:, None] & ok[None, :] if ragged else None
        packed = masked_load(blocks_ref.at[site.gc, w_rows, site.cols], mask(site.col_ok))
        exponents = masked_load(scales_ref.at[site.gc, w_rows, pl.ds(kb * groups, groups)], mask(group_ok))
        low, high = _decode(packed, exponents, dout_ref.dtype, interpret)
        d = masked_load(dout_ref.at[site.rows, w_rows], n_ok[None, :] if ragged else None)
        return accs[0] + _dot(d, low, (1, 0)), accs[1] + _dot(d, high, (1, 0))

    zeros = jnp.zeros((tiles.rows, half), jnp.float32)
    compute = lambda: jax.lax.fori_loop(0, _cdiv(N, tiles.depth), step, (zeros, zeros))
    _store_tile(
        [even_ref.at[site.rows, site.cols], odd_ref.at[site.rows, site.cols]], site, n_groups, compute
    )


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, tiles: Tiles, K: int, N: int):
    """out[g, k cols, n cols] = lhs[group g's rows, k cols]^T @ dout[same rows, n cols], stepping over the
    group's row tiles (`rows` at a time; the rows of neighbouring groups masked to zero)."""
    n, kb, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[g], end_ref[g]
    k_cols, n_cols = pl.ds(kb * tiles.cols, tiles.cols), pl.ds(n * tiles.cols, tiles.cols)
    k_ok = kb * tiles.cols + _iota(tiles.cols) < K
    n_ok = n * tiles.cols + _iota(tiles.cols) < N

    def step(t, acc):
        row_ids = t * tiles.rows + _iota(tiles.rows)
        mine = ((row_ids >= start) & (row_ids < end))[:, None]
        x = masked_load(lhs_ref.at[pl.ds(t * tiles.rows, tiles.rows), k_cols], mine & k_ok[None, :])
        d = masked_load(dout_ref.at[pl.ds(t * tiles.rows, tiles.rows), n_cols], mine & n_ok[None, :])
        return acc + _dot(x, d, (0, 0))

    last = jnp.where(end > start, (end + tiles.rows - 1) // tiles.rows, start // tiles.rows)
    acc = jax.lax.fori_loop(start // tiles.rows, last, step, jnp.zeros((tiles.cols, tiles.cols), jnp.float32))
    pl_triton.store(
        out_ref.at[g, k_cols, n_cols], acc.astype(out_ref.dtype), mask=k_ok[:, None] & n_ok[None, :]
    )


# ---- launches ----------------------------------------------------------------------------------------------


def _launch(kernel, grid, args, out_shape, tiles: Tiles, interpret: bool, sizes_first: bool = False):
    """`kernel` over `grid` with every array whole; `sizes_first`: args[0] is the group sizes the
    programs read for their group (`_aligned_group`), as a power-of-two block."""
    specs = [_whole(a) for a in args]
    if sizes_first:
        specs[0] = pl.BlockSpec((_sizes_block(args[0].shape[0]),), lambda *_: (0,))
    call = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=jax.tree.map(_whole, out_shape),
        out_shape=out_shape,
        compiler_params=triton_launch(tiles.warps, tiles.stages, interpret),
        interpret=interpret,
    )
    with jax.named_scope(kernel.func.__name__.strip("_")):  # gmm_kernel, tgmm_kernel, ... in profiles
        return call(*args)


def _forward(
    kernel, args, rows: int, width: int, dtype, n_pairs: int, tiles: Tiles, interpret: bool, aligned, glu,
    partials: bool = False,
):  # fmt: skip
    """A forward product's launch: grid (blocks of its `width` columns, pairs[, splits]) into [rows, width]
    in `dtype` (width / 2 through `glu`, which an unsplit kernel applies itself); split contractions land
    as float32 partial sums, added here (then `glu`), or (`partials`) returned as they are, [splits, rows,
    width] ([1, rows, width] in `dtype` unsplit)."""
    blocks = _cdiv(width, tiles.cols)
    if tiles.splits == 1:
        out = jax.ShapeDtypeStruct((rows, width if glu is None else width // 2), dtype)
        product = _launch(
            functools.partial(kernel, glu=glu), (blocks, n_pairs), args, out, tiles, interpret, aligned
        )
        return product[None] if partials else product
    out = jax.ShapeDtypeStruct((tiles.splits, rows, width), jnp.float32)
    grid, unfused = (blocks, n_pairs, tiles.splits), functools.partial(kernel, glu=None)
    product = _launch(unfused, grid, args, out, tiles, interpret, aligned)
    if partials:
        return product
    total = product.sum(axis=0)
    return (total if glu is None else glu(total)).astype(dtype)


def grouped_product(
    lhs: Float[Array, "M K"],
    rhs: Weights,
    group_sizes: Int[Array, " G"],
    bias: Float[Array, "G N"] | None = None,
    transpose_rhs: bool = False,
    interpret: bool | None = None,
    launch: Tiles | None = None,
    rows: int | None = None,
    glu: Glu | None = None,
    partials: bool = False,
    broadcast: int | None = None,
) -> Float[Array, "M N"] | Float[Array, "S M N"]:
    """lhs @ rhs[g] per group (rhs[g]^T when `transpose_rhs`) in lhs's dtype, float32 sums; forward only
    (`gmm` is the differentiable one). `launch` overrides `LAUNCH`; `rows` only its row tile, for groups
    that start at multiples of it; `glu` applied to the float32 sums (N / 2 outputs). `partials` (a
    forward product without `glu`): the S contraction splits' float32 sums [S, M', N] (M' >= M rows,
    padded to the row tile) left for the caller to add (S = 1: [1, M', N] in lhs's dtype). `broadcast`:
    lhs is one row [1, K] standing for M = `broadcast` rows (a forward product of an aligned layout that
    splits lhs on chip: one token's decode layout, whose every row, padding included, may be its row),
    which the kernel loads as one row, so no copy of the rows is made."""
    interpret, M = _interpret(interpret), lhs.shape[0] if broadcast is None else broadcast
    packed = isinstance(rhs, Mxfp4)
    kind = ("mxfp4" if packed else "gmm") + ("_t" if transpose_rhs else "")
    if broadcast is not None and (lhs.shape[0] != 1 or rows is None or transpose_rhs):
        raise ValueError(
            f"{kind}: broadcast takes lhs of one row (not {lhs.shape[0]}) into a forward product of a layout "
            "aligned to `rows`"
        )
    if packed:
        shape = rhs.blocks.shape[1], rhs.blocks.shape[2] * BLOCK  # [N, K] of W[g]
        contract, width = shape[::-1] if not transpose_rhs else shape
    else:
        contract, width = rhs.shape[1:] if not transpose_rhs else rhs.shape[:0:-1]
    tiles = launch or choose_launch(kind, contract, width, M, group_sizes.shape[0], rows)
    height = _cdiv(M, tiles.rows) * tiles.rows  # the product's rows, padded to the row tile
    x = lhs if broadcast is not None else _pad_rows(lhs, tiles.rows)
    lead = (x,)
    if rows is None:
        tm = tile_map(group_sizes, height, tiles.rows)
        n_pairs = tm.group.shape[0]
    else:  # groups at multiples of the tile: program i takes tile i and finds its group from the sizes
        tm, n_pairs = (group_sizes,), height // tiles.rows
    n_groups, n_map, aligned = group_sizes.shape[0], len(tm), rows is not None
    programs, steps = _cdiv(width, tiles.cols) * n_pairs, _cdiv(contract, tiles.depth)
    if tiles.splits == 1 and not transpose_rhs and steps > 1 and programs < (tiles.fill_programs or 0):
        tiles = dataclasses.replace(tiles, splits=2)
    if tiles.splits > 1 and transpose_rhs:
        raise ValueError(f"{kind} launch {tiles}: only forward products split the contraction")
    if partials and (glu is not None or transpose_rhs):
        raise ValueError(f"{kind}: only a forward product without glu returns its partial sums")
    if glu is not None and (transpose_rhs or width % 2 or tiles.cols % 2):
        raise ValueError(
            f"{kind} launch {tiles}, {width} outputs: glu needs a forward product with an even output width "
            "and column tile"
        )
    bias_args = [bias] if bias is not None else []
    if packed:
        if (tiles.cols if transpose_rhs else tiles.depth) % BLOCK:
            raise ValueError(
                f"{kind} launch {tiles}: the packed dimension's tile must be a multiple of {BLOCK}"
            )
        G, N_w, Kg, _ = rhs.blocks.shape
        blocks = rhs.blocks.reshape(G, N_w, Kg * BLOCK // 2)
        if transpose_rhs:  # dout [M, N_w] @ W[g] [N_w, K] -> [M, K] as even and odd columns
            K = Kg * BLOCK
            half = jax.ShapeDtypeStruct((height, K // 2), x.dtype)
            kernel = functools.partial(
                _mxfp4_t_kernel, tiles=tiles, n_groups=n_groups, n_map=n_map, K=K, N=N_w, interpret=interpret
            )
            grid = (_cdiv(K, tiles.cols), n_pairs)
            even, odd = _launch(
                kernel, grid, (*tm, x, blocks, rhs.scales), (half, half), tiles, interpret, aligned
            )
            out = jnp.stack([even, odd], axis=-1).reshape(height, K)
        else:  # lhs [M, K] @ W[g]^T -> [M, N_w]
            K, N = x.shape[1], N_w
            if not _splits_lhs_on_chip(tiles, aligned):
                if broadcast is not None:
                    raise ValueError(
                        f"{kind} launch {tiles}: broadcast needs a row tile that splits lhs on chip"
                    )
                pairs = x.reshape(height, K // 2, 2)
                lead = (pairs[..., 0], pairs[..., 1])
            kernel = functools.partial(
                _mxfp4_kernel, tiles=tiles, n_groups=n_groups, n_map=n_map, K=K, N=N,
                has_bias=bias is not None, interpret=interpret,
            )  # fmt: skip
            args = (*tm, *lead, blocks, rhs.scales, *bias_args)
            out = _forward(
                kernel, args, height, N, x.dtype, n_pairs, tiles, interpret, aligned, glu, partials
            )
    else:
        K, N = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape[1:]
        kernel = functools.partial(
            _gmm_kernel, tiles=tiles, n_groups=n_groups, n_map=n_map,
            transpose_rhs=transpose_rhs, K=K, N=N, has_bias=bias is not None,
        )  # fmt: skip
        args = (*tm, *lead, rhs, *bias_args)
        out = _forward(kernel, args, height, N, x.dtype, n_pairs, tiles, interpret, aligned, glu, partials)
    return out if partials else out[:M]


def tgmm(
    lhs: Float[Array, "M K"],
    dout: Float[Array, "M N"],
    group_sizes: Int[Array, " G"],
    dtype,
    interpret: bool | None = None,
    launch: Tiles | None = None,
) -> Float[Array, "G K N"]:
    """Per group g, lhs[g's rows]^T @ dout[g's rows] (the weight gradient of `gmm`), float32 sums; a group
    with no rows gets zeros."""
    interpret = _interpret(interpret)
    tiles = launch or launch_for("tgmm", lhs.shape[1], dout.shape[1])
    x, d = _pad_rows(lhs, tiles.rows), _pad_rows(dout, tiles.rows)
    G, (K, N) = group_sizes.shape[0], (lhs.shape[1], dout.shape[1])
    tm = tile_map(group_sizes, x.shape[0], tiles.rows)
    kernel = functools.partial(_tgmm_kernel, tiles=tiles, K=K, N=N)
    grid = (_cdiv(N, tiles.cols), _cdiv(K, tiles.cols), G)
    shape = jax.ShapeDtypeStruct((G, K, N), dtype)
    return _launch(kernel, grid, (tm.start, tm.end, x, d), shape, tiles, interpret)


def _row_groups(group_sizes: Int[Array, " G"], m: int) -> Int[Array, " M"]:
    """Each row's group (G for rows past the groups)."""
    return count_at_or_below(jnp.cumsum(group_sizes), jnp.arange(m, dtype=jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm(lhs, rhs, group_sizes, bias, interpret, rows, glu):
    return grouped_product(lhs, rhs, group_sizes, bias, False, interpret, rows=rows, glu=glu)


def _gmm_fwd(lhs, rhs, group_sizes, bias, interpret, rows, glu):
    return _gmm(lhs, rhs, group_sizes, bias, interpret, rows, glu), (lhs, rhs, group_sizes, bias)


def _gmm_bwd(interpret, rows, glu, residuals, dout):
    lhs, rhs, group_sizes, bias = residuals
    if glu is not None:  # through the activation, from the product recomputed without it
        product = grouped_product(lhs, rhs, group_sizes, bias, False, interpret, rows=rows)
        dout = jax.vjp(lambda p: glu(p.astype(jnp.float32)).astype(dout.dtype), product)[1](dout)[0]
    d_lhs = grouped_product(dout, rhs, group_sizes, None, True, interpret, rows=rows)
    if isinstance(rhs, Mxfp4):  # packed weights are not trainable
        d_rhs = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), rhs)
    else:
        d_rhs = tgmm(lhs, dout, group_sizes, rhs.dtype, interpret)
    d_bias = None
    if bias is not None:
        # Each group's rows summed as a product with the rows' one-hot groups (rows past the groups match
        # none), not segment_sum: its scatter-add is what XLA's deterministic mode sorts element by element.
        member = jax.nn.one_hot(_row_groups(group_sizes, dout.shape[0]), bias.shape[0], dtype=dout.dtype)
        d_bias = jnp.dot(member.T, dout, precision="highest", preferred_element_type=jnp.float32)
        d_bias = d_bias.astype(bias.dtype)
    return d_lhs, d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0), d_bias


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: Float[Array, "M K"],
    rhs: Weights,
    group_sizes: Int[Array, " G"],
    bias: Float[Array, "G N"] | None = None,
    interpret: bool | None = None,
    rows: int | None = None,
    glu: Glu | None = None,
) -> Float[Array, "M N"]:
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes) + bias[group of each row]` on the Pallas kernels, in
    lhs's dtype with float32 sums, differentiable in lhs, dense rhs and bias. MXFP4 rhs (W[g] [N, K]
    packed) multiplies as its dequantized transpose. `interpret` defaults to the CPU interpreter off
    the GPU. `rows`: the row tile, for groups that start at multiples of it (no tile then mixes groups, so
    each group's weights are read once per tile of its rows); None fits one to the rows per group. `glu`:
    the product's columns go through it on chip, from the float32 sums (N / 2 outputs; the gradient
    recomputes the product)."""
    K = lhs.shape[1]
    rhs_k = rhs.blocks.shape[2] * BLOCK if isinstance(rhs, Mxfp4) else rhs.shape[1]
    if rhs_k != K:
        raise ValueError(f"gmm: lhs {lhs.shape} has {K} columns, the weights contract over {rhs_k}")
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), bias, _interpret(interpret), rows, glu)
