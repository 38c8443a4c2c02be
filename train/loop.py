"""The distillation loop: AdamW with warmup + cosine, global-norm clipping and gradient accumulation; bf16
compute with float32 trainable weights; remat per layer; checkpoints every `ckpt_every` steps and exact
resume; metrics.jsonl, summary.json and curves.png in the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.execution import ForwardOptions
from support.results import write_json
from train.checkpoints import Checkpoints
from train.data import training_batches
from train.flops import distill_step_flops, peak_flops
from train.loss import distill_loss, parse_loss
from train.sharding import batch_sharding, make_mesh, shard_params
from train.student import (
    TRAIN_SETS,
    DistillError,
    Params,
    assemble_student,
    check_pair,
    scalar,
    split_student,
)
from weights.safetensors_io import put


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """How a run trains: `mesh` DxM over the devices, the global `batch`, `steps` micro-steps of which
    `warmup` warm up to `lr`, softmax `temperature`, `loss` terms (kl[+ce][+hidden]), `grad_accum`
    micro-batches per update, a checkpoint every `ckpt_every` steps keeping `keep`, `resume` from the
    latest, the data `seed`, compute `dtype`, `remat` per layer, the `train` set, held-out evaluation every
    `eval_every` steps, a progress bar, and `stop_after` a step (ends this invocation with a checkpoint)."""

    mesh: str = "1x1"
    batch: int = 8
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10
    temperature: float = 1.0
    loss: str = "kl"
    grad_accum: int = 1
    ckpt_every: int = 50
    keep: int = 3
    resume: bool = False
    seed: int = 0
    dtype: object = jnp.float32
    remat: bool = True
    train: str = "mla"
    eval_every: int = 0
    progress: bool = True
    stop_after: int | None = None


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
    optimizer, teacher_config, student_config, temperature, terms, dtype, options: ForwardOptions,
    state_shardings=None,
):  # fmt: skip
    """The jitted training step. `state_shardings` (trainable, optimizer state): where the step returns
    them, so that the next step's inputs are placed as this one's and the step compiles once."""
    loss = functools.partial(
        distill_loss,
        teacher_config=teacher_config,
        student_config=student_config,
        temperature=temperature,
        terms=terms,
        dtype=dtype,
        options=options,
    )

    out_shardings = (*state_shardings, None) if state_shardings else None

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
    def step(trainable, opt_state, teacher, tokens):
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(trainable, teacher, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads), **aux}

    return step


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


def run(
    teacher: Params,
    teacher_config: GptOssConfig,
    student: Params,
    student_config: GptOssConfig,
    sequences: np.ndarray,
    out_dir: str,
    options: DistillOptions = DistillOptions(),
    eval_fn: Callable[[Params], float] | None = None,
) -> tuple[list[dict], dict]:
    """The training loop. Returns the per-step metrics (also in RUN_DIR/metrics.jsonl) and the trained
    parameters (the `train` set); writes RUN_DIR/summary.json and RUN_DIR/curves.png at the end.

    `batch` is the global batch; on several processes each one passes the same `sequences` and feeds
    only the rows its devices hold. `stop_after` ends this invocation at that step (with a checkpoint),
    for time-limited allocations; --resume continues it. `eval_fn(student params)` gives the held-out
    perplexity logged every `options.eval_every` steps."""
    o = options
    batch, steps, grad_accum, dtype, train = o.batch, o.steps, o.grad_accum, o.dtype, o.train
    terms = parse_loss(o.loss)
    check_pair(teacher, teacher_config, student, student_config)
    trainable = split_student(student, train)
    mesh = make_mesh(o.mesh)
    teacher = shard_params(
        jax.tree.map(lambda x: x.astype(dtype) if x.dtype != jnp.uint8 else x, teacher), mesh
    )
    trainable = shard_params(trainable, mesh)
    optimizer, schedule = make_optimizer(o.lr, o.warmup, steps, grad_accum)
    # Adam's moments inherit the weights' shardings; the step counters go replicated over the mesh (left
    # on one device they would clash with the mesh once a process holds only some of its devices). Every
    # leaf is committed to its mesh sharding and the step returns it there: a leaf left uncommitted (on one
    # device), or one the partitioner placed otherwise in the step's outputs, would compile the step again
    # at step 2.
    replicated = NamedSharding(mesh, PartitionSpec())
    state = (trainable, optimizer.init(trainable))
    mesh_sharding = lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated
    shardings = jax.tree.map(mesh_sharding, state)
    trainable, opt_state = jax.tree.map(lambda x, s: x if x.sharding == s else put(x, s), state, shardings)
    # On the mesh the model keeps each device on its own rows (the residual stream split by batch).
    step_fn = make_step(
        optimizer, teacher_config, student_config, o.temperature, terms, dtype,
        ForwardOptions(remat=o.remat, mesh=mesh), shardings,
    )  # fmt: skip
    seq_len = sequences.shape[1]
    tokens_sharding = batch_sharding(mesh)
    lo, hi = local_rows(tokens_sharding, batch, seq_len)
    batches = training_batches(sequences, batch, o.seed, lo // (hi - lo), batch // (hi - lo))
    primary = jax.process_index() == 0
    os.makedirs(out_dir, exist_ok=True)
    checkpoints = Checkpoints(os.path.join(out_dir, "ckpt"), o.keep)
    start = 0
    if checkpoints.latest() is not None:
        if not o.resume:
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
        kept_rows = [row for row in logged_rows(metrics_path) if row["step"] <= start]
    if primary:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept_rows)
    step_flops = distill_step_flops(teacher_config, student_config, seq_len - 1, batch, TRAIN_SETS[train])
    peak = peak_flops()
    history = []
    end = min(steps, o.stop_after or steps)
    bar = tqdm(
        range(start, end),
        desc="distill",
        unit="step",
        disable=not (o.progress and primary),
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
        if eval_fn is not None and o.eval_every and (step + 1) % o.eval_every == 0:
            row["student_ppl"] = eval_fn(assemble_student(teacher, trainable, student_config, dtype))
            t_last = time.perf_counter()  # evaluation time is not training throughput
        history.append(row)
        if primary:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % o.ckpt_every == 0 or step + 1 == end:
            checkpoints.save(step + 1, trainable, opt_state, batches.get_state())
    if primary and history:
        summary = summarize(history, time.perf_counter() - t_start, step_flops, peak, mesh, train, o.loss)
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


def logged_rows(metrics_path: str) -> list[dict]:
    """The rows of a run's metrics.jsonl that were written whole: a last line without its newline is one
    that a killed run (or a run still writing, seen by a reader) did not finish."""
    with open(metrics_path) as f:
        text = f.read()  # read at once: lines iterated while the run appends can end mid-row and go on later
    return [json.loads(line) for line in text.split("\n")[:-1]]


def plot_curves(metrics_path: str, png_path: str) -> None:
    """Loss terms, learning rate, gradient norm and held-out perplexity against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = logged_rows(metrics_path)
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
