"""Perplexity with strided sliding windows, as in transformers' perplexity guide.

    python -m eval.ppl --model PATH [--data stdlib|python-doc|wikitext-2|FILE|DIR] [--split test]
        [--max-length 1024] [--stride 512] [--batch 8] [--dtype fp32|bf16]
        [--limit-tokens 65536 | --all-tokens] [--tokenizer DIR] [--compare TEACHER] [--json]

The corpus split is joined into one token stream. Window i starts at i * stride and is max_length long;
it scores only the tokens the previous window did not reach, so every token is scored exactly once and,
after the first window, with at least max_length - stride tokens of context. `--compare TEACHER` scores
the teacher on the same windows and adds its PPL and the mean per-token KL(teacher || model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from gptoss_mla_jax.perplexity import perplexity
from support.corpora import corpus_ids


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    from weights.load import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="transformers folder or Orbax checkpoint (GQA or MLA)")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--limit-tokens", type=int, default=65536,
        help="score the split's first N tokens (default 65536: about a minute for a small model on a CPU)",
    )  # fmt: skip
    budget.add_argument("--all-tokens", action="store_true", help="score the whole split")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model's)")
    parser.add_argument(
        "--compare", metavar="TEACHER", help="also score this model; report KL(teacher || model)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    try:
        if args.stride > args.max_length or args.stride < 1:
            raise ValueError(f"--stride {args.stride} must be in 1..--max-length ({args.max_length})")
        config, params, tokenizer_dir = load_model(args.model, dtype, progress=not args.json)
        tokenizer_dir = args.tokenizer or tokenizer_dir
        if tokenizer_dir is None or not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
            raise FileNotFoundError(f"--model {args.model} has no tokenizer.json; pass --tokenizer DIR")
        tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        ids = corpus_ids(tokenizer, args.data, args.split, None if args.all_tokens else args.limit_tokens)
        teacher = None
        if args.compare:
            t_config, t_params, _ = load_model(args.compare, dtype, progress=not args.json)
            teacher = (t_params, t_config)
        result = perplexity(
            params, config, ids, args.max_length, args.stride, args.batch, teacher, not args.json
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result.update(
        model=args.model,
        data=args.data,
        split=args.split,
        max_length=args.max_length,
        stride=args.stride,
        dtype=args.dtype,
        device=jax.devices()[0].device_kind,
    )
    if args.compare:
        result["teacher"] = args.compare
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"PPL {result['ppl']:.4f}  (mean NLL {result['nll']:.4f} over {result['tokens']} tokens, "
            f"{result['tokens_per_s']:.0f} tokens/s)"
        )
        if teacher:
            print(f"teacher PPL {result['teacher_ppl']:.4f}, mean KL(teacher || model) {result['kl']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
