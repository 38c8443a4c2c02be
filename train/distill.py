"""Heal an MLA student by distillation from its GQA teacher, under JAX sharding with Optax and Orbax.

    python -m train.distill --teacher PATH --student CKPT --out RUN_DIR [--mesh 8x1]
        [--data stdlib|python-doc|wikitext-2|FILE|DIR|IDS.npy] [--seq-len 512] [--batch 8] [--steps 200]
        [--lr 1e-3] [--warmup 20] [--temperature 1.0] [--loss kl|kl+ce|kl+hidden|kl+ce+hidden]
        [--train mla|mla+attn|all] [--grad-accum 1] [--eval-every 50] [--ckpt-every 50] [--keep 3]
        [--resume] [--coordinator HOST:PORT --num-processes N --process-id I]

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
restores collectively. RUN_DIR gets metrics.jsonl, curves.png, summary.json and, at the end, the healed
student as a model checkpoint in RUN_DIR/student (for eval.ppl and weights.export).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import forward
from support.results import write_json
from train.flops import distill_step_flops, peak_flops
from train.sharding import (
    batch_sharding,
    make_mesh,
    path_name,
    place,
    rows_sharding,
    shard_params,
    spec_for,
)

Params = dict[str, Any]

# Which student parameters train ("/"-joined parameter paths). The MLA projections always do: they are new.
TRAIN_SETS: dict[str, Callable[[str], bool]] = {
    "mla": lambda path: re.search(r"self_attn/(kv_a|kv_b|k_rope)(/|$)", path) is not None,
    "mla+attn": lambda path: "/self_attn/" in path,
    "all": lambda path: True,
}
LOSS_TERMS = ("kl", "ce", "hidden")
SHARED_ATTENTION = ("q_proj", "o_proj", "sinks")  # kept by the conversion, shared with the teacher


class DistillError(ValueError):
    """A run that must not start (or continue): mismatched models, a non-finite loss, a bad flag."""


def parse_loss(loss: str) -> frozenset[str]:
    terms = frozenset(loss.split("+"))
    if "kl" not in terms or not terms <= set(LOSS_TERMS):
        raise DistillError(f"--loss {loss!r}: expected kl, optionally +ce and/or +hidden (e.g. kl+hidden)")
    return terms


def select(tree, keep: Callable[[str], bool], path: str = ""):
    """The leaves of `tree` whose path satisfies `keep`, as nested dicts (list indices become string
    keys, so Orbax can name them); None when nothing is kept."""
    if not isinstance(tree, (dict, list)):
        return tree if keep(path) else None
    items = tree.items() if isinstance(tree, dict) else ((str(i), v) for i, v in enumerate(tree))
    out = {}
    for key, value in items:
        sub = select(value, keep, f"{path}/{key}" if path else key)
        if sub is not None:
            out[key] = sub
    return out or None


def overlay(tree, sub):
    """`tree` with the leaves of `sub` (a `select` result) put in, adding the keys `tree` lacks."""
    if sub is None:
        return tree
    if isinstance(tree, list):
        return [overlay(value, sub.get(str(i))) for i, value in enumerate(tree)]
    if isinstance(tree, dict):
        kept = {k: overlay(v, sub.get(k)) for k, v in tree.items()}
        return {**kept, **{k: v for k, v in sub.items() if k not in tree}}
    return sub


def split_student(student: Params, train: str = "mla") -> dict:
    """The trainable part of the student (`TRAIN_SETS[train]`) as float32 copies (the train step donates
    them)."""
    if train not in TRAIN_SETS:
        raise DistillError(f"--train {train!r}: expected one of {', '.join(TRAIN_SETS)}")
    trainable = select(student, TRAIN_SETS[train])
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainable):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise DistillError(
                f"--train {train}: {path_name(path)} is {leaf.dtype}; packed MXFP4 experts cannot train "
                "(load them dequantized)"
            )
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)


def check_pair(teacher: Params, teacher_config: GptOssConfig, student: Params, student_config: GptOssConfig):
    """Refuse a student that is not a conversion of this teacher: same config apart from the MLA section,
    and bitwise the same weights wherever the conversion keeps them."""
    if student_config.mla is None:
        raise DistillError("--student has no MLA layers (convert it with python -m weights.to_mla first)")
    if teacher_config.mla is not None:
        raise DistillError("--teacher is itself an MLA model; distill from the original GQA model")
    if dataclasses.replace(student_config, mla=None).to_hf() != teacher_config.to_hf():
        raise DistillError(
            "--teacher and --student configs differ beyond the MLA settings (vocabulary, sizes...)"
        )
    is_new = TRAIN_SETS["mla"]
    teacher_leaves = {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(teacher)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(student):
        name = path_name(path)
        if is_new(name):
            continue
        if name not in teacher_leaves:
            raise DistillError(f"--student has {name}, which --teacher lacks: not a conversion of it")
        if leaf.shape != teacher_leaves[name].shape or not scalar(
            jnp.array_equal(leaf, teacher_leaves[name])
        ):
            raise DistillError(
                f"--teacher and --student differ in {name}: the student is not a conversion of this teacher"
            )


def assemble_student(teacher: Params, trainable: dict, student_config: GptOssConfig, dtype) -> Params:
    """The student as a pytree whose frozen leaves ARE the teacher's arrays (shared, not copied)."""
    layers = [
        {**layer, "self_attn": {name: layer["self_attn"][name] for name in SHARED_ATTENTION}}
        if student_config.mla.index(i) is not None
        else layer
        for i, layer in enumerate(teacher["layers"])
    ]
    return overlay({**teacher, "layers": layers}, jax.tree.map(lambda x: x.astype(dtype), trainable))


def distill_loss(
    trainable, teacher, tokens, teacher_config, student_config, temperature, terms, dtype, remat,
    activation_sharding=None, moe_impl="sparse",
):  # fmt: skip
    """KL(teacher || student) at temperature T (times T^2), plus the cross-entropy on the data and the
    relative squared error of the converted layers' attention outputs when `terms` asks for them.
    `activation_sharding`: the residual stream's sharding in both forwards; `moe_impl`: the MoE path (see
    `model.forward`)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    options = dict(
        remat=remat,
        collect_attention="hidden" in terms,
        activation_sharding=activation_sharding,
        moe_impl=moe_impl,
    )
    t_out = forward(teacher, inputs, None, teacher_config, **options)
    student = assemble_student(teacher, trainable, student_config, dtype)
    s_out = forward(student, inputs, None, student_config, **options)
    t_logits, s_logits = jax.lax.stop_gradient(t_out[0]), s_out[0]
    t_logp = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)) * temperature**2
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s_logits, axis=-1), targets[..., None], axis=-1))
    aux = {"kl": kl, "ce": ce}
    total = kl + (ce if "ce" in terms else 0.0)
    if options["collect_attention"]:
        errors = [
            jnp.sum(jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)))
            / jnp.sum(jnp.square(jax.lax.stop_gradient(t).astype(jnp.float32)))
            for t, s in zip(
                (t_out[2][i] for i in student_config.mla.layers),
                (s_out[2][i] for i in student_config.mla.layers),
                strict=True,
            )
        ]
        aux["hidden"] = jnp.mean(jnp.stack(errors))
        total = total + aux["hidden"]
    return total, aux


def make_optimizer(lr: float, warmup: int, steps: int, grad_accum: int):
    """(AdamW with warmup + cosine to lr/10 and global-norm clipping at 1, accumulating `grad_accum`
    micro-batches per update; its learning-rate schedule by update count).

    `warmup` and `steps` count micro-steps, as --warmup, --steps and the progress bar do; the schedule
    runs over the updates they make, so that a run with accumulation follows the same learning rates as
    the run with its whole batch in one step (and its cosine ends at the last update).
    """
    warmup, updates = max(warmup // grad_accum, 1), steps // grad_accum
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(updates, warmup + 1), lr / 10)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    return (optax.MultiSteps(chain, every_k_schedule=grad_accum) if grad_accum > 1 else chain), schedule


def make_step(
    optimizer, teacher_config, student_config, temperature, terms, dtype, remat, activation_sharding=None
):
    loss = functools.partial(
        distill_loss,
        teacher_config=teacher_config,
        student_config=student_config,
        temperature=temperature,
        terms=terms,
        dtype=dtype,
        remat=remat,
        activation_sharding=activation_sharding,
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, teacher, tokens):
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(trainable, teacher, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads), **aux}

    return step


class Checkpoints:
    """Orbax CheckpointManager over (trainable, optimizer state, data iterator state), keeping the last K.
    Collective on several processes: every process calls save / restore."""

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


def save_student(
    directory: str, student: Params, config: GptOssConfig, trained: dict, step: int, tokenizer: str | None
) -> None:
    """The healed student as a model checkpoint (`weights.export` and `eval.ppl` read it): the trained
    leaves put back into the student, each in the dtype the student held it in. Collective."""
    from weights.orbax_io import is_orbax_checkpoint, read_meta, save_checkpoint

    if is_orbax_checkpoint(directory) and read_meta(directory)["step"] == step:
        return  # a resumed run that had already finished
    healed = jax.tree.map(lambda new, old: new.astype(old.dtype), overlay(student, trained), student)
    save_checkpoint(directory, healed, config, step=step, source=tokenizer, max_to_keep=1)


def local_rows(sharding: jax.sharding.NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """The rows [lo, hi) of each global batch that this process's devices hold."""
    spans = {
        (index[0].start or 0, global_batch if index[0].stop is None else index[0].stop)
        for index in sharding.addressable_devices_indices_map((global_batch, seq_len)).values()
    }
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    if sum(b - a for a, b in spans) != hi - lo and len(spans) > 1:
        raise DistillError("this process's devices do not hold a contiguous block of the batch")
    return lo, hi


def scalar(x) -> float:
    """A replicated scalar as a Python number (also when its devices span several processes)."""
    return np.asarray(x.addressable_shards[0].data).item()


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
    train: str = "mla",
    eval_fn: Callable[[Params], float] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[list[dict], dict]:
    """The training loop. Returns the per-step metrics (also in RUN_DIR/metrics.jsonl) and the trained
    parameters (the `train` set); writes RUN_DIR/summary.json and RUN_DIR/curves.png at the end.

    `batch` is the global batch; on several processes each one passes the same `sequences` and feeds
    only the rows its devices hold. `stop_after` ends this invocation at that step (with a checkpoint),
    for time-limited allocations; --resume continues it."""
    from train.data import training_batches

    terms = parse_loss(loss)
    check_pair(teacher, teacher_config, student, student_config)
    trainable = split_student(student, train)
    mesh = make_mesh(mesh_spec)
    teacher = shard_params(
        jax.tree.map(lambda x: x.astype(dtype) if x.dtype != jnp.uint8 else x, teacher), mesh
    )
    trainable = shard_params(trainable, mesh)
    optimizer, schedule = make_optimizer(lr, warmup, steps, grad_accum)
    # Adam's moments inherit the weights' shardings; the step counters go replicated over the mesh (left
    # on one device they would clash with the mesh once a process holds only some of its devices).
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else place(x, replicated),
        optimizer.init(trainable),
    )
    # Each device computes its own rows: the residual stream stays split by batch over "data".
    step_fn = make_step(
        optimizer, teacher_config, student_config, temperature, terms, dtype, remat, rows_sharding(mesh)
    )
    seq_len = sequences.shape[1]
    tokens_sharding = batch_sharding(mesh)
    lo, hi = local_rows(tokens_sharding, batch, seq_len)
    batches = training_batches(sequences, batch, seed, lo // (hi - lo), batch // (hi - lo))
    primary = jax.process_index() == 0
    os.makedirs(out_dir, exist_ok=True)
    checkpoints = Checkpoints(os.path.join(out_dir, "ckpt"), keep)
    start = 0
    if checkpoints.latest() is not None:
        if not resume:
            raise DistillError(
                f"{out_dir} already holds checkpoints (latest step {checkpoints.latest()}); pass --resume "
                "to continue that run, or choose another --out"
            )
        start = checkpoints.latest()
        trainable, opt_state, data_state = checkpoints.restore(start, trainable, opt_state)
        batches.set_state(data_state)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    kept_rows = []
    if start and os.path.exists(metrics_path):
        # Rows logged after the checkpoint by the run that died are logged again by this one.
        with open(metrics_path) as f:
            kept_rows = [line for line in f if json.loads(line)["step"] <= start]
    if primary:
        with open(metrics_path, "w") as f:
            f.writelines(kept_rows)
    step_flops = distill_step_flops(teacher_config, student_config, seq_len - 1, batch, TRAIN_SETS[train])
    peak = peak_flops()
    history = []
    end = min(steps, stop_after or steps)
    bar = tqdm(
        range(start, end),
        desc="distill",
        unit="step",
        disable=not (progress and primary),
        initial=start,
        total=steps,
    )
    t_start = t_last = time.perf_counter()
    for step in bar:
        local = next(batches)
        tokens = jax.make_array_from_process_local_data(tokens_sharding, local, (batch, seq_len))
        trainable, opt_state, metrics = step_fn(trainable, opt_state, teacher, tokens)
        row = {"step": step + 1, **{k: scalar(v) for k, v in metrics.items()}}
        row["lr"] = float(schedule(step // grad_accum))
        if not np.isfinite(row["loss"]):
            raise DistillError(
                f"loss is {row['loss']} at step {step + 1}; stopping. The last good checkpoint "
                f"(step {checkpoints.latest()}) is kept in {checkpoints.manager.directory}"
            )
        now = time.perf_counter()
        row["step_s"] = now - t_last
        row["tokens_per_s"] = batch * (seq_len - 1) / row["step_s"]
        if peak:
            row["mfu"] = step_flops / row["step_s"] / (peak * mesh.size)
        t_last = now
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            row["student_ppl"] = eval_fn(assemble_student(teacher, trainable, student_config, dtype))
            t_last = time.perf_counter()  # evaluation time is not training throughput
        history.append(row)
        if primary:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == end:
            checkpoints.save(step + 1, trainable, opt_state, batches.get_state())
    if primary and history:
        summary = summarize(history, time.perf_counter() - t_start, step_flops, peak, mesh, train, loss)
        write_json(os.path.join(out_dir, "summary.json"), summary)
        plot_curves(metrics_path, os.path.join(out_dir, "curves.png"))
    return history, trainable


def summarize(history, wall_s, step_flops, peak, mesh, train, loss) -> dict:
    """Throughput from the median step after the first two (compilation and warm-up)."""
    timed = history[2:] or history
    step_s = float(np.median([h["step_s"] for h in timed]))
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9 for d in jax.local_devices()]
    last = history[-1]
    summary = {
        "steps": last["step"],
        "loss": last["loss"],
        "kl": last["kl"],
        "median_step_s": step_s,
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in timed])),
        "step_tflops": step_flops / 1e12,
        "mfu": step_flops / step_s / (peak * mesh.size) if peak else None,
        "peak_device_memory_gb": max(peaks) or None,
        "peak_memory_gb_per_device": peaks if any(peaks) else None,
        "device": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "train": train,
        "loss_terms": loss,
        "wall_s": wall_s,
    }
    evals = [(h["step"], h["student_ppl"]) for h in history if "student_ppl" in h]
    if evals:
        summary["student_ppl"] = evals[-1][1]
    return summary


def plot_curves(metrics_path: str, png_path: str) -> None:
    """Loss terms, learning rate, gradient norm and held-out perplexity against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    panels = [("loss", ["loss", "kl", "hidden"]), ("lr", ["lr"]), ("grad norm", ["grad_norm"])]
    if any("student_ppl" in r for r in rows):
        panels.append(("held-out student PPL", ["student_ppl"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if key == "student_ppl" else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.set_yscale("log")
            ax.legend()
    fig.tight_layout()
    tmp = f"{png_path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


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
    parser.add_argument("--eval-every", type=int, default=0, help="held-out student PPL every N steps")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=2_000_000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
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
    placement = lambda path, shape: NamedSharding(mesh, spec_for("/".join(str(k) for k in path), shape, mesh))
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
        args.eval_tokens if args.eval_every else 0,
    )
    eval_fn = None
    if args.eval_every:
        eval_fn = lambda params: perplexity(
            params, student_config, held_out, args.seq_len, args.seq_len, args.batch, progress=False
        )["ppl"]
    _, trained = run(
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
        args.seed,
        dtype,
        train=args.train,
        eval_fn=eval_fn,
        eval_every=args.eval_every,
        progress=progress,
        stop_after=args.stop_after,
    )
    if args.stop_after is None or args.stop_after >= args.steps:
        save_student(
            os.path.join(args.out, "student"), student, student_config, trained, args.steps, tokenizer_dir
        )
    summary_path = os.path.join(args.out, "summary.json")
    if jax.process_index() == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""
        ppl = f", held-out student PPL {summary['student_ppl']:.3f}" if "student_ppl" in summary else ""
        print(
            f"step {summary['steps']}: loss {summary['loss']:.5f} (KL {summary['kl']:.5f}){ppl}; "
            f"{summary['tokens_per_s']:.0f} tokens/s{mfu} on {summary['device']}; "
            f"metrics, curves.png and summary.json in {args.out}"
        )
    return 0


def embedded_teacher_dir() -> str:
    """Where the embedded default trains its teacher once and reuses it (the user's cache folder)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "gptoss-mla-jax", "tiny-teacher")


def embedded_default(args) -> int:
    """No download: train (or reuse) a small teacher on the stdlib corpus, convert it with the default MLA
    settings scaled to its size, distill, and report perplexities and the cache reduction."""
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
        resume=True,  # a finished run is reported again, not retrained
        dtype=jnp.float32,
        eval_fn=lambda params: ppl(params, student_config),
        eval_every=100,
    )
    distilled = assemble_student(teacher, trainable, student_config, jnp.float32)
    after = ppl(distilled, student_config)
    # Both students as model checkpoints, for eval.diagnose / eval.ppl / weights.export before and after.
    from weights.orbax_io import is_orbax_checkpoint, save_checkpoint

    if not is_orbax_checkpoint(os.path.join(args.out, "converted")):
        save_checkpoint(os.path.join(args.out, "converted"), student, student_config, source=tokenizer_dir)
    save_student(os.path.join(args.out, "student"), student, student_config, trainable, 300, tokenizer_dir)
    kv = accounting(student_config, 1, config.max_position_embeddings, jnp.bfloat16)
    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    summary |= {
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
    write_json(os.path.join(args.out, "summary.json"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
