"""Decompressed-MLA flash-decoding in Pallas Mosaic GPU: `decompressed_splits` of `flash_decode` (same
arguments, same per-slice (acc, m, l)), written for Hopper's warpgroup tensor cores instead of Triton.

Program (b, j, g) serves sequence b, slice j of the cache slots and the group g of P kv heads
(`flash_decode.kv_heads_per_program`). Per block of `block` slots (only the blocks up to the sequence's
length, as `flash_decode._walk`), its latent and rotary rows loaded by TMA:
- keys `c W_bk + b_k` [block, 2P x half] by one wgmma from SMEM (n = 2P x half, so that the latent block
  is read from SMEM once, not once a piece), cut in registers into 2P pieces [block, half], one per kv head
  and rotary half; each head's pair rotated in float32 by the slots' cos / sin [block, half], one table
  for all P heads (the caller's [Bc, S, half], one TMA copy each per block, nothing tiled across the
  heads), rounded to the cache dtype and stored in SMEM, a [block, half] buffer per piece;
- scores: the sum over the 2P pieces of query piece [64, half] (the piece's kv head's columns of the
  block-diagonal queries: its R real rows, the rest zeros) times the piece's keys transposed (wgmma reads
  the buffer through a transposed view, as JAX's Mosaic GPU attention reads K), in one accumulator;
- the online softmax of `flash_decode._online_step` with its masks (ring buffer and window included; a
  cache with neither masks only the slice's last block, the others' slots all below the length); p
  rounded to the cache dtype; acc = acc * alpha + p c by one wgmma that takes p from registers and
  accumulates into the scaled acc (the values are the latent), so no second accumulator and no p in SMEM.
Each step waits for its wgmmas, so a warpgroup's tensor cores idle while it rotates keys or takes the
softmax. `launch.warps` picks how a program runs the slice's blocks:
- 4: one warpgroup does all, the next block's latent loading into the other of two SMEM buffers while it
  computes, the tables two blocks ahead;
- 8: two warpgroups with roles (as FlashMLA's), so that one's RoPE overlaps the other's products and
  softmax and each holds half the registers: warpgroup 0 makes each block's keys (rebuild, RoPE, store)
  into one of two key sets, warpgroup 1 scores them, takes the softmax and p c, issues the loads (a
  block's tables once its keys are ready, the latent of three blocks on once its p c is done: the latent
  sits in a ring of three buffers) and writes the slice's state; a key set is reused once warpgroup 1's
  scores have read it; barriers pass each hand-off (keys ready, keys freed). The outputs equal those at
  4 warps. (A third warpgroup making the keys of alternate blocks measured slower: docs/decode.md.)
Where the FLOPs go, per block of 64 slots at gpt-oss-20b's shape (r = 192, P = 2, half = 32): the key
rebuild 4 x 2 x 64 x 192 x 32 = 3.1 MFLOP, the scores 4 x 2 x 64 x 32 x 64 = 1.0 MFLOP (an eighth on
nonzero query entries), p c 2 x 64 x 64 x 192 = 1.6 MFLOP: the rebuild dominates, against 24 KB of latent
and 16 KB of cos / sin read (per slot 384 and 256 bytes).
SMEM per program there (`block` = 64), as Mosaic GPU counts it (each buffer aligned to 1 KB, 2 KB of
reduction scratch, 8 bytes a barrier), against 227 KB a block (228 KB an SM) on an H100 / H200, so one
program per SM either way:
- 4 warps: queries 16 KB, W_bk 48 KB, bias 1 KB, latent 2 x 24 KB, cos / sin 2 x 2 x 8 KB, keys 16 KB:
  166,952 bytes;
- 8 warps: the same but the latent 3 x 24 KB and the keys 2 x 16 KB: 207,952 bytes.
The write of acc (48 KB) reuses the walk's buffers.

Every SMEM operand has the widest swizzle its rows hold whole and that of the other operand of its
products (wgmma requires a product's two to match): the query pieces and keys, rows of half = 32 bf16,
64 bytes; the latent and W_bk, 128 bytes. A wgmma reads its SMEM operands for every instruction, so the
rebuild as one product of n = 2P x half reads 24 KB of latent and 48 KB of W_bk a block, where four
products of n = half would read the latent four times (144 KB).
Four operations need a different spelling when lowered for CUDA and when run by the Mosaic GPU
interpreter, because no one spelling does both on JAX 0.10 (`Spelling`): the keys' transposed operand
(the interpreter rejects a transposed view, so it stores the keys transposed, [half, block], by `x.T`,
which does not lower, and reads them plain), p c (the interpreter runs no register operand and no
`run_state`, so it takes p through an SMEM buffer of its own and adds a second accumulator), the slot iota
of the masks and the load of a vector along a wgmma result's columns (the key bias): lowering needs their
layouts given, which the interpreter cannot translate, and a plain load of the floats does not lower.
The interpreter runs when `launch.interpret`; the caches must be 16-bit (bf16 or f16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.flash_decode import (
    NEG,
    Launch,
    _block_diagonal,
    _check_split,
    key_groups,
    kv_heads_per_program,
    slice_blocks,
    visible_slots,
)

ROWS = 64  # a wgmma's M: the query rows (P x R real) and the slots of a block are padded / tiled to it
CONSUMERS = {4: 1, 8: 2}  # `Launch.warps` -> the warpgroups of a program
# warpgroups -> buffers of the latent (each with its arrival barrier), of cos / sin and sets of keys (see
# the module docstring)
RINGS = {1: (2, 2, 1), 2: (3, 2, 2)}
THREADS = "wg"  # the warpgroup axis of a program of several


# exp as a scaled exp2 (Triton's kernels take exp likewise), not the exact expf; `mosaic_profile` adds the
# in-kernel profiler, which times the block loop's named scopes
COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True)
SMEM_BYTES = 232_448  # the shared memory a program may take on an H100 / H200 (227 KB)


def smem_bytes(r: int, half: int, P: int, R: int, block: int, consumers: int) -> int:
    """A program's shared memory as Mosaic GPU counts it (each buffer aligned to 1 KB, 2 KB of reduction
    scratch, 8 bytes a barrier), for a latent of r, P kv heads of R query heads and rotary halves of
    `half`, blocks of `block` slots and `consumers` warpgroups: the buffers of `_kernel`'s walk, which
    outweigh those of its write."""
    aligned = lambda n: -(-n // 1024) * 1024
    pieces, M = 2 * P, -(-(P * R) // ROWS) * ROWS
    latents, tables, key_sets = RINGS[consumers]
    sizes = [
        pieces * M * half * 2, pieces * r * half * 2, pieces * half * 4,  # queries, W_bk, bias
        latents * block * r * 2, tables * block * half * 4, tables * block * half * 4,  # latent, cos, sin
        key_sets * pieces * half * block * 2,  # keys
    ]  # fmt: skip
    # ready; latent and rotary arrivals; with two warpgroups, keys ready and keys freed
    barriers = 1 + latents + tables + (consumers > 1) * 2 * key_sets
    return sum(map(aligned, sizes)) + 2048 + 8 * barriers


def refusal(q_shape: tuple[int, ...], dtype, r: int, launch: Launch) -> str | None:
    """Why this kernel does not run queries of `q_shape` [B, G, R, d] over a latent cache of `dtype` and
    width r at `launch`, with what to change (None: it runs them): a 16-bit cache, blocks of whole wgmma
    rows, 4 or 8 warps, operands whose rows hold a whole swizzle, and a program within SMEM_BYTES."""
    _, G, R, d = q_shape
    block, warps = launch.block, launch.warps
    if jnp.dtype(dtype).itemsize != 2:
        return (
            f"the Mosaic GPU decompressed-MLA kernel needs a 16-bit cache (bf16, f16), not {jnp.dtype(dtype)}"
        )
    if block % ROWS:
        return f"block {block}: the Mosaic GPU kernel reads blocks of a multiple of {ROWS} slots"
    if warps not in CONSUMERS:
        return f"warps {warps}: the Mosaic GPU kernel runs 4 (one warpgroup a program) or 8 (two)"
    P = kv_heads_per_program(G, R, launch.head_block)
    try:
        _swizzles(r, d // 2, P, block)
    except ValueError as e:
        return f"head dim {d}, latent width {r}: {e} (a head dim of a multiple of 32 and a width of 16 fit)"
    if (smem := smem_bytes(r, d // 2, P, R, block, CONSUMERS[warps])) > SMEM_BYTES:
        return (
            f"block {block}, warps {warps}, {P} kv heads a program: {smem:,} bytes of shared memory, more "
            f"than a program's {SMEM_BYTES:,} (shorter blocks, 4 warps or fewer kv heads fit)"
        )
    return None


def runs(q_shape: tuple[int, ...], dtype, r: int, launch: Launch) -> bool:
    """Whether this kernel runs queries of `q_shape` over a latent cache of `dtype` and width r at
    `launch` (`refusal`)."""
    return refusal(q_shape, dtype, r, launch) is None


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


class Spelling(NamedTuple):
    """The operations that the CUDA lowering and the Mosaic GPU interpreter each spell their own way (the
    module docstring says why), as the kernel uses them."""

    keys_shape: Callable  # (half, block) -> a key piece's SMEM buffer: [block, half], or [half, block]
    store_keys: Callable  # (ref, keys [block, half]) stores a piece's keys into its buffer
    key_operand: Callable  # ref -> the piece's keys as a wgmma's B operand [half, block]
    add_products: Callable  # (acc, p, c_ref, p_s) -> acc + p @ c by wgmma, p from registers or through p_s
    iota: Callable  # (shape, dim) -> an int32 iota along dim, laid out as a wgmma result
    columns: Callable  # ref -> a row vector laid out along the columns of a wgmma result


def spellings(interpret: bool) -> Spelling:
    """`Spelling` for the interpreter or the CUDA lowering."""
    if interpret:

        def keys_transposed(ref, x):
            ref[...] = x.T

        def add_products(acc, p, c_ref, p_s):
            p_s[...] = p
            plgpu.commit_smem()
            return acc + _summed([(p_s, c_ref)], acc.shape)

        return Spelling(
            keys_shape=lambda half, block: (half, block),
            store_keys=keys_transposed,
            key_operand=lambda ref: ref,
            add_products=add_products,
            iota=lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim),
            columns=lambda ref: ref[...],
        )

    def keys_plain(ref, x):
        ref[...] = x

    def add_products(acc, p, c_ref, p_s):
        def run(acc_ref):
            plgpu.wgmma(acc_ref, p, c_ref)
            plgpu.wgmma_wait(0)

        return pl.run_state(run)(plgpu.ACC.init(acc))

    return Spelling(
        keys_shape=lambda half, block: (block, half),
        store_keys=keys_plain,
        key_operand=lambda ref: ref.transpose((1, 0)),
        add_products=add_products,
        iota=lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA),
        columns=lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0)),
    )


def _summed(pairs, shape):
    """sum(a @ b for a, b in pairs) in one float32 accumulator, by wgmma."""

    def run(acc):
        for a_s, b_s in pairs:
            plgpu.wgmma(acc, a_s, b_s)
        plgpu.wgmma_wait(0)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _swizzle(*minor_bytes: int) -> int:
    """The widest swizzle (bytes) that every SMEM operand's rows hold whole."""
    swizzle = next((s for s in (128, 64, 32) if all(b % s == 0 for b in minor_bytes)), None)
    if swizzle is None:
        raise ValueError(f"rows of {minor_bytes} bytes: wgmma operands need rows of a multiple of 32 bytes")
    return swizzle


def _swizzles(r: int, half: int, P: int, block: int) -> tuple[int, int]:
    """The swizzles of the scores' operands (query pieces' rows of half, keys' of block) and of the
    latent's products' (the latent's rows of r, W_bk's of 2P half, and the interpreter's p's of block),
    in bf16 / f16."""
    return _swizzle(2 * half, 2 * block), _swizzle(2 * r, 4 * P * half, 2 * block)


def swizzled(dtype, swizzle: int) -> tuple:
    """The SMEM transforms of a wgmma operand of `dtype` whose rows hold `swizzle` bytes whole."""
    bits = jnp.dtype(dtype).itemsize * 8
    return (plgpu.TilingTransform((8, 8 * swizzle // bits)), plgpu.SwizzleTransform(swizzle))


def _kernel(len_g, q_g, w_g, b_g, c_g, cos_g, sin_g, acc_g, m_g, l_g,
            *, block: int, split: int, slots: int, window, sliding: bool, per_sequence: bool,
            interpret: bool, swizzles: tuple[int, int], consumers: int):  # fmt: skip
    """Program (b, j, g): see the module docstring. The 2P pieces i = h P + p (rotary half h, kv head p):
    q_g [B, Gp, 2P, M, half] (piece i: the columns of kv head p of half h's block-diagonal queries),
    w_g [Gp, r, 2P x half], b_g [Gp, 2P x half] (`grouped_key_up`'s layout: piece i its columns
    [i half, (i + 1) half)), cos_g / sin_g [Bc, S, half] (one row of frequencies a slot,
    shared by the P heads), acc_g [B, Gp, J, P x R, r], m_g / l_g [B, Gp, J, M]. `consumers` warpgroups:
    1 does all, of 2 the first makes the keys and the second attends. `swizzles`: of the scores' operands
    (query pieces, keys) and of the latent's products' (latent, W_bk, p)."""
    spelling = spellings(interpret)
    b, j, g = lax.axis_index("b"), lax.axis_index("j"), lax.axis_index("g")
    bc = b if per_sequence else 0
    pieces, M, half = q_g.shape[-3:]
    P = pieces // 2
    r = c_g.shape[-1]
    dtype = c_g.dtype
    f32 = jnp.float32
    length = len_g[b, 0]
    last = length - 1  # the query's position: the step's own token is already in the cache
    start = j * split
    n = slice_blocks(length, start, slots, split, block)
    w = lax.axis_index(THREADS) if consumers > 1 else 0
    attender = consumers - 1
    latents, tables, key_sets = RINGS[consumers]
    shared = dict(collective_axes=THREADS) if consumers > 1 else {}  # one allocation for all warpgroups
    wide = lambda v, shape, dim: lax.broadcast_in_dim(v, shape, (dim,))  # keepdims does not lower
    first = lambda u: start + u * block  # block u's first slot
    heads = acc_g.shape[-2]

    def scope(q_s, w_s, bias_s, c_s, cos_s, sin_s, k_s, ready, latent_in, rotary_in, *handoff, p_s=None):
        """The slice's (acc, m, l), in the attending warpgroup. Block u's latent in c_s's buffer u % latents
        (its arrival on latent_in's barrier of the same index), its cos / sin in u % tables, its keys in
        k_s's set u % key_sets; `handoff` (two warpgroups): the barriers by which the keys' maker says a key
        set is ready and the attending warpgroup frees it; the attending warpgroup then loads the tables,
        and after its p c the latent, into the buffers the block freed. A warpgroup that waits on a barrier
        waits on every phase of it (as the interpreter wants), and an arrival happens only where a wait will
        see it."""

        def fetch_latent(u):
            i = lax.rem(u, latents)
            plgpu.copy_gmem_to_smem(c_g.at[b, pl.ds(first(u), block)], c_s.at[i], latent_in.at[i])

        def fetch_rotary(u):
            rows_u, i = pl.ds(first(u), block), lax.rem(u, tables)
            plgpu.copy_gmem_to_smem(cos_g.at[bc, rows_u], cos_s.at[i], rotary_in.at[i])
            plgpu.copy_gmem_to_smem(sin_g.at[bc, rows_u], sin_s.at[i], rotary_in.at[i])

        @pl.when(w == 0)
        def _():  # the queries and W_bk, loaded once; the first blocks' latent and tables
            plgpu.copy_gmem_to_smem(q_g.at[b, g], q_s, ready)
            plgpu.copy_gmem_to_smem(w_g.at[g], w_s, ready)
            plgpu.copy_gmem_to_smem(b_g.at[g], bias_s, ready)
            ahead = latents if handoff else latents - 1  # one warpgroup loads block u + 1's during block u
            for u in range(max(ahead, tables)):
                if u < ahead:
                    pl.when(u < n)(functools.partial(fetch_latent, u))
                if u < tables:
                    pl.when(u < n)(functools.partial(fetch_rotary, u))

        plgpu.barrier_wait(ready)
        keys = lambda key_set, i: k_s.at[key_set * pieces + i]  # piece i of a key set
        if handoff:
            keys_ready, keys_free = handoff

        def make_keys(u):
            """Block u's keys, rebuilt, rotated, rounded and stored in its key set; with one warpgroup, then
            block u + 2's tables into the buffer it read."""
            latent, table, key_set = lax.rem(u, latents), lax.rem(u, tables), lax.rem(u, key_sets)
            with jax.named_scope("latent_wait"):
                plgpu.barrier_wait(latent_in.at[latent])
            with jax.named_scope("rebuild"):  # every kv head's two rotary halves by one wgmma, then cut
                k = _summed([(c_s.at[latent], w_s)], (block, pieces * half))  # into the 2P pieces
                k = k + wide(spelling.columns(bias_s), (block, pieces * half), 1)  # [block, half]
                k = [k[:, i * half : (i + 1) * half] for i in range(pieces)]
            with jax.named_scope("rotary_wait"):
                plgpu.barrier_wait(rotary_in.at[table])
                if handoff:

                    @pl.when(u >= key_sets)
                    def _():  # the set's last keys were scored
                        plgpu.barrier_wait(keys_free.at[key_set])

            with jax.named_scope("rope"):
                cos, sin = cos_s[table], sin_s[table]  # [block, half]: the same table rotates every head
                for p in range(P):
                    k1, k2 = k[p], k[P + p]
                    spelling.store_keys(keys(key_set, p), (k1 * cos - k2 * sin).astype(dtype))
                    spelling.store_keys(keys(key_set, P + p), (k2 * cos + k1 * sin).astype(dtype))
                plgpu.commit_smem()  # a warpgroup barrier too: every thread has read the tables
                if handoff:
                    plgpu.barrier_arrive(keys_ready.at[key_set])

            if not handoff:  # (with two, the attending warpgroup loads them)

                @pl.when(u + tables < n)
                def _():
                    fetch_rotary(u + tables)

        def attend(u, carry, masked=True):
            """Block u's scores, online softmax and p c folded into (acc, m, l); `masked`: some of its slots
            may be hidden from the query."""
            acc, m, l = carry
            latent, key_set = lax.rem(u, latents), lax.rem(u, key_sets)
            if handoff:
                with jax.named_scope("keys_wait"):
                    plgpu.barrier_wait(keys_ready.at[key_set])

                @pl.when(u + tables < n)
                def _():  # the keys' maker has read block u's tables
                    fetch_rotary(u + tables)

            with jax.named_scope("scores"):
                pairs = [(q_s.at[i], spelling.key_operand(keys(key_set, i))) for i in range(pieces)]
                s = _summed(pairs, (M, block))
                if handoff:

                    @pl.when(u + key_sets < n)
                    def _():
                        plgpu.barrier_arrive(keys_free.at[key_set])

            with jax.named_scope("softmax"):
                if masked:
                    visible = visible_slots(
                        first(u) + spelling.iota((M, block), 1), last, slots, sliding, window
                    )
                    s = jnp.where(visible, s, NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                p = jnp.exp(s - wide(m_new, (M, block), 0))
                if masked:
                    p = jnp.where(visible, p, 0.0)
                alpha = jnp.exp(m - m_new)
            with jax.named_scope("values"):
                if handoff:  # long complete (its keys are made from it), but seen here by this warpgroup too
                    plgpu.barrier_wait(latent_in.at[latent])
                acc = acc * wide(alpha, (M, r), 0)
                acc = spelling.add_products(acc, p.astype(dtype), c_s.at[latent], p_s)
                if handoff:

                    @pl.when(u + latents < n)
                    def _():  # p c was the buffer's last reader, the keys' rebuild long before it
                        fetch_latent(u + latents)

            return acc, m_new, l * alpha + jnp.sum(p, axis=1)

        def walk(step, count):
            """(acc, m, l) over blocks 0 .. count - 1. On a cache of positions 0, 1, ... with no window only
            the last block can hold slots past the length (the slice walks those below it): the others
            skip the masks. The carries start from an accumulator's zeros (they have the wgmma layout;
            jnp.zeros does not)."""
            zeros = pl.run_scoped(lambda acc: acc[...], plgpu.ACC((M, r), f32))
            init = (zeros, jnp.max(zeros, axis=1) + NEG, jnp.sum(zeros, axis=1))
            if sliding or window is not None:
                return lax.fori_loop(0, count, step, init)
            last_block = jnp.maximum(count - 1, 0)
            carry = lax.fori_loop(0, last_block, functools.partial(step, masked=False), init)
            return lax.fori_loop(last_block, count, step, carry)

        if not handoff:

            def step(u, carry, masked=True):
                @pl.when(u + 1 < n)
                def _():  # the other buffer's last reader, p c of block u - 1, was waited for
                    fetch_latent(u + 1)

                make_keys(u)
                return attend(u, carry, masked)

            return walk(step, n)
        pl.loop(0, jnp.where(w == 0, n, 0))(make_keys)
        return walk(attend, jnp.where(w == 1, n, 0))

    def write(acc, m, l, o_s):
        """The slice's (acc, m, l) from the attending warpgroup, acc's P x R real rows by TMA from o_s."""
        m_g[b, g, j] = m
        l_g[b, g, j] = l
        o_s[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, heads)], acc_g.at[b, g, j])
        plgpu.wait_smem_to_gmem(0)

    narrow, wide_swizzle = swizzles
    K = lambda *shape: plgpu.SMEM(shape, dtype, transforms=swizzled(dtype, narrow))  # the scores' operands
    L = lambda *shape: plgpu.SMEM(shape, dtype, transforms=swizzled(dtype, wide_swizzle))  # the latent's
    F = lambda *shape: plgpu.SMEM(shape, f32, transforms=swizzled(f32, narrow))
    barriers = lambda count, arrivals=1: plgpu.Barrier(num_arrivals=arrivals, num_barriers=count)
    handoff = [barriers(key_sets), barriers(key_sets)] if consumers > 1 else []
    p_buffer = {"p_s": L(M, block)} if interpret else {}  # the interpreter's p c takes p from SMEM
    result = pl.run_scoped(
        scope, K(pieces, M, half), L(r, pieces * half), plgpu.SMEM((pieces * half,), f32),
        L(latents, block, r), F(tables, block, half), F(tables, block, half),
        K(key_sets * pieces, *spelling.keys_shape(half, block)), plgpu.Barrier(num_arrivals=3),
        barriers(latents), barriers(tables, 2), *handoff, **shared, **p_buffer,
    )  # fmt: skip

    def write_whole(o_s):
        """acc through o_s, which reuses `scope`'s buffers (Mosaic GPU opens a run_scoped of several
        warpgroups with a barrier of them all)."""
        if consumers == 1:
            write(*result, o_s)
        else:
            pl.when(w == attender)(lambda: write(*result, o_s))

    pl.run_scoped(write_whole, F(M, r), **shared)


@functools.partial(jax.jit, static_argnames=("window", "sliding", "launch"))
def decompressed_splits(
    q: Float[Array, "B G R d"],
    c: Float[Array, "B S r"],
    key_up: tuple[Float[Array, "Gp r PD"], Float[Array, "Gp PD"]],
    rotations: tuple[Float[Array, "Bc S half"], Float[Array, "Bc S half"]],
    lengths: Int[Array, " B"],
    window: int | None = None,
    sliding: bool = False,
    launch: Launch = Launch(),
) -> tuple[Float[Array, "B Gp J PR r"], Float[Array, "B Gp J PR"], Float[Array, "B Gp J PR"]]:
    """`flash_decode.decompressed_splits` as a Mosaic GPU kernel: per group of P kv heads and slice of the
    slots, (sum_t e^(s_t - m) c_t, m, sum_t e^(s_t - m)) over keys rebuilt on chip from the latent c by
    `key_up` (`grouped_key_up`'s layout) and rotated by `rotations`. Products in the cache's dtype (bf16 or
    f16), RoPE and sums in float32. `launch.block` must be a multiple of 64 (a wgmma's rows), `launch.warps`
    4 (one warpgroup a program) or 8 (two: one makes the keys, the other attends)."""
    (w_k, b_k), (cos, sin) = key_up, rotations
    B, G, R, d = q.shape
    S, r = c.shape[1:]
    splits, block = launch.splits, launch.block
    _check_split(S, splits, block)
    if (reason := refusal(q.shape, c.dtype, r, launch)) is not None:
        raise ValueError(reason)
    consumers = CONSUMERS[launch.warps]
    half = d // 2
    P = key_groups(G, R, w_k, launch)
    Gp, heads = G // P, P * R
    M = -(-heads // ROWS) * ROWS
    swizzles = _swizzles(r, half, P, block)
    q = q.astype(c.dtype)
    # the 2P query pieces [M, half], i = h P + p: kv head p's columns of half h's block-diagonal queries
    # (its R rows real, the others zero), so that the scores are the sum of the pieces' products
    parts = [_block_diagonal(part, P) for part in (q[..., :half], q[..., half:])]  # [B, Gp, PR, P half]
    pieces = jnp.stack(parts, axis=2).reshape(B, Gp, 2, heads, P, half).transpose(0, 1, 2, 4, 3, 5)
    queries = jnp.pad(pieces.reshape(B, Gp, 2 * P, heads, half), ((0, 0),) * 3 + ((0, M - heads), (0, 0)))
    kernel = functools.partial(
        _kernel, block=block, split=S // splits, slots=S, window=window, sliding=sliding,
        per_sequence=cos.shape[0] > 1, interpret=launch.interpret, swizzles=swizzles, consumers=consumers,
    )  # fmt: skip
    f32 = jnp.float32
    out_type = (
        jax.ShapeDtypeStruct((B, Gp, splits, heads, r), f32),
        jax.ShapeDtypeStruct((B, Gp, splits, M), f32),
        jax.ShapeDtypeStruct((B, Gp, splits, M), f32),
    )
    call = plgpu.kernel(
        kernel, out_type=out_type, grid=(B, splits, Gp), grid_names=("b", "j", "g"),
        interpret=_interpret_params() if launch.interpret else None,
        compiler_params=COMPILER_PARAMS,
        **(dict(num_threads=consumers, thread_name=THREADS) if consumers > 1 else {}),
    )  # fmt: skip
    lengths = lengths.astype(jnp.int32).reshape(B, 1)
    # W_bk and b_k as `grouped_key_up` lays them out (the kernel copies them whole; the conversions are
    # no-ops on its output): no XLA kernel a step re-lays them out; the tables untiled [Bc, S, half]
    w_k, b_k = w_k.astype(c.dtype), b_k.astype(f32)
    acc, m, l = call(lengths, queries, w_k, b_k, c, cos.astype(f32), sin.astype(f32))
    return acc, m[..., :heads], l[..., :heads]
