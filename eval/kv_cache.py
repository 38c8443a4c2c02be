"""KV-cache size of a model, per layer type and in total, against the original GQA model.

    python -m eval.kv_cache --model PATH --context 32768 [--batch 1] [--dtype bf16]
    python -m eval.kv_cache --preset gpt-oss-20b [--latent-dim 160 --rope-mode partial --rope-pairs 2
                            --layers full] [--context 32768]

With `--model`, the model's own settings (GQA or MLA). With `--preset`, the preset converted with the
given MLA settings (the converter's defaults unless told otherwise); only the number of kept RoPE pairs
matters for the size, so the accounting uses pairs 0..n-1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax.numpy as jnp

from gptoss_mla_jax.cache import accounting
from gptoss_mla_jax.config import PRESETS, GptOssConfig, MlaConfig
from weights.to_mla import DEFAULT_ROPE_COMPONENTS, add_mla_flags, parse_layers

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp8": jnp.float8_e4m3fn}


def with_mla(
    config: GptOssConfig,
    latent_dim: int,
    rope_mode: str,
    rope_pairs: int,
    layers: str,
    rope_components: int = DEFAULT_ROPE_COMPONENTS,
    rope_fold: int = 1,
) -> GptOssConfig:
    chosen = parse_layers(layers, config)
    pairs = tuple(range(rope_pairs)) if rope_mode == "partial" else ()
    per_head = ((pairs,) * config.num_key_value_heads,) * len(chosen) if pairs else ()
    components, fold = ((rope_components,) * len(chosen), rope_fold) if rope_mode == "rorope" else ((), 1)
    return dataclasses.replace(
        config, mla=MlaConfig(rope_mode, chosen, (latent_dim,) * len(chosen), per_head, components, fold)
    )


def format_table(result: dict) -> str:
    gib = 1024**3
    lines = [f"KV cache, batch {result['batch']}, context {result['context']}, {result['dtype']}"]
    lines.append(f"{'layer type':48s} {'layers':>6s} {'values/token':>12s} {'GiB':>9s} {'share':>6s}")
    for kind, row in result["rows"].items():
        share = row["bytes"] / result["total_bytes"]
        size = row["bytes"] / gib
        lines.append(f"{kind:48s} {row['layers']:6d} {row['values_per_token']:12d} {size:9.3f} {share:6.1%}")
    lines.append(f"{'total':48s} {'':6s} {'':12s} {result['total_bytes'] / gib:9.3f}")
    lines.append(f"{'original GQA model':48s} {'':6s} {'':12s} {result['original_bytes'] / gib:9.3f}")
    lines.append(f"reduction vs the original: {result['reduction']:.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="transformers folder or Orbax checkpoint")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a preset, converted with the MLA flags")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_mla_flags(parser)
    args = parser.parse_args(argv)
    try:
        if args.model:
            from weights.load import load_config

            config = load_config(args.model)  # the config alone says the cache size
        else:
            config = with_mla(
                PRESETS[args.preset],
                args.latent_dim,
                args.rope_mode,
                args.rope_pairs,
                args.layers,
                args.rope_components,
                args.rope_fold,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = accounting(config, args.batch, args.context, DTYPES[args.dtype])
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
