"""Pallas flash-decoding: one decode step's attention over the cache, for GQA layers and both MLA modes.

Program (b, j, g) takes kv head g of sequence b and the j-th slice of the cache slots (flash-decoding:
the slots are split across programs so that batch 1 fills the GPU). It walks its slice in blocks keeping an
online softmax per query head (max m, sum l, weighted values acc); `combine` merges the slices and adds
each head's sink logit exactly once. Two kernels share that walk:
- cached keys (`attention_splits`), scores `sum_i q_i . k_i + bias`:
  - GQA (`gqa_decode`): the R query heads of kv head g, keys k, values v;
  - MLA partial, absorbed (`mla_absorbed_decode`): one "kv head" whose H query heads read the shared
    latent c through their absorbed queries `W_bk[g]^T q_nope` plus their own kv head's RoPE keys (mla.py,
    "Decode absorbs the up-projections"); the values are the latent itself, up-projected after the merge;
- keys rebuilt on chip (`decompressed_splits`, `mla_decompressed_decode`): MLA decompressed, the keys
  `RoPE(c W_bk[g] + b_k[g])` computed from the latent block and never written out, values absorbed (also
  written for Pallas Mosaic GPU, `flash_decode_mosaic`, chosen by `DECOMPRESSED_KERNEL`).
Slots past a sequence's length are not read (ragged lengths: blocks after the last occupied slot are
skipped); ring-buffer slots of sliding layers map back to positions as in `cache.cached_positions` and the
window masks them.

Written against the backend-neutral `pl.pallas_call` (block specs, jnp inside): CI checks it with the CPU
interpreter (`interpret=True`); on the GPU, JAX lowers it through its Triton backend (deprecated in JAX
0.11; see the README's decode section). `ForwardOptions(decode_kernels=True)` uses it for single-token
steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

try:  # the GPU lowering: JAX 0.11 deprecates this backend; a JAX without it runs the kernels interpreted only
    from jax.experimental.pallas import triton as pl_triton
except ImportError:
    pl_triton = None

NEG = -1e30  # masked score: finite, so a slice with no visible slot keeps m finite and exp() at 0
MIN_ROWS = 16  # Triton's dot needs at least 16 rows: fewer query heads are padded with zero queries


class Launch(NamedTuple):
    """How a flash-decoding call runs: the cache slots split into `splits` slices per sequence and kv
    head, each read `block` slots a step; on the CPU `interpret`er, or compiled for the GPU with `warps` per
    program and `stages` of software pipelining (2: the next block loads while this one is reduced);
    `head_block` query heads per program (None: absorbed MLA all heads in one program, decompressed MLA
    the fewest whole kv heads that fill a tensor-core tile, `kv_heads_per_program`)."""

    splits: int = 8
    block: int = 64
    interpret: bool = False
    warps: int = 4
    stages: int = 2
    head_block: int | None = None


class Slots(NamedTuple):
    """The cache slots a decode step reads: each sequence's `lengths` [B] (the step's own token included),
    the attention `window` (None: every position) and whether the slots are a sliding layer's ring buffer
    (`sliding`)."""

    lengths: Int[Array, " B"]
    window: int | None = None
    sliding: bool = False


# Twice the SMs of an H100 / H200: a grid of fewer programs leaves SMs without a second program to switch to
# while the first waits on memory (GQA's decode grids are split until they reach it: 512 programs at
# gpt-oss's power-of-two shapes).
FILL_PROGRAMS = 264
# The SMs: the MLA kernels' grids (absorbed and decompressed) are split only until they reach it (256
# programs at gpt-oss's shapes). Each of their programs serves many query heads, and slicing the cache
# twice as finely, to GQA's fill, measured slower (docs/decode.md, "Slices of the cache").
MLA_FILL_PROGRAMS = 132


# The most per-slice state a plan may write, as a share of the cache bytes the slices read: each slice
# writes float32 sums for every query head it serves (acc, m, l), which `combine` reads back. None: slices
# until the grid fills (`fill_programs`) whatever their state. Absorbed MLA's state per slice is its 64
# heads' sums over the latent, so at batch 1 x 32K the grid's 256 slices write 0.84x the cache; splitting
# the heads over programs instead measured slower at 32K (docs/decode.md).
STATE_SHARE: float | None = None


def plan(
    slots: int, programs: int, block: int = 64, target: int = FILL_PROGRAMS, most_splits: int | None = None
) -> tuple[int, int] | None:
    """(splits, block) for a cache of `slots` read by `programs` (sequence x kv head) programs: blocks of
    `block` slots (halved down to 16 until one divides), and enough slices to give ~`target` programs,
    at most `most_splits`. None when `slots` is not a multiple of 16."""
    block = next((b for b in (block, block // 2, block // 4, 32, 16) if b >= 16 and slots % b == 0), None)
    if block is None:
        return None
    blocks, splits = slots // block, 1
    while blocks % (2 * splits) == 0 and programs * splits < target and 2 * splits <= (most_splits or blocks):
        splits *= 2
    return splits, block


def absorbed_split(
    batch: int, slots: int, heads: int, slot_bytes: int, latent: int, share: float | None = None
) -> tuple[int | None, int | None]:
    """(query heads per program, most slices) for absorbed MLA's kernel over `slots` of `slot_bytes` each,
    whose slices each write `heads` x (latent + 2) float32 sums. `share` None: all heads in one program,
    slices unbounded (the grid fills by slices alone). Else the slices whose state stays within `share` of
    the cache's bytes, and the heads split over programs (each then reads the latent block through L2),
    halved while they halve evenly and keep MIN_ROWS a program, until the grid would fill
    (`fill_programs`)."""
    if share is None:
        return None, None
    state = heads * (latent + 2) * 4
    most = 1 << max(0, int(share * slots * slot_bytes / state).bit_length() - 1)
    head_block = heads
    while (
        head_block % 2 == 0
        and head_block // 2 >= MIN_ROWS
        and batch * (heads // head_block) * most < fill_programs("absorbed")
    ):
        head_block //= 2
    return (None if head_block == heads else head_block), most


def pow2_columns(width: int) -> list[pl.Slice]:
    """Columns [0, width) as power-of-two slices, widest first (192 -> 128 + 64): Triton tensors must
    have such sizes."""
    bits = [1 << i for i in reversed(range(width.bit_length())) if width & (1 << i)]
    return [pl.ds(sum(bits[:i]), bit) for i, bit in enumerate(bits)]


def visible_slots(slot: Array, last, slots: int, sliding: bool, window: int | None) -> Array:
    """Which of the cache's `slot`s (an array of slot indices, any shape) the query at position `last`
    sees (ring buffer mapped back to positions for sliding layers, as `cache.cached_positions` does)."""
    pos = last - jax.lax.rem(last - slot + slots, slots) if sliding else slot
    visible = (pos >= 0) & (pos <= last)
    if window is not None:
        visible &= pos > last - window
    return visible


def _visible(start, i, block: int, last, slots: int, sliding: bool, window: int | None):
    """Which of the block's slots [1, block] the query sees (`visible_slots`)."""
    slot = start + i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    return visible_slots(slot, last, slots, sliding, window)


def slice_blocks(length, start, slots: int, split: int, block: int):
    """The blocks a slice of `split` slots from `start` walks: those before min(length, slots), the slots
    that hold tokens (always a prefix, ring buffer or not)."""
    occupied = jnp.maximum(jnp.minimum(length, slots) - start, 0)
    return jnp.minimum(jax.lax.div(occupied + (block - 1), block), split // block)


def _online_step(carry, s, visible, values):
    """Fold one block of scores [heads, block] and its value columns into (acc [heads, cols], m, l)."""
    acc, m, l = carry
    s = jnp.where(visible, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    scale = jnp.exp(m - m_new)
    product = lambda v: jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = [a * scale[:, None] + product(v) for a, v in zip(acc, values, strict=True)]
    return acc, m_new, l * scale + p.sum(axis=1)


def _walk(body, length, start, slots: int, split: int, block: int, heads: int, value_cols, out_refs):
    """Run `body` over the slice's occupied blocks (always a prefix [0, min(length, slots)) of the slots,
    ring buffer or not) and write (acc, m, l)."""
    acc_ref, m_ref, l_ref = out_refs
    blocks = slice_blocks(length, start, slots, split, block)
    f32 = jnp.float32
    init = (
        [jnp.zeros((heads, cols.size), f32) for cols in value_cols],
        jnp.full((heads,), NEG, f32),
        jnp.zeros((heads,), f32),
    )
    acc, m, l = jax.lax.fori_loop(0, blocks, body, init)
    for cols, a in zip(value_cols, acc, strict=True):
        acc_ref[:, cols] = a
    m_ref[...] = m
    l_ref[...] = l


CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a [m, k] x b [n, k] -> [m, n]


def _split_kernel(length_ref, *refs, n_keys: int, shared_values: bool, block: int, window, sliding, slots):
    """Program (b, j, g): online softmax of the query heads over slots [j * split, (j + 1) * split) with
    cached keys: scores `sum_i q_i . k_i + bias`."""
    q_refs, bias_ref, k_refs = refs[:n_keys], refs[n_keys], refs[n_keys + 1 : 2 * n_keys + 1]
    rest = refs[2 * n_keys + 1 :]
    v_ref, out_refs = (k_refs[0], rest) if shared_values else (rest[0], rest[1:])
    split = v_ref.shape[0]
    start = pl.program_id(1) * split
    length = length_ref[0]
    last = length - 1  # the query's position: the step's own token is already in the cache
    f32 = jnp.float32
    queries = [
        (k_ref, cols, q_ref[:, cols])
        for q_ref, k_ref in zip(q_refs, k_refs, strict=True)
        for cols in pow2_columns(q_ref.shape[1])
    ]
    value_cols = pow2_columns(v_ref.shape[1])
    bias = bias_ref[...].astype(f32)

    def body(i, carry):
        rows = pl.ds(i * block, block)
        s = bias[:, None]
        for k_ref, cols, q in queries:
            s = s + jax.lax.dot_general(q, k_ref[rows, cols], CONTRACT_LAST, preferred_element_type=f32)
        visible = _visible(start, i, block, last, slots, sliding, window)
        return _online_step(carry, s, visible, [v_ref[rows, cols] for cols in value_cols])

    _walk(body, length, start, slots, split, block, bias.shape[0], value_cols, out_refs)


def _decompressed_kernel(length_ref, q1_ref, q2_ref, c_ref, w_ref, b_ref, cos_ref, sin_ref, *out_refs,
                         block: int, window, sliding, slots):  # fmt: skip
    """Program (b, j, g) of a decompressed MLA layer, for a group g of P kv heads: their keys are rebuilt
    from the latent block in on-chip memory by one product (`k = c W_bk + b_k`, columns [half (2), kv head
    (P), frequency]), rotated by the slots' cos / sin rows, and never written out; the values stay the
    latent (absorbed: `W_bv` is applied after the merge). The queries come block-diagonal ([P x R rows,
    P x half]: each head's half-query in its own kv head's columns), so one score product serves the P kv
    heads and their R query heads each fill the tensor core's rows that a single kv head would pad."""
    split = c_ref.shape[0]
    start = pl.program_id(1) * split
    length = length_ref[0]
    last = length - 1
    f32 = jnp.float32
    latent_cols = pow2_columns(c_ref.shape[1])
    q1, q2 = q1_ref[...], q2_ref[...]
    bias = b_ref[...].astype(f32)
    heads = q1.shape[1] // cos_ref.shape[1]  # P
    # The group's up-projection, loaded once: every block multiplies by it.
    w = [w_ref[cols, :] for cols in latent_cols]

    def per_head(table):  # [block, half] -> [block, P x half]: each kv head's columns rotate alike
        return jnp.broadcast_to(table[:, None, :], (block, heads, table.shape[1])).reshape(block, -1)

    def body(i, carry):
        rows = pl.ds(i * block, block)
        c = [c_ref[rows, cols] for cols in latent_cols]
        k = bias[None, :] + sum(
            jnp.dot(part, w_part, preferred_element_type=f32) for part, w_part in zip(c, w, strict=True)
        )
        k1, k2 = jnp.split(k, 2, axis=1)
        cos, sin = per_head(cos_ref[rows, :]), per_head(sin_ref[rows, :])
        rotated = lambda k: k.astype(q1.dtype)  # rotated in float32, multiplied in the cache's dtype
        halves = ((q1, rotated(k1 * cos - k2 * sin)), (q2, rotated(k2 * cos + k1 * sin)))
        s = sum(jax.lax.dot_general(q, k, CONTRACT_LAST, preferred_element_type=f32) for q, k in halves)
        visible = _visible(start, i, block, last, slots, sliding, window)
        return _online_step(carry, s, visible, c)

    _walk(body, length, start, slots, split, block, q1.shape[0], latent_cols, out_refs)


def _specs(Hq: int, S: int, splits: int):
    """Block specs of the cache and the queries, grid (sequence, slice, kv head): kv heads innermost, so
    the programs reading one latent block run together and find it in L2."""
    split = S // splits

    def cache(width: int, per_head: bool = True) -> pl.BlockSpec:
        if per_head:
            return pl.BlockSpec((None, split, None, width), lambda b, j, g: (b, j, g, 0))
        return pl.BlockSpec((None, split, width), lambda b, j, g: (b, j, 0))

    query = lambda width: pl.BlockSpec((None, None, Hq, width), lambda b, j, g: (b, g, 0, 0))
    return cache, query


def _pad_heads(x: Array, axis: int = 2) -> Array:
    """Zero query heads (or their biases) along `axis` up to a power of two (Triton's tensors are) of at
    least MIN_ROWS."""
    heads = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, max(MIN_ROWS, 1 << (heads - 1).bit_length()) - heads)
    return jnp.pad(x, widths)


def gpu_lowering_available() -> bool:
    """Whether this JAX can lower the kernels for the GPU (its Pallas Triton backend is still there)."""
    return pl_triton is not None


def runs_compiled() -> bool:
    """Whether the Pallas kernels run compiled on this machine: a GPU whose JAX can lower them (elsewhere
    they only run in the CPU interpreter)."""
    return jax.default_backend() == "gpu" and gpu_lowering_available()


def triton_launch(warps: int, stages: int, interpret: bool):
    """Launch settings on the GPU (ignored by the interpreter): `warps` per program, and `stages` of
    software pipelining (2: the next cache block loads while this one is reduced)."""
    if not gpu_lowering_available():
        if interpret:
            return None
        raise RuntimeError(
            f"the Pallas decode kernels lower for the GPU through jax.experimental.pallas.triton, which JAX "
            f"{jax.__version__} no longer has; decode on the jnp path (decode_kernels=False, "
            f"--decode-kernels off)"
        )
    return pl_triton.CompilerParams(num_warps=warps, num_stages=stages)


def masked_load(ref, mask=None) -> Array:
    """A tile of `ref`, zero where `mask` (broadcast to the tile) is False: the kernels' loads of tiles that
    overhang an array's edge."""
    return ref[...] if mask is None else pl_triton.load(ref, mask=mask, other=0)


def _launch(kernel, in_specs, args, lengths, Hq: int, dv: int, heads: int, launch: Launch):
    """The pallas_call both kernels make: grid (sequence, slice, kv head), B and G read off the first query,
    each sequence's length as the first input, per-slice (acc, m, l) in float32 out, and the padded query
    heads dropped again."""
    B, G = args[0].shape[:2]  # the first query array: [B, G, Hq, width]
    splits, interpret = launch.splits, launch.interpret
    slice_of = lambda *trailing: pl.BlockSpec(
        (None, None, None, *trailing), lambda b, j, g: (b, g, j, *(0 for _ in trailing))
    )
    shapes = [(B, G, splits, Hq, dv), (B, G, splits, Hq), (B, G, splits, Hq)]
    outputs = pl.pallas_call(
        kernel,
        grid=(B, splits, G),
        in_specs=[pl.BlockSpec((1,), lambda b, j, g: (b,)), *in_specs],
        out_specs=[slice_of(Hq, dv), slice_of(Hq), slice_of(Hq)],
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes],
        compiler_params=triton_launch(launch.warps, launch.stages, interpret),
        interpret=interpret,
    )(lengths.astype(jnp.int32), *args)
    acc, m, l = outputs
    return acc[..., :heads, :], m[..., :heads], l[..., :heads]


@functools.partial(jax.jit, static_argnames=("window", "sliding", "launch"))
def attention_splits(
    queries: tuple[Float[Array, "B G Hq _"], ...],
    bias: Float[Array, "B G Hq"],
    keys: tuple[Float[Array, "B S G _"], ...],
    values: Float[Array, "B S G dv"] | None,
    lengths: Int[Array, " B"],
    window: int | None = None,
    sliding: bool = False,
    launch: Launch = Launch(),
) -> tuple[Float[Array, "B G J Hq dv"], Float[Array, "B G J Hq"], Float[Array, "B G J Hq"]]:
    """Per kv head g and slice j of the slots: (sum_t e^(s_t - m) v_t, m, sum_t e^(s_t - m)) with scores
    `s_t = sum_i queries[i] . keys[i]_t + bias` (scale already in the queries). `values=None`: the values
    are `keys[0]` (the latent of absorbed MLA). A cache array with one head where the queries have G groups
    is read by every group (absorbed MLA's heads split over several programs). Products in the cache's
    dtype (bf16: tensor cores), sums in float32."""
    G, heads = bias.shape[1:]
    S = keys[0].shape[1]
    keys = tuple(k[:, :, 0] if k.shape[2] < G else k for k in keys)  # shared: [B, S, width]
    splits, block = launch.splits, launch.block
    _check_split(S, splits, block)
    shared = values is None
    dv = (keys[0] if shared else values).shape[-1]
    queries = tuple(_pad_heads(q.astype(k.dtype)) for q, k in zip(queries, keys, strict=True))
    bias = _pad_heads(bias.astype(jnp.float32))
    Hq = bias.shape[2]
    cache, query = _specs(Hq, S, splits)
    kernel = functools.partial(
        _split_kernel, n_keys=len(keys), shared_values=shared, block=block, window=window,
        sliding=sliding, slots=S,
    )  # fmt: skip
    in_specs = [
        *[query(q.shape[-1]) for q in queries],
        pl.BlockSpec((None, None, Hq), lambda b, j, g: (b, g, 0)),
        *[cache(k.shape[-1], per_head=k.ndim == 4) for k in keys],
        *([] if shared else [cache(dv)]),
    ]
    args = (*queries, bias, *keys, *([] if shared else [values]))
    return _launch(kernel, in_specs, args, lengths, Hq, dv, heads, launch)


def _check_split(S: int, splits: int, block: int) -> None:
    if S % (splits * block):
        raise ValueError(f"cache of {S} slots: not a multiple of splits x block = {splits} x {block}")


def key_groups(G: int, R: int, w_k: Array, launch: Launch) -> int:
    """P, the kv heads a decompressed-MLA program serves at `launch` (`kv_heads_per_program`), checked
    against the groups `w_k` (`grouped_key_up`'s layout) was derived for."""
    P = kv_heads_per_program(G, R, launch.head_block)
    if w_k.shape[0] != G // P:
        raise ValueError(
            f"key up-projection grouped for {G // w_k.shape[0]} kv heads a program, the launch has {P}"
        )
    return P


def kv_heads_per_program(G: int, R: int, head_block: int | None = None) -> int:
    """P, the kv heads a decompressed-MLA program serves: `head_block` query heads' worth when given, else
    the fewest that fill the tensor core's MIN_ROWS rows with real query heads (R per kv head), at most G;
    a power of two dividing G (Triton's tensors are powers of two)."""
    if head_block is not None:
        P = head_block // R
        if head_block % R or P < 1 or G % P or P & (P - 1):
            raise ValueError(
                f"head_block {head_block}: not a power-of-two number of whole kv heads (of {R} query heads) "
                f"dividing the {G} kv heads"
            )
        return P
    P = 1
    while P * R < MIN_ROWS and G % (2 * P) == 0:
        P *= 2
    return P


KernelKind = Literal["gqa", "decompressed", "absorbed"]


def fill_programs(kind: KernelKind) -> int:
    """The programs a decode kernel's grid is split until it reaches (`plan`'s target): twice the SMs for
    GQA, the SMs for the MLA kernels."""
    return FILL_PROGRAMS if kind == "gqa" else MLA_FILL_PROGRAMS


# Software pipelining stages of each kind's Triton kernel in the model's steps: absorbed MLA keeps three
# blocks of its latent in flight, which measured faster than two at 8 x 32K and 64 x 32K (docs/decode.md,
# "The absorbed kernel's pipeline"); the others stay at two. Read when a step is traced.
PIPELINE_STAGES: dict[KernelKind, int] = {"gqa": 2, "decompressed": 2, "absorbed": 3}
# Shared memory the pipeline's cache blocks may fill beyond two stages: an H100's or H200's SM has 227 KB, and
# the products' operands need the rest. gpt-oss's absorbed layers (384 bytes a slot, 24 KB a 64-slot block;
# twice that in float32) take three stages; a latent several times larger keeps two.
PIPELINE_SHARED_BYTES = 160 * 1024


def pipeline_stages(kind: KernelKind, slots: int, splits: int, block: int, slot_bytes: int = 0) -> int:
    """The software pipeline's stages of a `kind` kernel over `slots` in `splits` slices of `block`-slot
    steps, reading `slot_bytes` a slot: `PIPELINE_STAGES`', but no deeper than the blocks a slice walks nor
    than `PIPELINE_SHARED_BYTES` holds of blocks, though two where it asks for more (the next block loads
    while one is reduced)."""
    fits = PIPELINE_SHARED_BYTES // max(1, block * slot_bytes)
    return min(PIPELINE_STAGES[kind], max(2, min(slots // (splits * block), fits)))


def plan_for(
    kind: KernelKind, slots: int, programs: int, block: int = 64, most_splits: int | None = None
) -> tuple[int, int] | None:
    """The (splits, block) the model's decode steps launch a `kind` kernel with: `plan` to the kind's fill."""
    return plan(slots, programs, block, fill_programs(kind), most_splits)


def programs_per_slice(kind: KernelKind, B: int, G: int, R: int, head_block: int | None = None) -> int:
    """The programs a decode kernel runs per slice of the cache (what `plan` fills the GPU with) for B
    sequences of G kv heads with R query heads each: GQA one per sequence and kv head, decompressed MLA one
    per sequence and group of kv heads (`kv_heads_per_program`), absorbed MLA one per sequence and block of
    `head_block` query heads (default all)."""
    if kind == "gqa":
        return B * G
    if kind == "decompressed":
        return B * G // kv_heads_per_program(G, R, head_block)
    return B * (G * R // (head_block or G * R))


def _block_diagonal(q: Float[Array, "B G R half"], P: int) -> Float[Array, "B Gp PR Phalf"]:
    """Queries of P kv heads stacked as rows, each head's in its own kv head's columns (zeros elsewhere)."""
    B, G, R, half = q.shape
    q = q.reshape(B, G // P, P, R, 1, half) * jnp.eye(P, dtype=q.dtype)[:, None, :, None]
    return q.reshape(B, G // P, P * R, P * half)


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
    """`attention_splits` for a decompressed MLA layer: queries (RoPE applied, scale in) against keys
    rebuilt on chip from the latent c by `key_up` (W_bk, b_k in the layout of `grouped_key_up`); the values
    are c (the caller applies W_bv after `combine`). Each program serves P = `kv_heads_per_program` kv heads
    (Gp = G / P groups of P x R query heads, kv-head-major). `rotations`: `rope.cos_sin` of the slots'
    positions, per sequence (Bc = B) or shared (Bc = 1). Products in the cache's dtype, RoPE and sums in
    float32."""
    (w_k, b_k), (cos, sin) = key_up, rotations
    G, R, d = q.shape[1:]
    S, r = c.shape[1:]
    splits, block = launch.splits, launch.block
    _check_split(S, splits, block)
    half = d // 2
    P = key_groups(G, R, w_k, launch)
    q = q.astype(c.dtype)
    q1, q2 = (_pad_heads(_block_diagonal(part, P)) for part in (q[..., :half], q[..., half:]))
    Hq = q1.shape[2]
    cache, query = _specs(Hq, S, splits)
    kernel = functools.partial(_decompressed_kernel, block=block, window=window, sliding=sliding, slots=S)
    per_sequence = cos.shape[0] > 1
    rotation = pl.BlockSpec((None, S // splits, half), lambda b, j, g: (b if per_sequence else 0, j, 0))
    in_specs = [
        query(P * half), query(P * half), cache(r, per_head=False),
        pl.BlockSpec((None, r, 2 * P * half), lambda b, j, g: (g, 0, 0)),
        pl.BlockSpec((None, 2 * P * half), lambda b, j, g: (g, 0)), rotation, rotation,
    ]  # fmt: skip
    args = (q1, q2, c, w_k, b_k, cos.astype(jnp.float32), sin.astype(jnp.float32))
    return _launch(kernel, in_specs, args, lengths, Hq, r, P * R, launch)


def grouped_key_up(
    w_k: Float[Array, "r G d"], b_k: Float[Array, "G d"], P: int, dtype
) -> tuple[Float[Array, "Gp r PD"], Float[Array, "Gp PD"]]:
    """A decompressed layer's key up-projection (W_bk, b_k) in its kernel's layout for P kv heads a program:
    per group of P kv heads, columns [half (2), kv head (P), frequency], so that one product rebuilds the
    group's keys split in their rotary halves; the weights in `dtype` (the cache's), the bias in float32
    (both kernels add it to float32 sums: converted here, where a decode loop derives it once, not in each
    step)."""
    G, d = w_k.shape[1:]
    grouped = lambda x: (
        x.reshape(*x.shape[:-2], G // P, P, 2, d // 2).swapaxes(-3, -2).reshape(*x.shape[:-2], G // P, P * d)
    )
    return jnp.moveaxis(grouped(w_k.astype(dtype)), 1, 0), grouped(b_k.astype(jnp.float32))


def combine(
    acc: Float[Array, "B G J Hq dv"],
    m: Float[Array, "B G J Hq"],
    l: Float[Array, "B G J Hq"],
    sinks: Float[Array, " H"],
) -> tuple[Float[Array, "B G Hq dv"], Float[Array, "B G Hq"]]:
    """Merge the slices with each head's sink logit (heads in kv-head-major order) counted once: (the
    attention-weighted values, the total attention mass on the tokens, < 1 because of the sink)."""
    sinks = sinks.astype(jnp.float32).reshape(m.shape[1], m.shape[3])[None]  # [1, G, Hq]
    top = jnp.maximum(m.max(axis=2), sinks)
    weight = jnp.exp(m - top[:, :, None])  # 0 for a slice that saw no token
    tokens = (weight * l).sum(axis=2)
    total = tokens + jnp.exp(sinks - top)
    return (weight[..., None] * acc).sum(axis=2) / total[..., None], tokens / total


def gqa_decode(
    q: Float[Array, "B H d"],
    k: Float[Array, "B S G d"],
    v: Float[Array, "B S G d"],
    slots: Slots,
    sinks: Float[Array, " H"],
    launch: Launch = Launch(),
) -> Float[Array, "B H d"]:
    """One decode query per sequence (RoPE applied) over a GQA layer's cache that already holds the step's
    token (`slots.lengths` count it): the attention output per head, as `attention.attend` computes it."""
    B, H, d = q.shape
    G = k.shape[2]
    qg = (q.astype(jnp.float32) * d**-0.5).reshape(B, G, H // G, d)
    acc, m, l = attention_splits((qg,), jnp.zeros((B, G, H // G), jnp.float32), (k,), v, *slots, launch)
    out, _ = combine(acc, m, l, sinks)
    return out.reshape(B, H, d).astype(q.dtype)


def mla_absorbed_decode(
    q_rope: Float[Array, "B G R n2"],
    q_nope: Float[Array, "B G R n"],
    up: tuple[Array, Array, Array, Array],
    entries: dict[str, Array],
    slots: Slots,
    sinks: Float[Array, " H"],
    launch: Launch = Launch(),
) -> Float[Array, "B H d"]:
    """One decode query per sequence over a partial-mode layer's cache {"c" [B,S,r], "k_rope" [B,S,G,2n]}
    (rorope: "k_rope" [B,S,1,n2], one key that every head reads) that already holds the step's token: the
    attention output per head, as `mla._absorbed` computes it.
    `up`: the up-projections (W_bk [r, G, n], b_k [G, n], W_bv [r, G, d], b_v [G, d]).
    `launch.head_block`: query heads per program (default all: one program reads a latent block for
    every head); fewer split the heads over programs that each read the block."""
    w_k, b_k, w_v, b_v = up
    B, G, R, n2 = q_rope.shape
    f32 = jnp.float32
    scale = w_v.shape[-1] ** -0.5
    H = G * R
    head_block = launch.head_block or H
    if H % head_block:
        raise ValueError(f"head_block {head_block} does not divide the {H} query heads")
    blocks = (B, H // head_block, head_block)
    q_lat = jnp.einsum("bgrn,lgn->bgrl", q_nope, w_k, preferred_element_type=f32).reshape(*blocks, -1)
    q_bias = jnp.einsum("bgrn,gn->bgr", q_nope, b_k, preferred_element_type=f32).reshape(blocks)
    # Each head's RoPE query placed in its own kv head's columns of the flattened k_rope [S, G * 2n]
    # (partial), or over all of one RoPE key that every head reads [S, 1 * n2] (rorope, Gk = 1).
    Gk = entries["k_rope"].shape[2]
    own = (jnp.eye(G, dtype=f32) if Gk == G else jnp.ones((G, 1), f32))[None, :, None, :, None]
    q_rope_flat = (q_rope.astype(f32)[:, :, :, None] * own).reshape(*blocks, Gk * n2)
    c = entries["c"][:, :, None]  # one cache "head": every head block reads the shared latent
    k_rope = entries["k_rope"].reshape(*entries["k_rope"].shape[:2], 1, Gk * n2)
    acc, m, l = attention_splits(
        (q_lat * scale, q_rope_flat * scale), q_bias * scale, (c, k_rope), None, *slots,
        launch._replace(head_block=None),
    )  # fmt: skip
    latent, mass = combine(acc, m, l, sinks)
    latent, mass = latent.reshape(B, G, R, -1), mass.reshape(B, G, R, 1)
    out = jnp.einsum("bgrl,lgd->bgrd", latent, w_v.astype(f32)) + mass * b_v.astype(f32)[:, None]
    return out.reshape(B, G * R, -1).astype(q_nope.dtype)


# The kernel of a decompressed MLA layer's decode: "triton" (`decompressed_splits`, this file's pallas_call)
# or `flash_decode_mosaic` (Pallas Mosaic GPU, every product a wgmma): "mosaic" at the launch's warps (4: one
# warpgroup a program, the model's launch), "mosaic2" with two warpgroups (8 warps), one making the keys
# and the other attending. Mosaic GPU takes a 16-bit cache in blocks of a multiple of 64 slots whose program
# fits an SM's shared memory (`flash_decode_mosaic.runs`; other calls keep "triton").
# Read when a step is traced; "auto" takes "mosaic2" where the kernels are compiled, the fastest measured in
# the model's decode loop (docs/decode.md: `eval.bench.decode --decompressed-kernels triton,mosaic2`), and
# "triton" where they are interpreted (the Mosaic GPU interpreter runs a program's warpgroups as threads,
# far slower than Triton's; tests that check it choose it by name).
DecompressedKernel = Literal["auto", "triton", "mosaic", "mosaic2"]
DECOMPRESSED_KERNEL: DecompressedKernel = "auto"


def decompressed_kernel(q: Array, c: Array, launch: Launch) -> tuple[Callable, Launch]:
    """The `decompressed_splits` that queries q [B, G, R, d] over the latent cache c [B, S, r] decode on at
    `launch`, and the launch it takes: DECOMPRESSED_KERNEL's, where it runs them."""
    kernel = DECOMPRESSED_KERNEL
    if kernel == "auto":
        kernel = "triton" if launch.interpret else "mosaic2"
    if kernel != "triton":
        from gptoss_mla_jax import flash_decode_mosaic  # built on this module: imported where chosen

        mosaic = launch._replace(warps=8 if kernel == "mosaic2" else launch.warps)
        if flash_decode_mosaic.runs(q.shape, c.dtype, c.shape[-1], mosaic):
            return flash_decode_mosaic.decompressed_splits, mosaic
    return decompressed_splits, launch


def mla_decompressed_decode(
    q: Float[Array, "B H d"],
    kv_b: dict[str, Array],
    c: Float[Array, "B S r"],
    slots: Slots,
    sinks: Float[Array, " H"],
    rotations: tuple[Float[Array, "Bc S half"], Float[Array, "Bc S half"]],
    launch: Launch = Launch(),
    key_up: tuple[Array, Array] | None = None,
) -> Float[Array, "B H d"]:
    """One decode query per sequence (RoPE applied, as `mla.scoring_queries` gives it) over a
    decompressed layer's latent cache c that already holds the step's token: the attention output per
    head, as `attend` over `mla.keys_values` computes it, without writing K or V to memory.
    `kv_b`: the layer's up-projection {kernel [r, 2Gd], bias [2Gd]} (keys, then values); `rotations`:
    the slots' cos / sin (`mla.slot_rotations`); `key_up`: the keys' part in the kernel's layout
    (`grouped_key_up`) where the caller derived it once for many steps (None: derived here)."""
    B, H, d = q.shape
    r = c.shape[-1]
    G = kv_b["kernel"].shape[1] // (2 * d)
    w = kv_b["kernel"].reshape(r, 2, G, d)
    bias = kv_b["bias"].reshape(2, G, d)
    if key_up is None:
        key_up = grouped_key_up(w[:, 0], bias[0], kv_heads_per_program(G, H // G, launch.head_block), c.dtype)
    qg = (q.astype(jnp.float32) * d**-0.5).reshape(B, G, H // G, d)
    splits, launch = decompressed_kernel(qg, c, launch)
    acc, m, l = splits(qg, c, key_up, rotations, *slots, launch)
    latent, mass = combine(acc, m, l, sinks)  # [B, G / P, P R, r], [B, G / P, P R]
    latent, mass = latent.reshape(B, G, H // G, r), mass.reshape(B, G, H // G)
    f32 = jnp.float32
    out = (
        jnp.einsum("bgrl,lgd->bgrd", latent, w[:, 1].astype(f32))
        + mass[..., None] * bias[1].astype(f32)[:, None]
    )
    return out.reshape(B, H, d).astype(q.dtype)
