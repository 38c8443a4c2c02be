"""Throughput of `eval.ppl`'s scoring on a gpt-oss-20b-shaped model with random bf16 weights.

    python -m eval.bench.ppl [--tokens 65536] [--max-length 1024] [--stride 512] [--batch 8] [--out FILE]

The token stream is random ids (throughput does not depend on the text). One untimed pass compiles;
then the median of `--repeats` timed passes is reported as scored tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.model import init_params
from gptoss_mla_jax.perplexity import perplexity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    config = GPT_OSS_20B
    params = jax.block_until_ready(init_params(config, jax.random.key(0), jnp.bfloat16))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, args.tokens).astype(np.int32)
    run = lambda: perplexity(params, config, ids, args.max_length, args.stride, args.batch, progress=False)
    perplexity(
        params,
        config,
        ids[: args.max_length * args.batch],
        args.max_length,
        args.stride,
        args.batch,
        progress=False,
    )
    times, result = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    windows = -(-(args.tokens - args.max_length) // args.stride) + 1
    out = {
        "command": " ".join(sys.argv),
        "device": jax.devices()[0].device_kind,
        "model": "gpt-oss-20b shape, random bf16 weights (dense experts)",
        "scored_tokens": result["tokens"],
        "median_seconds": seconds,
        "scored_tokens_per_s": result["tokens"] / seconds,
        "processed_tokens_per_s": windows * args.max_length / seconds,
        "times": times,
        **{k: getattr(args, k) for k in ("max_length", "stride", "batch")},
    }
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
