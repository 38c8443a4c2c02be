"""Heal an MLA student by distillation from its GQA teacher, under JAX sharding with Optax and Orbax.

    python -m train.distill --teacher PATH --student CKPT --out RUN_DIR [--mesh 8x1] [--data stdlib]
        [--seq-len 512] [--batch 8] [--steps 200] [--lr 1e-3] [--warmup 20] [--temperature 1.0]
        [--loss kl|kl+ce] [--grad-accum 1] [--eval-every 50] [--ckpt-every 50] [--keep 3] [--resume]

One model, two attentions: teacher and student share every frozen weight (one copy in memory); only the
converted layers' MLA projections (`kv_a`, `kv_b`, `k_rope`) are trained and get optimizer state. The
teacher pass runs without gradients in the same jitted step. Loss: KL(teacher || student) on logits at
temperature T (times T^2), optionally plus cross-entropy on the data. AdamW with warmup + cosine,
global-norm clipping, gradient accumulation; bf16 compute with float32 trainable weights; remat per layer.
Checkpoints (trainable weights, optimizer state, grain iterator state) every --ckpt-every steps and at the
end; --resume continues from the latest one and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import forward
from train.sharding import batch_sharding, make_mesh, shard_params

Params = dict[str, Any]
TRAINABLE = ("kv_a", "kv_b", "k_rope")


class DistillError(ValueError):
    """A run that must not start (or continue): mismatched models, a non-finite loss."""


def split_student(student: Params, student_config: GptOssConfig) -> tuple[dict[int, Params], Params]:
    """(trainable MLA projections per converted layer, as float32 copies, since the train step donates
    them; the rest of the student)."""
    trainable = {}
    for i in student_config.mla.layers:
        attn = student["layers"][i]["self_attn"]
        trainable[str(i)] = {
            k: jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), attn[k])
            for k in TRAINABLE
            if k in attn
        }
    return trainable, student


def check_pair(teacher: Params, teacher_config: GptOssConfig, student: Params, student_config: GptOssConfig):
    """Refuse a student that is not a conversion of this teacher: same config apart from the MLA section,
    and bitwise the same frozen weights."""
    if student_config.mla is None:
        raise DistillError("--student has no MLA layers (convert it with python -m weights.to_mla first)")
    if teacher_config.mla is not None:
        raise DistillError("--teacher is itself an MLA model; distill from the original GQA model")
    if dataclasses.replace(student_config, mla=None).to_hf() != teacher_config.to_hf():
        raise DistillError(
            "--teacher and --student configs differ beyond the MLA settings (vocabulary, sizes...)"
        )
    for i, (t, s) in enumerate(zip(teacher["layers"], student["layers"], strict=True)):
        for name in ("q_proj", "o_proj", "sinks"):
            if not all(
                jnp.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves(t["self_attn"][name]), jax.tree.leaves(s["self_attn"][name]), strict=True
                )
            ):
                raise DistillError(
                    f"--teacher and --student differ in layer {i} self_attn.{name}: not a conversion of it"
                )
    if not jnp.array_equal(teacher["embed_tokens"], student["embed_tokens"]):
        raise DistillError("--teacher and --student have different embeddings: not a conversion of it")


def assemble_student(
    teacher: Params, trainable: dict[str, Params], student_config: GptOssConfig, dtype
) -> Params:
    """The student as a pytree whose frozen leaves ARE the teacher's arrays (shared, not copied)."""
    layers = list(teacher["layers"])
    for key, mla in trainable.items():
        i = int(key)
        attn = teacher["layers"][i]["self_attn"]
        shared = {name: attn[name] for name in ("q_proj", "o_proj", "sinks")}
        layers[i] = {**layers[i], "self_attn": {**shared, **jax.tree.map(lambda x: x.astype(dtype), mla)}}
    return {**teacher, "layers": layers}


def distill_loss(
    trainable, teacher, tokens, teacher_config, student_config, temperature, ce_weight, dtype, remat
):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t_logits = jax.lax.stop_gradient(forward(teacher, inputs, None, teacher_config, remat=remat)[0])
    student = assemble_student(teacher, trainable, student_config, dtype)
    s_logits = forward(student, inputs, None, student_config, remat=remat)[0]
    t_logp = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)) * temperature**2
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s_logits, axis=-1), targets[..., None], axis=-1))
    return kl + ce_weight * ce, {"kl": kl, "ce": ce}


def make_optimizer(lr: float, warmup: int, steps: int, grad_accum: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr / 10)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    return optax.MultiSteps(chain, every_k_schedule=grad_accum) if grad_accum > 1 else chain


def make_step(optimizer, teacher_config, student_config, temperature, ce_weight, dtype, remat):
    loss = functools.partial(
        distill_loss,
        teacher_config=teacher_config,
        student_config=student_config,
        temperature=temperature,
        ce_weight=ce_weight,
        dtype=dtype,
        remat=remat,
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, teacher, tokens):
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(trainable, teacher, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads), **aux}

    return step


class Checkpoints:
    """Orbax CheckpointManager over (trainable, optimizer state, data iterator state), keeping the last K."""

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, trainable, opt_state, data_state: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
            ),
        )
        self.manager.wait_until_finished()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, trainable, opt_state):
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract(trainable)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["trainable"], out["opt_state"], out["data"]


def run(
    teacher: Params,
    teacher_config: GptOssConfig,
    student: Params,
    student_config: GptOssConfig,
    sequences: np.ndarray,
    out_dir: str,
    mesh_spec: str = "1x1",
    batch: int = 8,
    steps: int = 100,
    lr: float = 1e-3,
    warmup: int = 10,
    temperature: float = 1.0,
    loss: str = "kl",
    grad_accum: int = 1,
    ckpt_every: int = 50,
    keep: int = 3,
    resume: bool = False,
    seed: int = 0,
    dtype=jnp.float32,
    remat: bool = True,
    eval_fn=None,
    eval_every: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict[str, Params]]:
    """The training loop; returns the per-step metrics (also appended to RUN_DIR/metrics.jsonl) and the
    trained MLA projections."""
    from train.data import training_batches

    check_pair(teacher, teacher_config, student, student_config)
    mesh = make_mesh(mesh_spec)
    teacher = shard_params(
        jax.tree.map(lambda x: x.astype(dtype) if x.dtype != jnp.uint8 else x, teacher), mesh
    )
    trainable, _ = split_student(student, student_config)
    trainable = shard_params(trainable, mesh)
    optimizer = make_optimizer(lr, warmup, steps, grad_accum)
    opt_state = optimizer.init(trainable)
    step_fn = make_step(
        optimizer, teacher_config, student_config, temperature, 1.0 if loss == "kl+ce" else 0.0, dtype, remat
    )
    batches = training_batches(sequences, batch, seed)
    os.makedirs(out_dir, exist_ok=True)
    checkpoints = Checkpoints(os.path.join(out_dir, "ckpt"), keep)
    start = 0
    if resume and checkpoints.latest() is not None:
        start = checkpoints.latest()
        trainable, opt_state, data_state = checkpoints.restore(start, trainable, opt_state)
        batches.set_state(data_state)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    history = []
    tokens_per_step = batch * (sequences.shape[1] - 1)
    bar = tqdm(
        range(start, steps), desc="distill", unit="step", disable=not progress, initial=start, total=steps
    )
    t_last = time.perf_counter()
    for step in bar:
        tokens = jax.device_put(jnp.asarray(next(batches)), batch_sharding(mesh))
        trainable, opt_state, metrics = step_fn(trainable, opt_state, teacher, tokens)
        row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        if not np.isfinite(row["loss"]):
            raise DistillError(
                f"loss is {row['loss']} at step {step + 1}; stopping. The last good checkpoint "
                f"(step {checkpoints.latest()}) is kept in {checkpoints.manager.directory}"
            )
        now = time.perf_counter()
        row["tokens_per_s"] = tokens_per_step / (now - t_last)
        t_last = now
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            row["student_ppl"] = eval_fn(assemble_student(teacher, trainable, student_config, dtype))
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            checkpoints.save(step + 1, trainable, opt_state, batches.get_state())
    return history, trainable


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    from train.data import token_windows
    from weights.load import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", help="GQA teacher (default: the embedded small model, trained if needed)"
    )
    parser.add_argument("--student", help="its MLA conversion (default: converted here with the defaults)")
    parser.add_argument("--out", default="runs/distill", help="run folder: checkpoints and metrics.jsonl")
    parser.add_argument("--mesh", default="1x1")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss", choices=["kl", "kl+ce"], default="kl")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=2_000_000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.teacher is None and args.student is None:
        return embedded_default(args)
    if args.teacher is None or args.student is None:
        parser.error("--teacher and --student go together (or give neither for the embedded default)")
    try:
        teacher_config, teacher, tokenizer_dir = load_model(args.teacher)
        student_config, student, _ = load_model(args.student)
        if tokenizer_dir is None:
            raise DistillError(f"--teacher {args.teacher} has no tokenizer.json to tokenize --data with")
        tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        sequences = token_windows(tokenizer, args.data, args.train_tokens, args.seq_len + 1, "train")
        history, _ = run(
            teacher,
            teacher_config,
            student,
            student_config,
            sequences,
            args.out,
            args.mesh,
            args.batch,
            args.steps,
            args.lr,
            args.warmup,
            args.temperature,
            args.loss,
            args.grad_accum,
            args.ckpt_every,
            args.keep,
            args.resume,
            dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32,
        )
    except (DistillError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if history:
        print(json.dumps(history[-1]))
    return 0


def embedded_default(args) -> int:
    """No download: train (or reuse) a small teacher on the stdlib corpus, convert it with the default MLA
    settings scaled to its size, distill, and report perplexities and the cache reduction."""
    from tokenizers import Tokenizer

    from eval.kv_cache import accounting
    from eval.ppl import corpus_ids, perplexity
    from train import pretrain
    from train.data import token_windows
    from weights.load import load_model
    from weights.to_mla import DEFAULT_LATENT_DIM, convert

    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gptoss-mla-jax")
    teacher_dir = os.path.join(cache, "tiny-teacher")
    if not os.path.exists(teacher_dir):
        print(f"training the embedded teacher into {teacher_dir} (once; reused afterwards)")
        pretrain.main(
            [
                "--out",
                teacher_dir,
                "--config",
                "tiny",
                "--steps",
                "600",
                "--batch",
                "16",
                "--seq-len",
                "128",
                "--lr",
                "3e-3",
                "--train-tokens",
                "1000000",
                "--tokenizer-chars",
                "3000000",
            ]
        )
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
    before = {"teacher": ppl(teacher, config), "converted": ppl(student, student_config)}
    sequences = token_windows(tokenizer, "stdlib", 1_000_000, 129, "train")
    _, trainable = run(
        teacher,
        config,
        student,
        student_config,
        sequences,
        args.out,
        args.mesh,
        16,
        300,
        3e-3,
        20,
        ckpt_every=300,
        dtype=jnp.float32,
    )
    distilled = assemble_student(teacher, trainable, student_config, jnp.float32)
    after = ppl(distilled, student_config)
    kv = accounting(student_config, 1, config.max_position_embeddings, jnp.bfloat16)
    summary = {
        **{f"ppl_{k}": v for k, v in before.items()},
        "ppl_distilled": after,
        "kv_reduction": kv["reduction"],
        "latent_dim": latent,
        "held_out_tokens": len(held_out) - 1,
    }
    print(
        f"held-out PPL ({summary['held_out_tokens']} stdlib test tokens): teacher {before['teacher']:.3f}, "
        f"converted {before['converted']:.3f}, distilled {after:.3f}"
    )
    print(
        f"KV cache at {config.max_position_embeddings} tokens: {kv['reduction']:.1%} smaller "
        f"(full-attention layers: latent {latent} instead of {2 * G * d} values per token)"
    )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
