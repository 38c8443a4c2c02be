"""The embedded default of `python -m train.distill` (no arguments, nothing to download): a small teacher
trained on the stdlib corpus (cached), converted with the default MLA settings, distilled, and reported."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from support.results import write_json
from train.keep_better import decide, message, previous_choice, save_kept
from train.loop import DistillOptions, run
from train.student import assemble_student


def embedded_teacher_dir() -> str:
    """Where the embedded default trains its teacher once and reuses it (the user's cache folder)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "gptoss-mla-jax", "tiny-teacher")


def embedded_default(args) -> int:
    """No download: train (or reuse) a small teacher on the stdlib corpus, convert it with the default MLA
    settings scaled to its size, distill, and report perplexities and the cache reduction. RUN_DIR/student
    is the healed student, or the converted one where that scores the lower held-out PPL."""
    from tokenizers import Tokenizer

    from gptoss_mla_jax.cache import accounting
    from gptoss_mla_jax.perplexity import perplexity
    from support.corpora import corpus_ids, token_windows
    from train import pretrain
    from weights.load import load_model
    from weights.to_mla import DEFAULT_LATENT_DIM, convert

    teacher_dir = embedded_teacher_dir()
    if not os.path.exists(teacher_dir):
        print(f"training the embedded teacher into {teacher_dir} (once; reused afterwards)")
        recipe = pretrain.Recipe(
            config="tiny", steps=600, batch=16, seq_len=128, lr=3e-3, train_tokens=1_000_000,
            tokenizer_chars=3_000_000,
        )  # fmt: skip
        pretrain.train_teacher(teacher_dir, recipe)
    config, teacher, tokenizer_dir = load_model(teacher_dir, progress=False)
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    G, d = config.num_key_value_heads, config.head_dim
    # The default keeps 192 of gpt-oss's 1024 cached values per token; the same fraction here.
    latent = round(DEFAULT_LATENT_DIM / 1024 * 2 * G * d)
    calib = token_windows(tokenizer, "stdlib", 8192, 128, "validation")
    student_config, student, _ = convert(
        teacher, config, latent, "decompressed", init="pca", calib_tokens=calib
    )
    held_out = corpus_ids(tokenizer, "stdlib", "test", 16384)
    ppl = lambda params, cfg: perplexity(params, cfg, held_out, 256, 128, 8, progress=False)["ppl"]
    # A student scored beside the teacher: its PPL, the teacher's and KL(teacher || student).
    score = lambda params: perplexity(
        params, student_config, held_out, 256, 128, 8, teacher=(teacher, config), progress=False
    )
    converted = score(student)
    before = {"teacher": converted["teacher_ppl"], "converted": converted["ppl"]}
    sequences = token_windows(tokenizer, "stdlib", 1_000_000, 129, "train")
    options = DistillOptions(
        mesh=args.mesh, batch=16, steps=300, lr=3e-3, warmup=20, ckpt_every=300,
        resume=True,  # a finished run is reported again, not retrained
        dtype=jnp.float32, eval_every=100,
    )  # fmt: skip
    _, trainable = run(
        teacher,
        config,
        student,
        student_config,
        sequences,
        args.out,
        options,
        eval_fn=lambda params: ppl(params, student_config),
    )
    healed = score(assemble_student(teacher, trainable, student_config, jnp.float32))
    after = healed["ppl"]
    record = decide(converted, healed, args.keep_healed)
    # Both students as model checkpoints, for eval.diagnose / eval.ppl / weights.export before and after.
    from weights.orbax_io import is_orbax_checkpoint, save_checkpoint

    if not is_orbax_checkpoint(os.path.join(args.out, "converted")):
        save_checkpoint(os.path.join(args.out, "converted"), student, student_config, source=tokenizer_dir)
    save_kept(
        os.path.join(args.out, "student"), student, student_config, trainable, 300, tokenizer_dir,
        record["kept"], previous_choice(args.out),
    )  # fmt: skip
    kv = accounting(student_config, 1, config.max_position_embeddings, jnp.bfloat16)
    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    summary |= {
        **{f"ppl_{k}": v for k, v in before.items()},
        "ppl_distilled": after,
        "kv_reduction": kv["reduction"],
        "latent_dim": latent,
        "held_out_tokens": len(held_out) - 1,
        **record,
    }
    print(
        f"held-out PPL ({summary['held_out_tokens']} stdlib test tokens): teacher {before['teacher']:.3f}, "
        f"converted {before['converted']:.3f}, distilled {after:.3f}"
    )
    if message(record):
        print(message(record))
    print(
        f"KV cache at {config.max_position_embeddings} tokens: {kv['reduction']:.1%} smaller "
        f"(full-attention layers: latent {latent} instead of {2 * G * d} values per token)"
    )
    write_json(os.path.join(args.out, "summary.json"), summary)
    return 0
