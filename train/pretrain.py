"""Train a small GPT-OSS-architecture model from scratch on real text (the stdlib corpus by default).

    python -m train.pretrain --out runs/teacher [--steps 400] [--batch 16] [--seq-len 512]

Random weights have no structure worth compressing, so conversion quality is measured on a model that
has learned something. The recipe (tokenizer, config, data, seed) is in this file; the weights are not
committed. Writes an Orbax checkpoint with the tokenizer (a byte-level BPE trained on the corpus).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig
from gptoss_mla_jax.model import forward, init_params
from support.corpora import iter_texts, token_windows
from train.data import training_batches

# GPT-OSS architecture scaled down: alternating sliding (window 128) / full layers, sinks, YaRN, MoE
# top-2 of 8, and G = 8 kv heads of head_dim 64 like the real model.
STUDY_CONFIG = GptOssConfig(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=128,
    max_position_embeddings=4096,
)


# The embedded default of `python -m train.distill` with no arguments: small enough to train on a 2-core
# CPU in about a minute, still 8 kv heads, alternating sliding / full layers, sinks, YaRN and an MoE.
TINY_CONFIG = GptOssConfig(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=64,
    max_position_embeddings=4096,
)
# gpt-oss-20b's attention exactly (hidden 2880, 64 query heads over 8 kv heads of 64, sinks, YaRN factor 32
# over 4,096 original positions, alternating 128-token sliding and full layers) in 4 layers, with a small
# MoE (top-2 of 8 experts of width 512) and the study's vocabulary: a teacher whose attention, the part
# MLA converts, is the real model's, cheap enough to train on one GPU in minutes.
ATTENTION_20B_CONFIG = dataclasses.replace(
    GPT_OSS_20B, vocab_size=4096, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
    intermediate_size=512, layer_types=(), hf_extra="{}",
)  # fmt: skip
CONFIGS = {"study": STUDY_CONFIG, "tiny": TINY_CONFIG, "20b-attention": ATTENTION_20B_CONFIG}


def train_tokenizer(source: str, vocab_size: int, max_chars: int = 20_000_000) -> Tokenizer:
    """Byte-level BPE on the first `max_chars` characters of the corpus' train split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    def texts():
        seen = 0
        for text in iter_texts(source, "train"):
            yield text
            seen += len(text)
            if seen >= max_chars:
                return

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator(texts(), trainer)
    return tok


def lm_loss(params, tokens, config):
    logits = forward(params, tokens[:, :-1], None, config).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def training_step(config: GptOssConfig, steps: int, lr: float):
    """(optimizer, jitted step (params, state, tokens) -> (params, state, loss)) of the recipe: AdamW with
    warm-up and cosine decay over `steps`, peak `lr`, gradients clipped to norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(lm_loss)(params, tokens, config)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return optimizer, step


def train(
    config: GptOssConfig, windows: np.ndarray, steps: int, batch: int, lr: float, seed: int
) -> tuple[dict, list]:
    params = init_params(config, jax.random.key(seed), jnp.float32)
    optimizer, step = training_step(config, steps, lr)
    state = optimizer.init(params)
    batches = training_batches(windows, batch, seed, jax.process_index(), jax.process_count())
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        tokens = jnp.asarray(next(batches))
        params, state, loss = step(params, state, tokens)
        if i % 50 == 0 or i == steps - 1:
            losses.append((i, float(loss)))
            print(f"step {i:5d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return params, losses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a teacher is trained (the command line's flags): corpus, config preset, steps, batch, window
    length, peak learning rate, seed, size of the training stream, text the BPE tokenizer is trained on."""

    data: str = "stdlib"
    config: str = "study"
    steps: int = 400
    batch: int = 16
    seq_len: int = 512
    lr: float = 1e-3
    seed: int = 0
    train_tokens: int = 4_000_000
    tokenizer_chars: int = 20_000_000


def train_teacher(out: str, recipe: Recipe) -> None:
    """Train a teacher by `recipe` and save it as an Orbax checkpoint at `out`, with its tokenizer and
    `train_log.json` (the recipe and the loss curve)."""
    from weights.orbax_io import save_checkpoint

    config = CONFIGS[recipe.config]
    tokenizer = train_tokenizer(recipe.data, config.vocab_size, recipe.tokenizer_chars)
    windows = token_windows(tokenizer, recipe.data, recipe.train_tokens, recipe.seq_len + 1, split="train")
    print(f"{len(windows)} training windows of {recipe.seq_len + 1} tokens")
    params, losses = train(config, windows, recipe.steps, recipe.batch, recipe.lr, recipe.seed)
    staging = f"{os.path.abspath(out)}.tokenizer"
    os.makedirs(staging, exist_ok=True)
    tokenizer.save(os.path.join(staging, "tokenizer.json"))
    save_checkpoint(out, params, config, step=recipe.steps, source=staging)
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"args": {"out": out, **dataclasses.asdict(recipe)}, "losses": losses}, f)


def main(argv=None) -> int:
    defaults = Recipe()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="Orbax checkpoint to create (with the tokenizer)")
    parser.add_argument("--data", default=defaults.data)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--train-tokens", type=int, default=defaults.train_tokens, help="size of the training stream"
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default=defaults.config)
    parser.add_argument(
        "--tokenizer-chars", type=int, default=defaults.tokenizer_chars, help="text the BPE is trained on"
    )
    args = vars(parser.parse_args(argv))
    train_teacher(args.pop("out"), Recipe(**args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
