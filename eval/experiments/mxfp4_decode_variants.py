"""Ways to decode MXFP4 bytes in the grouped matmul's compiled kernels, timed against each other on one
layer's MoE at decode batches (gpt-oss-20b's shape, scale rows padded as `generate` gives them):

- "two_multiplies": the codes' bits placed as bf16 values times 2^-126, then 2^126 and the block's scale
  applied as two bf16x2 multiplies (the kernels' way before the folded decoding);
- "folded": one multiply by the scale times 2^126 (what `gmm.E2M1_ASM[..., True]` does now, for tensors
  whose exponents are at most `mxfp4.FOLDABLE_EXPONENT`);
- "shifts", "shifts_folded": the same with each nibble's sign and magnitude bits moved by two shifts and
  three logic operations per pair of values, where `gmm.E2M1_ASM` masks the 4 bytes' nibbles once and
  moves both parts of a pair by one integer multiply;
- "byte_order", "byte_order_folded": the same with each 4 packed bytes stored in the order (0, 2, 1, 3),
  so that a word's two bytes that decode into one bf16x2 word lie 16 bits apart and need no `prmt` to be
  spread. Not elementwise: it relies on each inline-asm call getting 4 consecutive bytes of a row, which
  every output's equality with the first variant's checks on the GPU.

The folded way is taken or not by the scale rows' flag (`mxfp4.pad_scales`), the shifts by replacing
`gmm.E2M1_ASM`, the byte order by replacing it and storing the blocks so, so each variant times exactly the
kernels `moe_sparse` launches;
every output must equal the first variant's bit for bit. Also: the routing's fixed cost (the routing kernel
over a contraction of 256 rows against 2880) and XLA's router product alone.

    python -m eval.experiments.mxfp4_decode_variants --out eval/results/mxfp4_decode_variants_h200.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from gptoss_mla_jax import gmm

# (the decoding's PTX: the kernels' own, "shifts" or "byte_order" (bytes stored in the order 0, 2, 1, 3);
# the 2^126 folded into the scale)
VARIANTS = {
    "two_multiplies": ("default", False),
    "folded": ("default", True),
    "shifts": ("shifts", False),
    "shifts_folded": ("shifts", True),
    "byte_order": ("byte_order", False),
    "byte_order_folded": ("byte_order", True),
}
# Byte order (0, 2, 1, 3): a word holds bytes 0 and 1 at bits 0-7 and 16-23, bytes 2 and 3 at 8-15 and
# 24-31. Per output word ($0: bytes 0-1, $1: bytes 2-3): the left shifts (negative: right) that move the
# nibbles' sign bits to 15 / 31 and their magnitudes to bits 6-8 / 22-24.
ORDERED_SHIFTS = {"low": ((12, 6), (4, -2)), "high": ((8, 2), (0, -6))}


def _shift(dst: str, k: int) -> str:
    return (
        f"shl.b32 {dst}, $2, {k};" if k > 0 else f"shr.b32 {dst}, $2, {-k};" if k else f"mov.b32 {dst}, $2;"
    )


def _finish(lines: list[str], out: int, scale: str, folded: bool) -> list[str]:
    """The sign (a) and magnitude (b) bits, shifted into place, masked, combined and scaled into $out."""
    bias = [] if folded else ["mul.rn.bf16x2 a, a, bias;"]
    combine = ["and.b32 a, a, 0x80008000;", "and.b32 b, b, 0x01C001C0;", "or.b32 a, a, b;"]
    return [*lines, *combine, *bias, f"mul.rn.bf16x2 ${out}, a, {scale};"]


def shifts_asm(nibble: str, folded: bool) -> str:
    """`gmm.E2M1_ASM[nibble, folded]` with two shifts and three logic operations per pair of values."""
    sign, magnitude = {"low": (12, 6), "high": (8, 2)}[nibble]
    lines = ["{", ".reg .b32 z, w, a, b, bias;", "mov.b32 z, 0;", "mov.b32 bias, 0x7E807E80;"]
    for out, (select, scale) in enumerate(((0x4140, "$3"), (0x4342, "$4"))):
        lines += [f"prmt.b32 w, $2, z, {select:#x};", f"shl.b32 a, w, {sign};", f"shl.b32 b, w, {magnitude};"]
        lines = _finish(lines, out, scale, folded)
    return "\n".join([*lines, "}"])


def variant_asm(nibble: str, folded: bool) -> str:
    """`gmm.E2M1_ASM[nibble, folded]` for bytes stored in the order (0, 2, 1, 3)."""
    lines = ["{", ".reg .b32 a, b, bias;", "mov.b32 bias, 0x7E807E80;"]
    for out, ((sign, magnitude), scale) in enumerate(zip(ORDERED_SHIFTS[nibble], ("$3", "$4"), strict=True)):
        lines = _finish([*lines, _shift("a", sign), _shift("b", magnitude)], out, scale, folded)
    return "\n".join([*lines, "}"])


ASM = {"shifts": shifts_asm, "byte_order": variant_asm}


def stored_order(packed):
    """Bytes (0, 1, 2, 3) of every 4 along the last axis as (0, 2, 1, 3) (its own inverse)."""
    q = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 4, 4)
    return q[..., jnp.array([0, 2, 1, 3])].reshape(packed.shape)


def variant_params(p, asm: str, folded: bool):
    """One layer's MoE parameters for a variant: the blocks in the variant's byte order, and the padded
    scale rows' flag (`mxfp4.pad_scales`, in the first byte past the exponents) saying whether to fold."""
    experts = dict(p["experts"])
    for name, value in p["experts"].items():
        if name.endswith("_blocks") and asm == "byte_order":
            experts[name] = stored_order(value)  # 16 bytes a block: groups of 4 never straddle blocks
        elif name.endswith("_scales"):
            groups = p["experts"][name.replace("_scales", "_blocks")].shape[-2]
            if value.shape[-1] > groups:
                experts[name] = value.at[..., groups].set(int(folded))
    return {**p, "experts": experts}


def main(argv=None) -> int:
    from eval.bench.decode_moe import moe_layer
    from eval.bench.timing import device_us, run_header
    from gptoss_mla_jax import flash_decode, routing
    from gptoss_mla_jax.attention import linear
    from gptoss_mla_jax.config import GPT_OSS_20B
    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.gmm import Tiles
    from gptoss_mla_jax.moe import ALIGN, moe_sparse
    from support.results import write_json

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--smoke", action="store_true", help="the demo config, on the CPU interpreter")
    args = parser.parse_args(argv)
    config = DEMO_CONFIG if args.smoke else GPT_OSS_20B
    p = jax.block_until_ready(moe_layer(config))
    out = {**run_header("eval.experiments.mxfp4_decode_variants", argv), "rows": []}
    launches = [None, dict(cols=64, depth=128, warps=4, stages=4)]  # None: the launch table's
    saved_asm, saved_launch = gmm.E2M1_ASM, gmm.LAUNCH
    # The variants' own decodings exist only as inline PTX: not on the CPU interpreter.
    variants = {k: v for k, v in VARIANTS.items() if not (args.smoke and v[0] != "default")}
    params_of = {name: variant_params(p, *ways) for name, ways in variants.items()}
    for batch in [int(b) for b in args.batches.split(",")]:
        x = jax.random.normal(jax.random.key(batch), (batch, 1, config.hidden_size), jnp.bfloat16)
        first = None
        for (name, (asm, _)), launch in ((v, lt) for v in variants.items() for lt in launches):
            row = {"batch": batch, "variant": name, "launch": launch or "default"}
            if launch is not None:
                swept = Tiles(rows=16, **launch)
                gmm.LAUNCH = {
                    **saved_launch,
                    **{(k, None, None): swept for k in ("mxfp4_small", "mxfp4_small_wide")},
                }
            if asm != "default":
                gmm.E2M1_ASM = {key: ASM[asm](*key) for key in saved_asm}
            try:
                fn = jax.jit(lambda p, x: moe_sparse(p, x, config, kernels=True))
                params = params_of[name]
                y = fn(params, x)
                first = y if first is None else first
                row |= {"same_as_first": bool((y == first).all())} | device_us(fn, params, x)
            except Exception as e:  # a variant that does not compile is recorded
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            finally:
                gmm.E2M1_ASM, gmm.LAUNCH = saved_asm, saved_launch
            print(json.dumps(row)[:600], flush=True)
            out["rows"].append(row)
    router, k = p["router"], config.num_experts_per_tok
    interpret = not flash_decode.runs_compiled()
    x = jax.random.normal(jax.random.key(1), (1, config.hidden_size), jnp.bfloat16)
    out["router_logits_xla"] = device_us(jax.jit(lambda r, x: x @ r["kernel"] + r["bias"]), router, x)
    for rows in (config.hidden_size, 256):
        kernel = jax.jit(
            lambda r, x, rows=rows: routing.decode_routing(
                x[:, :rows], r["kernel"][:rows], r["bias"], k, ALIGN, interpret=interpret
            )
        )
        out[f"routing_kernel_over_{rows}_rows"] = device_us(kernel, router, x)
    # The router's product by XLA (a single token as two rows, `attention.linear`), then top-k and the
    # layout in the kernel, against the one kernel that does all of it.
    fused = jax.jit(
        lambda r, x: routing.decode_routing(x, r["kernel"], r["bias"], k, ALIGN, interpret=interpret)
    )
    split = jax.jit(
        lambda r, x: routing.routing_of_logits(
            linear(x[:, None], {"kernel": r["kernel"]})[:, 0][None], r["bias"], k, ALIGN, x.dtype, interpret
        )
    )
    out["routing_split"] = []
    for batch in (1, 8, 64):
        x = jax.random.normal(jax.random.key(batch), (batch, config.hidden_size), jnp.bfloat16)
        same = all(
            bool((a == b).all()) for a, b in zip(fused(router, x)[2:], split(router, x)[2:], strict=True)
        )
        row = {
            "batch": batch,
            "same_layout": same,
            "fused": device_us(fused, router, x),
            "split": device_us(split, router, x),
        }
        print(json.dumps(row)[:600], flush=True)
        out["routing_split"].append(row)
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
