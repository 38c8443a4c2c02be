"""Full-size distillation throughput: a gpt-oss-20b-shaped teacher with random bf16 weights, converted to
MLA with the default settings (decompressed, latent 192, PCA on all layers), distilled with
`train.loop.run` at seq-len 2048 on one GPU.

    python -m eval.experiments.fullsize_distill [--batch 2] [--steps 20] [--seq-len 2048] [--no-remat]
        [--out RESULTS.json]
    python -m eval.experiments.fullsize_distill --breakdown   # where a forward's time goes (no training)

Reports peak device memory, tokens/s and MFU (model FLOPs of teacher forward + student forward and
backward, `train.flops`, over the card's dense bf16 peak) from the median step after the first two.
Random weights make the loss meaningless; the point is that the step fits and how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.timing import timed
from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.model import init_params
from support.corpora import pack
from train.loop import DistillOptions, run
from weights.to_mla import DEFAULT_LATENT_DIM, convert


def breakdown(teacher, config, batch: int, seq_len: int) -> dict:
    """Seconds of one teacher forward and of its parts (one layer's attention on jnp and on the
    flash-attention kernel, its MoE, and the MoE's first grouped matmul on `ragged_dot` and on the kernel
    against a dense matmul of the same FLOPs), with the FLOP rate each reaches."""
    from gptoss_mla_jax.attention import attention, chunk_at
    from gptoss_mla_jax.execution import ForwardOptions
    from gptoss_mla_jax.gmm import gmm
    from gptoss_mla_jax.model import forward
    from gptoss_mla_jax.moe import moe_sparse, route
    from train.flops import forward_flops

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len)))
    layer = teacher["layers"][1]  # a full-attention layer
    x = jax.random.normal(jax.random.key(1), (batch, seq_len, config.hidden_size), jnp.bfloat16)
    chunk = chunk_at(batch, seq_len, config)
    n, k, D = batch * seq_len, config.num_experts_per_tok, config.hidden_size
    _, idx = route(layer["mlp"], x.reshape(n, D), config)
    sizes = jnp.bincount(idx.reshape(-1), length=config.num_local_experts).astype(jnp.int32)
    rows = jax.random.normal(jax.random.key(2), (n * k, D), jnp.bfloat16)
    w = layer["mlp"]["experts"]["gate_up_proj"]
    on = lambda impl: ForwardOptions(attention=impl)
    attention_layer = lambda impl: timed(
        jax.jit(lambda p, h: attention(p, h, chunk, None, False, config, on(impl))[0]),
        layer["self_attn"],
        x,
    )
    whole = lambda impl: timed(
        jax.jit(lambda p, t: forward(p, t, None, config, options=on(impl))[0]), teacher, tokens
    )
    out = {
        "forward_s": whole("auto"),
        "forward_jnp_attention_s": whole("jnp"),
        "forward_tflop": forward_flops(config, seq_len) * batch / 1e12,
        "attention_layer_s": attention_layer("auto"),
        "attention_layer_jnp_s": attention_layer("jnp"),
        "moe_layer_s": timed(jax.jit(lambda p, h: moe_sparse(p, h, config)), layer["mlp"], x),
        "ragged_dot_gate_up_s": timed(jax.jit(jax.lax.ragged_dot), rows, w, sizes),
        "gmm_gate_up_s": timed(jax.jit(gmm), rows, w, sizes),
        "dense_same_flops_s": timed(jax.jit(lambda r, m: r @ m), rows, w[0]),
        "ragged_dot_tflop": 2 * n * k * D * w.shape[-1] / 1e12,
    }
    out["forward_tflops_per_s"] = out["forward_tflop"] / out["forward_s"]
    out["ragged_dot_tflops_per_s"] = out["ragged_dot_tflop"] / out["ragged_dot_gate_up_s"]
    out["gmm_tflops_per_s"] = out["ragged_dot_tflop"] / out["gmm_gate_up_s"]
    out["dense_tflops_per_s"] = out["ragged_dot_tflop"] / out["dense_same_flops_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loss", default="kl")
    parser.add_argument("--mesh", default="1x1", help="DxM over the visible GPUs (train.sharding)")
    parser.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
    parser.add_argument("--out", default="eval/results/fullsize_distill.json")
    parser.add_argument("--breakdown", action="store_true", help="time a forward and its parts instead")
    args = parser.parse_args(argv)
    config = GPT_OSS_20B
    t0 = time.perf_counter()
    teacher = init_params(config, jax.random.key(0), jnp.bfloat16)
    if args.breakdown:
        result = {"device": jax.devices()[0].device_kind, "batch": args.batch, "seq_len": args.seq_len}
        result |= breakdown(teacher, config, args.batch, args.seq_len)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
        return 0
    rng = np.random.default_rng(0)
    calib = rng.integers(0, config.vocab_size, (2, 512))
    student_config, student, _ = convert(
        teacher, config, DEFAULT_LATENT_DIM, "decompressed", init="pca", calib_tokens=calib
    )
    setup_s = time.perf_counter() - t0
    sequences = pack(rng.integers(0, config.vocab_size, 64 * (args.seq_len + 1)), args.seq_len + 1)
    with tempfile.TemporaryDirectory() as out_dir:
        options = DistillOptions(
            mesh=args.mesh, batch=args.batch, steps=args.steps, lr=1e-4, warmup=2, loss=args.loss,
            ckpt_every=10**9, dtype=jnp.bfloat16, progress=False, remat=not args.no_remat,
        )  # fmt: skip
        history, _ = run(teacher, config, student, student_config, sequences, out_dir, options)
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
    result = {
        "command": f"python -m eval.experiments.fullsize_distill --batch {args.batch} --steps {args.steps} "
        f"--seq-len {args.seq_len} --loss {args.loss} --mesh {args.mesh}"
        + (" --no-remat" if args.no_remat else ""),
        "model": "gpt-oss-20b shape, random bf16 weights; student: decompressed MLA, latent "
        f"{DEFAULT_LATENT_DIM}, PCA init, all {config.num_hidden_layers} layers",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "setup_s": setup_s,
        "jax": jax.__version__,
        **summary,
        "step_s": [h["step_s"] for h in history],
        "kl": [h["kl"] for h in history],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "kl")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
