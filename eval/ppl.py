"""Perplexity with strided sliding windows, as in transformers' perplexity guide.

    python -m eval.ppl --model PATH [--data stdlib|python-doc|wikitext-2|FILE|DIR] [--split test]
        [--max-length 1024] [--stride 512] [--batch 8] [--dtype fp32|bf16] [--limit-tokens N]
        [--tokenizer DIR] [--compare TEACHER] [--json]

The corpus split is joined into one token stream. Window i starts at i * stride and is max_length long;
it scores only the tokens the previous window did not reach, so every token is scored exactly once and,
after the first window, with at least max_length - stride tokens of context. `--compare TEACHER` scores
the teacher on the same windows and adds its PPL and the mean per-token KL(teacher || model).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gptoss_mla_jax.model import forward
from train.data import iter_texts


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window, as in transformers' perplexity guide."""
    if stride > max_length:
        raise ValueError(f"--stride {stride} is larger than --max-length {max_length}")
    if n_tokens < 2:
        raise ValueError(f"the corpus holds {n_tokens} tokens; at least 2 are needed to score one")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        # Target positions (in the window) scored by this window; position 0 has no prediction.
        windows.append((begin, end, max(end - prev_end, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return [(b, e, max(e - b - t, 1)) for b, e, t in windows]


@functools.partial(jax.jit, static_argnames=("config", "teacher_config"))
def _score(params, tokens, lengths, first, config, teacher=None, teacher_config=None):
    """Per batch: summed NLL of the scored tokens, their count, and (with a teacher) its NLL and the KL."""
    logp = jax.nn.log_softmax(forward(params, tokens, None, config)[0][:, :-1], axis=-1)
    target = tokens[:, 1:]
    pos = jnp.arange(1, tokens.shape[1])[None, :]
    mask = (pos >= first[:, None]) & (pos < lengths[:, None])
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    out = {"nll": jnp.where(mask, nll, 0).sum(), "count": mask.sum()}
    if teacher is not None:
        logq = jax.nn.log_softmax(forward(teacher, tokens, None, teacher_config)[0][:, :-1], axis=-1)
        t_nll = -jnp.take_along_axis(logq, target[..., None], axis=-1)[..., 0]
        kl = (jnp.exp(logq) * (logq - logp)).sum(-1)
        out["teacher_nll"] = jnp.where(mask, t_nll, 0).sum()
        out["kl"] = jnp.where(mask, kl, 0).sum()
    return out


def perplexity(
    params,
    config,
    ids: np.ndarray,
    max_length: int,
    stride: int,
    batch: int = 8,
    teacher=None,
    progress: bool = True,
) -> dict:
    """PPL (and, with `teacher=(params, config)`, the teacher's PPL and mean KL) over the token stream."""
    windows = plan_windows(len(ids), max_length, stride)
    totals: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(windows), batch), desc="scoring", unit="batch", disable=not progress):
        chunk = windows[i : i + batch]
        tokens = np.zeros((batch, max_length), np.int32)
        lengths, first = np.zeros(batch, np.int32), np.full(batch, max_length, np.int32)
        for j, (begin, end, start) in enumerate(chunk):
            tokens[j, : end - begin] = ids[begin:end]
            lengths[j], first[j] = end - begin, start
        t_params, t_config = teacher if teacher else (None, None)
        out = _score(
            params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(first), config, t_params, t_config
        )
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    seconds = time.perf_counter() - t0
    n = totals["count"]
    result = {"ppl": float(np.exp(totals["nll"] / n)), "nll": totals["nll"] / n, "tokens": int(n)}
    result["tokens_per_s"] = n / seconds
    if teacher:
        result["teacher_ppl"] = float(np.exp(totals["teacher_nll"] / n))
        result["kl"] = totals["kl"] / n
    return result


def corpus_ids(tokenizer, data: str, split: str, limit_tokens: int | None) -> np.ndarray:
    text = "\n\n".join(iter_texts(data, split))
    if not text.strip():
        raise ValueError(f"--data {data} ({split}) is empty")
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    return ids[:limit_tokens] if limit_tokens else ids


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
    parser.add_argument("--limit-tokens", type=int)
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
        ids = corpus_ids(tokenizer, args.data, args.split, args.limit_tokens)
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
