"""The inline PTX that decodes MXFP4 bytes in the grouped matmul's compiled kernels (`gmm.E2M1_ASM`),
executed by a small interpreter of its instructions: every byte, with scales from subnormal to large,
gives the E2M1 values times the scale exactly, both ways it runs (the GPU run of `eval.bench.moe --check`
checks the hardware against the dequantized product)."""

import struct

import numpy as np
import pytest

from eval.experiments.mxfp4_decode_variants import shifts_asm
from gptoss_mla_jax.gmm import E2M1_ASM
from gptoss_mla_jax.mxfp4 import FOLDABLE_EXPONENT, FP4_VALUES


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def bf16_bits(value: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    assert bits & 0xFFFF == 0, f"{value} is not a bfloat16"  # every product here is exact
    return bits >> 16


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX (registers as 32-bit ints); returns every register."""
    regs = dict(operands)
    value = lambda token: int(token, 0) if token[0].isdigit() else regs[token]
    for line in asm.strip("{}\n").splitlines():
        if line.startswith(".reg"):
            continue
        op, args = line.rstrip(";").split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        a = [value(s) for s in src]
        if op == "mov.b32":
            out = a[0]
        elif op == "shl.b32":
            out = a[0] << a[1]
        elif op == "and.b32":
            out = a[0] & a[1]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "mul.lo.u32":
            out = a[0] * a[1]
        elif op == "prmt.b32":
            pool = (a[0] & 0xFFFFFFFF) | ((a[1] & 0xFFFFFFFF) << 32)
            out = sum(((pool >> (8 * ((a[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "mul.rn.bf16x2":
            halves = [bf16_bits(bf16_value(a[0] >> s) * bf16_value(a[1] >> s)) for s in (0, 16)]
            out = halves[0] | (halves[1] << 16)
        else:
            raise AssertionError(f"instruction {op} has no interpretation here")
        regs[dst] = out & 0xFFFFFFFF
    return regs


EXPONENTS = [0, 1, 100, 117, 127, 128, 136, 200]


@pytest.mark.parametrize(
    "exponent, folded",
    [(e, False) for e in EXPONENTS] + [(e, True) for e in EXPONENTS if e <= FOLDABLE_EXPONENT],
)
@pytest.mark.parametrize("nibble", ["low", "high"])
@pytest.mark.parametrize("way", ["kernels", "shifts"])
def test_every_byte_decodes_to_its_value_times_the_scale(nibble, exponent, folded, way):
    """Both ways: two multiplies (2^126, then the scale), or one by the scale times 2^126 (`folded`, for
    exponents up to `FOLDABLE_EXPONENT`, as the kernels' scales are then given); the kernels' PTX and the
    shifts variant that `eval.experiments.mxfp4_decode_variants` times beside it."""
    asm = E2M1_ASM[nibble, folded] if way == "kernels" else shifts_asm(nibble, folded)
    scale_bits = exponent << 7 if exponent else 0x40  # 2^(exponent - 127) in bfloat16
    scale = bf16_value(scale_bits)
    if folded:
        scale_bits = (exponent + 126) << 7  # 2^(exponent - 1), as the kernels build it
    pair = scale_bits | (scale_bits << 16)
    # Every byte at every position of the word, beside neighbours that differ from it in other bits.
    quads = [[b, b ^ 0x55, b ^ 0xAA, b ^ 0xFF] for b in range(256)]
    for packed in (quad[i:] + quad[:i] for quad in quads for i in range(4)):
        word = sum(b << (8 * i) for i, b in enumerate(packed))
        regs = run_ptx(asm, {"$2": word, "$3": pair, "$4": pair})
        got = [bf16_value(regs[r] >> s) for r in ("$0", "$1") for s in (0, 16)]
        codes = [b & 0xF if nibble == "low" else b >> 4 for b in packed]
        want = [float(FP4_VALUES[c]) * scale for c in codes]
        assert np.array_equal(np.signbit(got), np.signbit(want)) and got == want, (packed, got, want)


def test_past_the_foldable_exponents_the_scale_times_2_to_126_is_no_bfloat16():
    """Why the folded decoding stops at `FOLDABLE_EXPONENT`: one exponent more and 2^(e - 1) overflows."""
    assert bf16_value((FOLDABLE_EXPONENT + 126) << 7) == 2.0 ** (FOLDABLE_EXPONENT - 1)
    assert np.isinf(bf16_value((FOLDABLE_EXPONENT + 1 + 126) << 7))
