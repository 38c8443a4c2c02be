"""Decode kernels at gpt-oss-20b shapes, each run a few times after compiling, for a hardware-counter profiler
to read (Nsight Compute): one layer's MoE on the grouped matmul (MXFP4 experts, decode layout) at the given
batches (on the wide-batch kernel where `--wide` and the batch takes it), and the decompressed-MLA attention
kernel at the given batch x context. `--smoke`: the same at a tiny size, interpreted on the CPU (a check of
the script).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k 'regex:mxfp4|decompressed' python3 -m eval.experiments.kernel_counters
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --metrics breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed -k regex:mosaic \
        python3 -m eval.experiments.kernel_counters --moe 256 --decompressed '' --wide
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from eval.bench.decode_moe import moe_layer, wide_params
from gptoss_mla_jax import flash_decode
from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig
from gptoss_mla_jax.generation import DEMO_CONFIG
from gptoss_mla_jax.moe import moe_sparse


def moe(batches: list[int], runs: int, config: GptOssConfig = GPT_OSS_20B, wide: bool = False) -> None:
    p = moe_layer(config)
    if wide:  # the experts' wide-batch layout beside the checkpoint's, as `generate` holds it on the GPU
        p, _ = wide_params(p, config, None)
        if p is None:
            raise SystemExit("--wide: the wide-batch kernel runs compiled, on a GPU (no layout made here)")
    step = jax.jit(lambda p, x: moe_sparse(p, x, config, kernels=True))
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, 1, config.hidden_size), jnp.bfloat16)
        for _ in range(runs):
            jax.block_until_ready(step(p, x))


def decompressed(batch: int, context: int, runs: int, smoke: bool = False) -> None:
    G, R, d, r = (2, 2, 16, 24) if smoke else (8, 8, 64, 192)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (batch, G, R, d), jnp.float32)
    c = jax.random.normal(keys[1], (batch, context, r), jnp.bfloat16)
    w = jax.random.normal(keys[2], (r, G, d), jnp.bfloat16) * r**-0.5
    b = jnp.zeros((G, d), jnp.bfloat16)
    angles = jnp.arange(context, dtype=jnp.float32)[None, :, None] * 1e-3 ** jnp.linspace(0, 1, d // 2)
    lengths = jnp.full((batch,), context, jnp.int32)
    P = flash_decode.kv_heads_per_program(G, R)
    launch = flash_decode.Launch(
        *flash_decode.plan_for(
            "decompressed", context, flash_decode.programs_per_slice("decompressed", batch, G, R)
        ),
        interpret=smoke,
    )
    print("decompressed launch", launch, flush=True)
    for _ in range(runs):
        key_up = flash_decode.grouped_key_up(w, b, P, c.dtype)
        out = flash_decode.decompressed_splits(
            q, c, key_up, (jnp.cos(angles), jnp.sin(angles)), lengths, launch=launch
        )
        jax.block_until_ready(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--moe", default="1,256", help="MoE batches ('' for none)")
    parser.add_argument("--decompressed", default="64,32768", help="BATCH,CONTEXT ('' for none)")
    parser.add_argument(
        "--wide", action="store_true",
        help="the MoE's experts with the wide-batch kernel's layout too (batches of 16 and more take it; "
        "GPU only)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, interpreted (CPU check)")
    args = parser.parse_args(argv)
    if args.moe:
        config = DEMO_CONFIG if args.smoke else GPT_OSS_20B
        moe([int(b) for b in args.moe.split(",")], args.runs, config, args.wide)
    if args.decompressed:
        decompressed(*(int(n) for n in args.decompressed.split(",")), args.runs, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
