"""Generate text from a gpt-oss model (the library functions are `gptoss_mla_jax.generation`).

python -m gptoss_mla_jax.generate                       # the embedded teacher, or a tiny random model
python -m gptoss_mla_jax.generate --model DIR --prompt "Hello"   # a transformers checkpoint folder

Without --model it generates text from the small teacher that `python -m train.distill` (no arguments)
trains once and caches; before that exists, from a tiny random model (token ids: it has no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.generation import (
    DEMO_CONFIG,
    Sampling,
    experts_for_batch,
    generate,
    request_cuda_graphs,
)
from gptoss_mla_jax.model import forward_jit, init_params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        help="transformers folder or Orbax checkpoint (default: the embedded teacher if cached, else a tiny "
        "random demo model)",
    )
    parser.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json in --model)")
    parser.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument(
        "--decode-kernels", choices=["auto", "on", "off"], default="auto",
        help="decode steps on the Pallas kernels (auto: on a GPU with a 16-bit cache)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    request_cuda_graphs()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    tokenizer = None
    model = args.model or cached_teacher()
    if model:
        from weights.load import load_model

        config, params, tokenizer_folder = load_model(model, dtype, progress=False)
        if not args.model:
            print(f"the embedded teacher trained by `python -m train.distill` ({model})")
            args.prompt = args.prompt or (None if args.prompt_ids else list(TEXT_PROMPTS))
        if args.prompt:
            if tokenizer_folder is None:
                parser.error(f"--prompt needs a tokenizer.json with {args.model}; use --prompt-ids")
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(f"{tokenizer_folder}/tokenizer.json")
    else:
        config = DEMO_CONFIG
        params = init_params(config, jax.random.key(args.seed), dtype)
        print(
            f"demo: random gpt-oss-shaped model ({config.num_hidden_layers} layers, sliding window "
            f"{config.sliding_window}, {config.num_local_experts} experts) - no download needed; "
            "`python -m train.distill` trains a small teacher that this command then uses for text"
        )
    if tokenizer is not None:
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
    elif args.prompt_ids:
        prompts = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    elif args.prompt:
        parser.error("--prompt needs --model with a tokenizer.json; use --prompt-ids otherwise")
    else:
        rng = np.random.default_rng(args.seed)
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 23, 40)]

    eos = json_eos(config)
    options = dict(
        sampling=Sampling(args.temperature, args.top_k, args.seed),
        decode_kernels={"auto": None, "on": True, "off": False}[args.decode_kernels],
    )
    params = experts_for_batch(params, config, len(prompts), options["decode_kernels"])
    generate(params, config, prompts, 2, **options)  # compile
    t0 = time.perf_counter()
    outs = generate(
        params,
        config,
        prompts,
        args.max_new_tokens,
        eos_id=eos,
        **options,
    )
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    for prompt, out in zip(prompts, outs, strict=True):
        if tokenizer:
            print(f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(out)!r}")
        else:
            print(f"prompt ({len(prompt)} tokens) -> {out}")
    print(
        f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s, batch {len(prompts)}, {jax.devices()[0].platform})"
    )
    if args.temperature == 0:
        # The cached decode must agree with recomputing every sequence from scratch without a cache (the
        # forward compiled once per length: op by op it compiles each of its operations per length).
        agree = all(
            np.array_equal(
                np.argmax(np.asarray(forward_jit(params, jnp.asarray([p + o[:-1]]), None, config)[0][0]), -1)[
                    len(p) - 1 :
                ],
                o,
            )
            for p, o in zip(prompts, outs, strict=True)
        )
        print(f"greedy decode with the KV cache equals full recomputation: {agree}")


# Default prompts for the embedded teacher, which learned Python's standard library source.
TEXT_PROMPTS = ("import os\nimport sys\n", "def __init__(self, ", "class ")


def cached_teacher() -> str | None:
    """The embedded default's teacher, if `python -m train.distill` has trained it (its training log is
    written last)."""
    from train.embedded import embedded_teacher_dir

    folder = embedded_teacher_dir()
    return folder if os.path.isfile(os.path.join(folder, "train_log.json")) else None


def json_eos(config: GptOssConfig) -> int | None:
    """The first end-of-sequence id recorded in config.json, if any."""
    eos = json.loads(config.hf_extra).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


if __name__ == "__main__":
    main()
