"""Heal an MLA student by distillation from its GQA teacher, under JAX sharding with Optax and Orbax.

    python -m train.distill --teacher PATH --student CKPT --out RUN_DIR [--mesh 8x1]
        [--data stdlib|python-doc|wikitext-2|FILE|DIR|IDS.npy] [--seq-len 512] [--batch 8] [--steps 200]
        [--lr 1e-3] [--warmup 20] [--temperature 1.0] [--loss kl|kl+ce|kl+hidden|kl+ce+hidden]
        [--train mla|mla+attn|all] [--grad-accum 1] [--eval-every 50] [--ckpt-every 50] [--keep 3]
        [--resume] [--keep-healed] [--coordinator HOST:PORT --num-processes N --process-id I]

With no arguments it runs the embedded default end to end (nothing to download): a small teacher trained
on the stdlib corpus (cached), converted with the default MLA settings, distilled, and reported.

One model, two attentions: teacher and student share every frozen weight (one copy in memory); only the
`--train` set (default: the converted layers' MLA projections `kv_a`, `kv_b`, `k_rope`) is trained and
gets optimizer state. The teacher pass runs without gradients in the same jitted step. Loss:
KL(teacher || student) on logits at temperature T (times T^2), optionally plus cross-entropy on the data
and the relative squared error of every converted layer's attention output against the teacher's. AdamW
with warmup + cosine, global-norm clipping, gradient accumulation; bf16 compute with float32 trainable
weights; remat per layer. Checkpoints (trainable weights, optimizer state, grain iterator state) every
--ckpt-every steps and at the end; --resume continues from the latest one and sees exactly the batches it
would have seen. On several processes (explicit flags, or SLURM / Open MPI launches) it calls
jax.distributed.initialize, each process reads only its rows of every global batch, and Orbax saves and
restores collectively. RUN_DIR gets metrics.jsonl, curves.png, summary.json and, at the end, the output
student as a model checkpoint in RUN_DIR/student (for eval.ppl and weights.export): the healed student, or
the converted one where healing left it with a higher perplexity on the held-out tokens (--keep-healed
keeps the healed one regardless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from support.results import write_json
from train.embedded import embedded_default
from train.keep_better import decide, healed_student, message, previous_choice, save_kept
from train.loop import DistillOptions, run
from train.loss import parse_loss
from train.sharding import make_mesh, param_sharding
from train.student import TRAIN_SETS, DistillError


def initialize_distributed(args) -> None:
    """jax.distributed.initialize for explicit flags, or auto-detected from a SLURM / Open MPI launch."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise DistillError("--coordinator, --num-processes and --process-id go together")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif int(os.environ.get("SLURM_NTASKS", 1)) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        jax.distributed.initialize()


def training_data(tokenizer, data: str, n_tokens: int, seq_len: int, vocab_size: int, eval_tokens: int):
    """(train windows [n, seq_len + 1], up to `eval_tokens` held-out token ids or None when 0) from a
    corpus name / text path, or from a .npy of token ids (its last 5% held out)."""
    from support.corpora import corpus_ids, pack, token_windows

    if data.endswith(".npy"):
        ids = np.load(data, mmap_mode="r")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DistillError(
                f"--data {data}: expected a 1-D array of token ids, got {ids.dtype}{ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DistillError(f"--data {data}: token ids outside the vocabulary 0..{vocab_size - 1}")
        cut = len(ids) - len(ids) // 20
        held_out = np.asarray(ids[cut:][:eval_tokens], np.int32) if eval_tokens else None
        return pack(np.asarray(ids[:cut][:n_tokens]), seq_len + 1), held_out
    if tokenizer is None:
        raise DistillError(f"--teacher has no tokenizer.json to tokenize --data {data} with (or pass a .npy)")
    train = token_windows(tokenizer, data, n_tokens, seq_len + 1, "train")
    return train, corpus_ids(tokenizer, data, "test", eval_tokens) if eval_tokens else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", help="GQA teacher (default: the embedded small model, trained if needed)"
    )
    parser.add_argument("--student", help="its MLA conversion (python -m weights.to_mla)")
    parser.add_argument("--out", default="runs/distill", help="run folder: checkpoints, metrics, plots")
    parser.add_argument("--mesh", default="1x1", help="DxM: data (FSDP) x model (tensor/expert) parallel")
    parser.add_argument("--data", default="stdlib", help="corpus name, text file/folder, or .npy token ids")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per micro-step)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss", default="kl", help="kl, kl+ce, kl+hidden or kl+ce+hidden")
    parser.add_argument("--train", choices=list(TRAIN_SETS), default="mla")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--no-remat", action="store_true", help="keep every layer's activations (faster; more memory)"
    )
    parser.add_argument("--eval-every", type=int, default=0, help="held-out student PPL every N steps")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=2_000_000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--keep-healed",
        action="store_true",
        help="output the healed student even where the conversion scores a lower held-out PPL",
    )
    parser.add_argument("--stop-after", type=int, help="end this invocation at step N (checkpointed)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.teacher is None and args.student is None:
        return embedded_default(args)
    if args.teacher is None or args.student is None:
        parser.error("--teacher and --student go together (or give neither for the embedded default)")
    try:
        initialize_distributed(args)
        return distill_cli(args)
    except (DistillError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def distill_cli(args) -> int:
    from tokenizers import Tokenizer

    from gptoss_mla_jax.perplexity import perplexity
    from weights.load import load_model

    parse_loss(args.loss)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    progress = not args.no_progress and jax.process_index() == 0
    # Every process reads only the shards of the parameters that its devices hold.
    mesh = make_mesh(args.mesh)
    placement = lambda path, shape: param_sharding(path, shape, mesh)
    teacher_config, teacher, tokenizer_dir = load_model(args.teacher, placement=placement, progress=progress)
    student_config, student, _ = load_model(args.student, placement=placement, progress=progress)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    sequences, held_out = training_data(
        tokenizer,
        args.data,
        args.train_tokens,
        args.seq_len,
        teacher_config.vocab_size,
        # The held-out tokens also decide, at the end, whether the healed or the converted student is kept.
        args.eval_tokens if args.eval_every or not args.keep_healed else 0,
    )
    eval_fn = None
    if args.eval_every:
        eval_fn = lambda params: perplexity(
            params, student_config, held_out, args.seq_len, args.seq_len, args.batch, progress=False
        )["ppl"]
    options = DistillOptions(
        mesh=args.mesh, batch=args.batch, steps=args.steps, lr=args.lr, warmup=args.warmup,
        temperature=args.temperature, loss=args.loss, grad_accum=args.grad_accum,
        ckpt_every=args.ckpt_every, keep=args.keep, resume=args.resume, seed=args.seed, dtype=dtype,
        train=args.train, eval_every=args.eval_every, progress=progress, stop_after=args.stop_after,
        remat=not args.no_remat,
    )  # fmt: skip
    _, trained = run(
        teacher,
        teacher_config,
        student,
        student_config,
        sequences,
        args.out,
        options,
        eval_fn=eval_fn,
    )
    record = None
    if args.stop_after is None or args.stop_after >= args.steps:
        # Only a finished run chooses: a `--stop-after` stop is resumed and trains on.
        record = {"kept": "healed", "keep_healed": args.keep_healed}
        if held_out is not None and len(held_out) >= 2:
            score = lambda params: perplexity(
                params, student_config, held_out, args.seq_len, args.seq_len, args.batch,
                teacher=(teacher, teacher_config), progress=False,
            )  # fmt: skip
            converted = score(student)
            record = decide(converted, score(healed_student(student, trained)), args.keep_healed)
            record["held_out_tokens"] = converted["tokens"]
        save_kept(
            os.path.join(args.out, "student"), student, student_config, trained, args.steps, tokenizer_dir,
            record["kept"], previous_choice(args.out),
        )  # fmt: skip
    summary_path = os.path.join(args.out, "summary.json")
    if jax.process_index() == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if record is not None:
            summary |= record
            write_json(summary_path, summary)
            if message(record):
                print(message(record))
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""
        ppl = f", held-out student PPL {summary['student_ppl']:.3f}" if "student_ppl" in summary else ""
        print(
            f"step {summary['steps']}: loss {summary['loss']:.5f} (KL {summary['kl']:.5f}){ppl}; "
            f"{summary['tokens_per_s']:.0f} tokens/s{mfu} on {summary['device']}; "
            f"metrics, curves.png and summary.json in {args.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
