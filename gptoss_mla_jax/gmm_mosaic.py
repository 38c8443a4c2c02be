"""The MoE's MXFP4 expert products at wide batches (decode batches of 16 and more, prefill) as a Pallas
Mosaic GPU kernel, transposed: each
program multiplies one expert's weight tile, decoded into registers, by the activations of one row tile of
the aligned layout, `out^T[cols, rows] = W[e][cols] @ x^T[:, rows]`.

Why transposed. Hopper's `wgmma` takes its A operand from registers: the decoded weights go there straight
from the decoding, with no round trip through shared memory, and the activations' rows become the
product's n, which may be 32 (a wgmma's m is at least 64). At batch 128 an expert gets about 16 of the 512
token-expert pairs, so 32-row tiles of the layout (`ROWS`) multiply half the padding rows of the Triton
kernel's 64-row ones, and read half the activations; at batch 256 (about 32 an expert, many above) 64-row
tiles decode each expert's weights once instead of twice (`Launch.rows`, chosen by the batch: `at_pairs`).

Layouts, prepared once (`prepare`):
- the packed bytes repacked by halves: in each run of 64 contraction values (two scale blocks), byte j
  holds value j in its low nibble and value 32 + j in its high one, so that a step's low nibbles multiply
  the activations' columns [64s, 64s + 32) and its high nibbles the next 32, each half under one scale,
  with the activations as they are (the checkpoint's pairs, 2j and 2j + 1, would need them split into even
  and odd columns, a transposing copy that XLA makes slowly: docs/decode.md); then each 32-byte piece
  reordered so that the 8 bytes a thread decodes for the wgmma register layout's columns (2q + 8j + t
  for lane q = lane % 4, j < 4, t < 2) lie together (`permute_bytes`), as 32-bit words, tiled [G,
  N / cols, K / 64, cols, 8] so that a program's step reads one contiguous tile (`pack`; faster than
  reading 32-byte pieces of the rows in place), which it copies as rows of 128 bytes (`TILE_WORDS`: a
  TMA copy's row is one L2 request, and rows of one weight row's 32 bytes left the kernel bound by L2);
- the scale exponents transposed, [G, K / 32, N]: a step's are two rows of the program's columns;
- gate_up's rows reordered (`glu_rows`) so that each program's tile holds 64 outputs' gates, then their
  ups, its SwiGLU taken in the epilogue.

The activations come as the layout's rows x [M, K] (gate_up: gathered from the tokens) or transposed,
x^T [K, M] (down: gate_up's output as this kernel writes it, out^T); a wgmma reads either from shared
memory (x's tiles through a transposed view).

Decoding: the grouped matmul's inline PTX (`gmm.E2M1_ASM`, folded), per word of 4 packed bytes: a mask
keeps the low (or high) nibbles, `prmt` spreads two bytes to a word's halves, one integer multiply moves
each nibble's sign and magnitude bits into place (the value times 2^-126) and one bf16x2 multiply by the
block's scale times 2^126 (2^(e - 1), a bf16 for exponents up to `mxfp4.FOLDABLE_EXPONENT`; `prepare`
refuses experts with larger ones) makes the values exact: nine instructions per 4 values.

Each step waits for its products before the next decoding: a register operand must not change while its
wgmma runs, and ptxas reuses the registers of an issued wgmma for the next step's values (with the wait
one step later, outputs came out wrong on the GPU). The overlap comes from the programs an SM holds
(90-170 registers a thread, 45-100 KB of shared memory: several programs an SM), their loads `stages`
steps ahead by TMA.

The output is out^T [N, M], or out [M, N] with `Launch.rows_out` (the sums stored transposed into shared
memory element by element, `_store_transposed`). Programs wider than a TMA copy (`BOX`) take their
words, exponents, biases and outputs in several copies. A tile whose expert is G (past the layout's rows
in use) does nothing. Interpreted (CI), the decoding is
jnp arithmetic on the codes (`mxfp4.e2m1`), and the weights and x's tiles go through shared memory, x's
transposed (the Mosaic GPU interpreter runs no register operand and no transposed view).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int, UInt8, UInt32

from gptoss_mla_jax.flash_decode_mosaic import swizzled
from gptoss_mla_jax.gmm import E2M1_ASM
from gptoss_mla_jax.mxfp4 import BLOCK, FOLDABLE_EXPONENT, e2m1

ROWS = 32  # the activations' rows a program multiplies by default: a wgmma's n, the layout's row tile
PIECE = 64  # weight rows a wgmma multiplies (its m)
STEP_BYTES = 32  # packed bytes of a weight row per step: 64 contraction values, two scale blocks
WORDS = STEP_BYTES // 4
SWIZZLE = 64  # bytes: rows of 32 bf16 values (the activations' tiles [rows, 32], the interpreter's weights)
BOX = 256  # the most elements a TMA copy takes along a dimension
TILE_WORDS = 32  # words a row of a step's weight tile as copied (128 bytes; WORDS would be a weight row)


@dataclasses.dataclass(frozen=True)
class Launch:
    """A product's launch: `cols` weight rows a program (a multiple of 64; gate_up's a multiple of 128,
    half gates, half ups), `stages` steps of loads in flight; `rows_out`: the output written as out
    [M, N] (each program's sums stored transposed into shared memory, element by element, then copied by
    TMA) instead of out^T [N, M]; `rows`: the layout's rows a program multiplies (32 or 64, the wgmma's
    n; both products of a layer take the same), None to leave it to the batch (`at_pairs`)."""

    cols: int = 128
    stages: int = 4
    rows_out: bool = False
    rows: int | None = ROWS


# Chosen at gpt-oss-20b's shapes on an H100 among program widths, stages, outputs as rows or transposed and
# row tiles (docs/decode.md, "The wide-batch kernel"); `eval.bench.decode --moe --wide-launches` times others
LAUNCH = {
    "gate_up": Launch(cols=128, stages=4, rows=None),
    "down": Launch(cols=192, stages=4, rows_out=True, rows=None),
}
# Mean token-expert pairs an expert above which the layout's tiles are 64 rows: an expert's weights then
# decoded once for up to 64 pairs (batch 256's 32 on average, many above), against 32-row tiles that halve
# the padding rows where most experts get fewer (batch 128's 16)
ROWS_64_ABOVE = 24


def at_pairs(launch: Launch, pairs: float) -> Launch:
    """`launch` at a batch of `pairs` token-expert pairs an expert on average: its row tile where it
    leaves it open (`ROWS_64_ABOVE`)."""
    if launch.rows is not None:
        return launch
    return dataclasses.replace(launch, rows=64 if pairs > ROWS_64_ABOVE else ROWS)


class Packed(NamedTuple):
    """One product's experts as the kernel reads them (`pack`, `exponents`): words [G, N / cols, K / 64,
    cols, 8] and exponents [G, K / 32, N]."""

    words: UInt32[Array, "G Nc S C W"]
    exponents: UInt8[Array, "G Kg N"]


class WideExperts(NamedTuple):
    """Both products' experts and biases for the kernel (`prepare`): gate_up's rows in `glu_rows`' order."""

    gate_up: Packed
    gate_up_bias: Float[Array, "G N"]
    down: Packed
    down_bias: Float[Array, "G D"]


def permute_bytes(blocks: UInt8[Array, "... K2"]) -> UInt8[Array, "... K2"]:
    """Each 32-byte piece of the last axis reordered, new[8q + 2j + t] = old[8j + 2q + t] (its own
    inverse): a thread's bytes of the wgmma register layout together (the module docstring)."""
    *lead, K2 = blocks.shape
    pieces = blocks.reshape(*lead, K2 // STEP_BYTES, 4, 4, 2)
    return jnp.swapaxes(pieces, -3, -2).reshape(*lead, K2)


def by_halves(blocks: UInt8[Array, "... Kg 16"]) -> UInt8[Array, "... K2"]:
    """The checkpoint's packed bytes (byte j of a block: values 2j, 2j + 1) repacked so that byte j of each
    run of 64 values holds values j (low nibble) and 32 + j (high)."""
    *lead, Kg, _ = blocks.shape
    pairs = blocks.reshape(*lead, Kg // 2, 32)
    values = jnp.stack([pairs & 0xF, pairs >> 4], axis=-1).reshape(*lead, Kg // 2, 64)
    return (values[..., :32] | (values[..., 32:] << 4)).reshape(*lead, Kg * 16)


def pack(blocks: UInt8[Array, "G N Kg 16"], cols: int) -> UInt32[Array, "G Nc S C W"]:
    """The checkpoint's packed bytes as the kernel reads them: by halves (`by_halves`), permuted
    (`permute_bytes`), as words, each program's step a contiguous tile of `cols` rows."""
    G, N, Kg, _ = blocks.shape
    words = jax.lax.bitcast_convert_type(permute_bytes(by_halves(blocks)).reshape(G, N, -1, 4), jnp.uint32)
    steps = Kg * 16 // STEP_BYTES
    return words.reshape(G, N // cols, cols, steps, WORDS).transpose(0, 1, 3, 2, 4)


def exponents(scales: UInt8[Array, "G N Ga"], K: int) -> UInt8[Array, "G Kg N"]:
    """Scale exponents [G, N, K / 32] (or their rows padded by `mxfp4.pad_scales`) -> [G, K / 32, N]."""
    return jnp.swapaxes(scales[..., : K // BLOCK], 1, 2)


def glu_rows(F: int, cols: int) -> np.ndarray:
    """gate_up's row order for the kernel: program n's `cols` rows are the gates of outputs [n cols / 2,
    (n + 1) cols / 2), then their ups (the checkpoint interleaves gate 2j and up 2j + 1 of output j)."""
    j = np.arange(F).reshape(-1, cols // 2)
    return np.concatenate([2 * j, 2 * j + 1], axis=1).reshape(-1)


def refusal(K: int, N: int, launch: Launch, glu: bool) -> str | None:
    """Why the kernel does not run a product of K contraction values into N outputs at `launch` (None: it
    does)."""
    if K % (2 * STEP_BYTES) or K // BLOCK > BOX:
        return (
            f"contraction {K}: the wide-batch MXFP4 kernel takes steps of {2 * STEP_BYTES} values, up to "
            f"{BOX * BLOCK} (a program's exponents in one copy a column block)"
        )
    if launch.cols % (2 * PIECE if glu else PIECE) or N % launch.cols:
        need = "a multiple of 128 (64 gates, 64 ups)" if glu else "a multiple of 64"
        return f"{N} outputs in programs of {launch.cols} rows: the rows must divide them and be {need}"
    if launch.cols > (most := BOX * TILE_WORDS // WORDS):
        return f"programs of {launch.cols} rows: a step's weight tile is one TMA copy, up to {most} rows"
    if launch.stages < 2:
        return f"stages {launch.stages}: the kernel loads at least one step ahead"
    if launch.rows not in (None, 32, 64):
        return f"rows {launch.rows}: the kernel's programs multiply tiles of 32 or 64 rows"
    return None


def decodes(experts: dict) -> bool:
    """Whether the kernel's one-multiply decoding takes every scale exponent of one layer's MXFP4 experts
    (none above `mxfp4.FOLDABLE_EXPONENT`), read from their values."""
    largest = max(int(jnp.max(experts[f"{name}_scales"])) for name in ("gate_up_proj", "down_proj"))
    return largest <= FOLDABLE_EXPONENT


def prepare(experts: dict, F: int, decodable: bool | None = None) -> WideExperts | None:
    """The experts of one layer (`model` names: MXFP4 `*_blocks`, `*_scales`, float biases) laid out for
    the kernel at `LAUNCH`, or None where it cannot run them: dense experts, shapes it refuses, or a scale
    exponent above `mxfp4.FOLDABLE_EXPONENT` (its one-multiply decoding), which it reads from the values
    unless `decodable` says (abstract experts: a compile without weights)."""
    if "gate_up_proj_blocks" not in experts:
        return None
    gate_up_blocks, down_blocks = experts["gate_up_proj_blocks"], experts["down_proj_blocks"]
    _, N2, Kg, _ = gate_up_blocks.shape
    K = Kg * BLOCK
    D = down_blocks.shape[1]
    if (
        refusal(K, N2, LAUNCH["gate_up"], glu=True) is not None
        or refusal(F, D, LAUNCH["down"], glu=False) is not None
        or N2 != 2 * F
        or F % (LAUNCH["gate_up"].cols // 2)
    ):
        return None
    if not (decodes(experts) if decodable is None else decodable):
        return None
    order = glu_rows(F, LAUNCH["gate_up"].cols)
    gate_up = Packed(
        pack(gate_up_blocks[:, order], LAUNCH["gate_up"].cols),
        exponents(experts["gate_up_proj_scales"][:, order], K),
    )
    down = Packed(pack(down_blocks, LAUNCH["down"].cols), exponents(experts["down_proj_scales"], F))
    f32 = jnp.float32
    return WideExperts(
        gate_up,
        experts["gate_up_proj_bias"][:, order].astype(f32),
        down,
        experts["down_proj_bias"].astype(f32),
    )


# ---- decoding ------------------------------------------------------------------------------------------


def _decoded_in_registers(words, scales, rows: int):
    """The words [rows, 8] (wgmma register layout: a thread's 2 words of a row are its 8 bytes) and the
    low and high nibbles' scales broadcast to [rows, 32] -> their values [rows, 32] bf16, in the wgmma
    register layout: register (r, j) of a thread holds its columns 8j + 2q, + 1, decoded from bytes
    2j, 2j + 1 of its 8 (word j // 2)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    layout = plgpu.Layout.WGMMA
    values = plgpu.ShapeDtypeStruct((rows, STEP_BYTES), jnp.bfloat16, layout=layout)

    @plgpu.inline_mgpu(arg_types=(layout, (layout, layout)), return_type=(values, values))
    def decode(_, words_fa, scale_fas):
        i32 = ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        both = ir.Type.parse("!llvm.struct<(i32, i32)>")
        shape = scale_fas[0].registers.shape
        low, high = np.empty(shape, dtype=object), np.empty(shape, dtype=object)
        for index in np.ndindex(words_fa.registers.shape):
            for w in range(2):  # word w: columns j = 2w, 2w + 1
                word = vector.extract(words_fa.registers[index], [], [w])
                at = [(index[0], j, *index[2:]) for j in (2 * w, 2 * w + 1)]
                for name, out, scale_fa in (("low", low, scale_fas[0]), ("high", high, scale_fas[1])):
                    scale = mgpu_utils.bitcast(scale_fa.registers[at[0]], i32)
                    # the grouped matmul's decoding, both pairs of the word under one scale
                    asm = E2M1_ASM[name, True]
                    result = llvm.inline_asm(both, [word, scale, scale], asm, "=r,=r,r,r,r")
                    for k in range(2):
                        out[at[k]] = mgpu_utils.bitcast(llvm.extractvalue(i32, result, [k]), pair)
        array = lambda regs: mgpu.FragmentedArray(
            _registers=regs, _layout=scale_fas[0].layout, _is_signed=None
        )
        return array(low), array(high)

    return decode(words, tuple(scales))


def _decoded(words, exps, rows: int, interpret: bool):
    """A step's weights: words [rows, 8] and the two blocks' exponents [rows] each -> the step's first and
    second 32 contraction values [rows, 32] each in bf16 (its low and high nibbles)."""
    # 2^(e - 1): the block's scale times 2^126, which the decoding's 2^-126 cancels
    scales = [lax.bitcast_convert_type((e.astype(jnp.int16) + 126) << 7, jnp.bfloat16) for e in exps]
    wide = [lax.broadcast_in_dim(s, (rows, STEP_BYTES), (0,)) for s in scales]
    if not interpret:
        return _decoded_in_registers(words, wide, rows)
    packed = permute_bytes(lax.bitcast_convert_type(words, jnp.uint8).reshape(rows, STEP_BYTES))
    codes = packed.astype(jnp.int32)
    return [
        (e2m1(c) * (scale.astype(jnp.float32) * 2.0**-126)).astype(jnp.bfloat16)
        for c, scale in ((codes & 0xF, wide[0]), (codes >> 4, wide[1]))
    ]


# ---- the kernel ----------------------------------------------------------------------------------------


def _kernel(expert_g, x_g, words_g, exps_g, bias_g, out_g, *, cols: int, steps: int, stages: int,
            tile: int, glu, transposed: bool, rows_out: bool, interpret: bool):  # fmt: skip
    """Program (n, i): out^T[n's outputs, tile i's rows] (`tile` of them) through tile i's expert;
    x_g [M, K], or [K, M] where `transposed`; words_g [G, N / cols, steps, cols * 8 / r, r] (r words a
    row); exps_g [G, K / 32, N]; bias_g [G, N] float32; out_g [N or N / 2, M] ([M, N or N / 2] where
    `rows_out`)."""
    n, i = lax.axis_index("n"), lax.axis_index("i")
    e = expert_g[i]
    G = words_g.shape[0]
    rows = pl.ds(i * tile, tile)
    pieces = cols // PIECE
    boxes = [pl.ds(a, min(BOX, cols - a)) for a in range(0, cols, BOX)]  # TMA copies of the columns
    f32, bf16 = jnp.float32, jnp.bfloat16

    def scope(first_s, second_s, words_s, exps_s, bias_s, loaded, ready, *interpreted):
        def fetch(s):  # step s's activations (its two runs of 32 values) and its weights
            slot = lax.rem(s, stages)
            for half, x_s in enumerate((first_s, second_s)):
                values = pl.ds(2 * s * STEP_BYTES + half * STEP_BYTES, STEP_BYTES)
                source = x_g.at[values, rows] if transposed else x_g.at[rows, values]
                plgpu.copy_gmem_to_smem(source, x_s.at[slot], loaded.at[slot])
            step_words = words_s.at[slot]
            if words_g.shape[-1] != WORDS:  # the tile's rows of 128 bytes into the step's [cols, 8] words
                step_words = step_words.reshape(words_g.shape[-2:])
            plgpu.copy_gmem_to_smem(words_g.at[e, n, s], step_words, loaded.at[slot])

        for box in boxes:  # the program's exponents and biases
            part = pl.ds(n * cols + box.start, box.size)
            plgpu.copy_gmem_to_smem(exps_g.at[e, :, part], exps_s[box.start // BOX], ready)
            plgpu.copy_gmem_to_smem(bias_g.at[e, part], bias_s.at[box], ready)
        for s in range(min(stages - 1, steps)):
            fetch(s)
        plgpu.barrier_wait(ready)

        def walk(acc_refs):
            @pl.loop(0, steps)
            def _(s):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(loaded.at[slot])
                operands = [x_s.at[slot] for x_s in (first_s, second_s)]  # [32 values, tile] each
                if not transposed and interpret:  # the interpreter's copies of x's tiles, transposed
                    for x_s, x_t_s in zip((first_s, second_s), interpreted[2:], strict=True):
                        x_t_s[...] = x_s[slot].T
                    plgpu.commit_smem()
                    operands = interpreted[2:]
                elif not transposed:
                    operands = [ref.transpose((1, 0)) for ref in operands]
                for p, acc_ref in enumerate(acc_refs):
                    mine = pl.ds(p * PIECE, PIECE)
                    # the piece's exponents, in its copy's buffer (a column cut of one is not contiguous)
                    box_exps, at = exps_s[p * PIECE // BOX], pl.ds(p * PIECE % BOX, PIECE)
                    if interpret:
                        words = words_s[slot, mine]
                        exps = [box_exps[2 * s + b, at] for b in range(2)]
                    else:
                        words = plgpu.load(words_s.at[slot, mine], (), layout=plgpu.Layout.WGMMA)
                        exps = [
                            plgpu.load(box_exps.at[2 * s + b, at], (), layout=plgpu.Layout.WGMMA.reduce(1))
                            for b in range(2)
                        ]
                    low, high = _decoded(words, exps, PIECE, interpret)
                    if interpret:  # no register operand there: the values through shared memory
                        low_s, high_s = interpreted[:2]
                        low_s[...], high_s[...] = low, high
                        plgpu.commit_smem()
                        low, high = low_s, high_s
                    plgpu.wgmma(acc_ref, low, operands[0])
                    plgpu.wgmma(acc_ref, high, operands[1])
                # every product done before the next step's decoding may take their registers
                plgpu.wgmma_wait(0)

                @pl.when(s + stages - 1 < steps)
                def _():
                    fetch(s + stages - 1)

            return [ref[...] for ref in acc_refs]

        sums = pl.run_scoped(walk, [plgpu.ACC((PIECE, tile), f32) for _ in range(pieces)])
        if interpret:
            bias = [bias_s[pl.ds(p * PIECE, PIECE)] for p in range(pieces)]
        else:
            bias = [
                plgpu.load(bias_s.at[pl.ds(p * PIECE, PIECE)], (), layout=plgpu.Layout.WGMMA.reduce(1))
                for p in range(pieces)
            ]
        sums = [acc + lax.broadcast_in_dim(b, (PIECE, tile), (0,)) for acc, b in zip(sums, bias, strict=True)]
        if glu is None:
            return sums
        gates, ups = sums[: pieces // 2], sums[pieces // 2 :]
        return [_swiglu(g, u, glu) for g, u in zip(gates, ups, strict=True)]

    x_shape = (STEP_BYTES, tile) if transposed else (tile, STEP_BYTES)
    x_tile = plgpu.SMEM((stages, *x_shape), x_g.dtype, transforms=swizzled(x_g.dtype, SWIZZLE))
    interpreted = []
    if interpret:  # the weights' values, then x's tiles transposed
        interpreted = [plgpu.SMEM((PIECE, STEP_BYTES), bf16, transforms=swizzled(bf16, SWIZZLE))] * 2
        interpreted += [plgpu.SMEM((STEP_BYTES, tile), bf16, transforms=swizzled(bf16, SWIZZLE))] * 2

    @pl.when(e < G)
    def _():
        outs = pl.run_scoped(
            scope, x_tile, x_tile, plgpu.SMEM((stages, cols, WORDS), jnp.uint32),
            [plgpu.SMEM((exps_g.shape[1], box.size), jnp.uint8) for box in boxes], plgpu.SMEM((cols,), f32),
            plgpu.Barrier(num_arrivals=3, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2 * len(boxes)), *interpreted,
        )  # fmt: skip
        width = len(outs) * PIECE
        parts = [pl.ds(a, min(BOX, width - a)) for a in range(0, width, BOX)]  # the output's TMA copies

        def write(o_s):
            for p, out in enumerate(outs):
                o_s[pl.ds(p * PIECE, PIECE)] = out.astype(o_s.dtype)
            plgpu.commit_smem()
            for part in parts:
                plgpu.copy_smem_to_gmem(
                    o_s.at[part], out_g.at[pl.ds(n * width + part.start, part.size), rows]
                )
            plgpu.wait_smem_to_gmem(0)

        def write_rows(*o_s):  # a buffer [tile, copy's columns] per copy: column cuts are not contiguous
            for p, out in enumerate(outs):
                part = p * PIECE // BOX
                at = pl.ds(p * PIECE % BOX, PIECE)
                if interpret:
                    o_s[part][:, at] = out.astype(out_g.dtype).T
                else:
                    _store_transposed(out.astype(out_g.dtype), o_s[part].at[:, at])
            plgpu.commit_smem()
            for part, o_part in zip(parts, o_s, strict=True):
                plgpu.copy_smem_to_gmem(o_part, out_g.at[rows, pl.ds(n * width + part.start, part.size)])
            plgpu.wait_smem_to_gmem(0)

        if rows_out:
            pl.run_scoped(write_rows, *[plgpu.SMEM((tile, part.size), out_g.dtype) for part in parts])
        else:
            pl.run_scoped(write, plgpu.SMEM((width, tile), out_g.dtype))


def _store_transposed(values, ref):
    """values [64, rows] (wgmma register layout) into ref [rows, 64] transposed, element by element."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=None)
    def store(_, values_fa, ref_memref):
        index = ir.IndexType.get()
        for reg, (r, c) in zip(
            values_fa.registers.flat, values_fa.layout.thread_idxs(values_fa.shape), strict=True
        ):
            for k in range(ir.VectorType(reg.type).shape[0]):  # the register's consecutive columns
                column = arith.addi(c, arith.constant(index, k))
                memref.store(vector.extract(reg, [], [k]), ref_memref, [column, r])

    store(values, ref)


def _swiglu(gate, up, glu):
    """gpt-oss's clamped SwiGLU (`gmm.Glu`) on float32 tiles, its sigmoid as 1 / (1 + e^-x)."""
    gate = jnp.minimum(gate, glu.limit)
    up = jnp.minimum(jnp.maximum(up, -glu.limit), glu.limit)
    return (up + 1.0) * gate / (1.0 + jnp.exp(-glu.alpha * gate))


@functools.partial(jax.jit, static_argnames=("glu", "transposed", "launch", "interpret"))
def product_t(
    x: Float[Array, "M K"] | Float[Array, "K M"],
    tile_expert: Int[Array, " T"],
    packed: Packed,
    bias: Float[Array, "G N"],
    glu=None,
    transposed: bool = False,
    launch: Launch = Launch(),
    interpret: bool = False,
) -> Float[Array, "No M"] | Float[Array, "M No"]:
    """out^T [N, M] (N / 2 with `glu`, a `gmm.Glu`; out [M, N] at a launch with `rows_out`) of the aligned
    layout's rows x [M, K] (x^T [K, M] where `transposed`; M a multiple of `launch.rows`, bf16) through tile
    t's expert `tile_expert[t]` (G: no expert, its rows left unwritten), weights `packed` (`pack` at
    `launch.cols`), plus `bias` [G, N] (in `packed`'s row order), in bf16 with float32 sums."""
    K, M = x.shape if transposed else x.shape[::-1]
    _, tiles_n, steps, cols, _ = packed.words.shape
    N = tiles_n * cols
    if (reason := refusal(K, N, launch, glu is not None)) is not None or cols != launch.cols:
        raise ValueError(reason or f"weights packed for programs of {cols} rows, launch {launch}")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"x in {x.dtype}: the wide-batch MXFP4 kernel decodes to bf16 and takes bf16 x")
    tile = launch.rows
    if tile is None:
        raise ValueError(f"launch {launch} leaves its row tile to the batch: take `at_pairs`' launch")
    if M % tile or tile_expert.shape[0] != M // tile or steps != K // (2 * STEP_BYTES):
        raise ValueError(
            f"x {x.shape} (transposed: {transposed}), {tile_expert.shape[0]} tiles, weights "
            f"{packed.words.shape}: rows must be {tile}-row tiles, one expert a tile, and the weights' steps "
            "K / 64"
        )
    width = N // 2 if glu is not None else N
    kernel = functools.partial(
        _kernel, cols=cols, steps=steps, stages=launch.stages, tile=tile, glu=glu, transposed=transposed,
        rows_out=launch.rows_out, interpret=interpret,
    )  # fmt: skip
    interpret_params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret_params = InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((M, width) if launch.rows_out else (width, M), x.dtype),
        grid=(tiles_n, M // tile),
        grid_names=("n", "i"),
        interpret=interpret_params,
    )
    # each step's tile copied as rows of TILE_WORDS words (the interpreter takes no reshaped buffer)
    row = WORDS if interpret else TILE_WORDS
    words = packed.words.reshape(*packed.words.shape[:3], cols * WORDS // row, row)
    return call(tile_expert.astype(jnp.int32), x, words, packed.exponents, bias.astype(jnp.float32))
