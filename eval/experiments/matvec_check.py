"""The one-row projection kernel (`matvec`) compiled on the GPU at gpt-oss-20b's batch-1 projections: its
agreement with XLA's product (a single token as two rows, `attention.linears`), both device busy times,
and the kernel's time over a sweep of launches (steps, column blocks, pipeline stages, programs).

Per projection (q / k / v in one launch, o_proj, an MLA layer's q / latent / RoPE key), bf16: the largest
difference from XLA's product, and the device busy microseconds of each (profiler: the kernels of one call,
including the sums of the partials and the bias where XLA runs them), with the weights' bytes over each
time. The sweep times `matvec` alone for each launch (`--sweep`), so the default (`matvec.LAUNCH`) can be
set from it.

    python -m eval.experiments.matvec_check --sweep --out eval/results/matvec_check_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from eval.bench.decode import device_us
from gptoss_mla_jax import attention
from gptoss_mla_jax.config import GPT_OSS_20B as CONFIG
from gptoss_mla_jax.flash_decode import runs_compiled
from gptoss_mla_jax.matvec import LAUNCH, MatvecLaunch, matvec
from support.results import write_json

D, H, G, d = CONFIG.hidden_size, CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.head_dim
# (name, input width, output widths): gpt-oss-20b's q / k / v and o_proj; an MLA layer at 192 values a
# token with one mixed RoPE component (q, latent 128, RoPE key 64).
PROJECTIONS = (
    ("qkv", D, (H * d, G * d, G * d)),
    ("o_proj", H * d, (D,)),
    ("mla_q_latent_rope", D, (H * d, 128, 64)),
)
SWEEP = [
    MatvecLaunch(depth, columns, 4, stages, LAUNCH.programs)
    for depth, columns, stages in itertools.product((16, 32, 64), (128, 256, 512), (2, 3, 4))
    if depth * columns <= 16384  # a step's tile: at most 128 float32 accumulators a thread
] + [LAUNCH._replace(warps=8), LAUNCH._replace(programs=132), LAUNCH._replace(programs=528)]


def weights(K: int, widths, seed: int = 0) -> list[dict]:
    keys = jax.random.split(jax.random.key(seed), 2 * len(widths))
    return [
        {"kernel": K**-0.5 * jax.random.normal(keys[2 * i], (K, n), jnp.bfloat16),
         "bias": jax.random.normal(keys[2 * i + 1], (n,), jnp.bfloat16)}
        for i, n in enumerate(widths)
    ]  # fmt: skip


def rows(names: list[str], sweep: bool) -> list[dict]:
    interpret = not runs_compiled()
    out = []
    for name, K, widths in (p for p in PROJECTIONS if p[0] in names):
        ps = weights(K, widths)
        x = jax.random.normal(jax.random.key(1), (1, 1, K), jnp.bfloat16)
        kernel = jax.jit(lambda x, ps: attention.linears(x, ps, True))
        xla = jax.jit(lambda x, ps: attention.linears(x, ps))
        got, want = kernel(x, ps), xla(x, ps)
        row = {"projection": name, "K": K, "widths": widths, "weight_mb": K * sum(widths) * 2 / 1e6}
        row["max_abs_error"] = max(
            float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max())
            for g, w in zip(got, want, strict=True)
        )
        row["max_abs"] = max(float(jnp.abs(w.astype(jnp.float32)).max()) for w in want)
        if not interpret:
            row["kernel"], row["xla"] = device_us(kernel, x, ps), device_us(xla, x, ps)
            for peer in ("kernel", "xla"):
                row[f"{peer}_tb_per_s"] = row["weight_mb"] / row[peer]["busy_us"]  # MB / us
            if sweep:
                kernels, flat = tuple(p["kernel"] for p in ps), x.reshape(-1)
                row["sweep"] = []
                for launch in SWEEP:
                    fn = jax.jit(lambda x, kernels, launch=launch: matvec(x, kernels, launch=launch))
                    try:
                        busy = device_us(fn, flat, kernels)["busy_us"]
                        row["sweep"].append({**launch._asdict(), "busy_us": busy})
                    except Exception as e:  # a launch that does not compile is recorded
                        row["sweep"].append({**launch._asdict(), "error": f"{type(e).__name__}: {e}"[:300]})
                timed = [r for r in row["sweep"] if "busy_us" in r]
                row["best"] = min(timed, key=lambda r: r["busy_us"]) if timed else None
                row["default"] = LAUNCH._asdict()
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [name for name, _, _ in PROJECTIONS]
    parser.add_argument("--projections", default=",".join(names), help=f"some of {','.join(names)}")
    parser.add_argument("--sweep", action="store_true", help="also time matvec over the launch sweep")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    chosen = args.projections.split(",")
    if set(chosen) - set(names):
        parser.error(f"--projections: {sorted(set(chosen) - set(names))} not among {names}")
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    result["rows"] = rows(chosen, args.sweep)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
