"""Does the forward on a data-parallel mesh equal the same forward on one device, at gpt-oss-20b's
shapes? Each piece of a decoder layer is compared separately, so a mismatch names the op.

    python -m eval.experiments.sharded_forward_check [--mesh 4x1] [--batch 4] [--seq-len 2048] [--layers 2]
        [--out eval/results/sharded_forward_check.json] [--smoke]

Random gpt-oss-20b-shaped weights (MXFP4 experts, bf16 elsewhere), random tokens. Reported per piece:
the largest absolute difference between the sharded and the one-device result, relative to the largest
absolute value of the one-device result; for the whole forward also each one's distance from a float32
forward on one device (largest difference and mean KL). The largest difference of a whole forward is
dominated by tokens whose top-k expert choice flips with bf16 rounding (on an H200 both the one-device and
the 4x1 forward are 0.72 from float32), so the mean KL is the statistic that can tell a sharding bug from
rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval.experiments import fullsize_checkpoint
from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.execution import ForwardOptions, by_rows
from gptoss_mla_jax.model import embed, forward, init_params, unembed
from gptoss_mla_jax.moe import expert_matrices, moe_dense, moe_sparse
from gptoss_mla_jax.sharding import residual_sharding
from support.results import write_json
from train.sharding import batch_sharding, make_mesh, shard_params


def mean_kl(reference, logits) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)): unlike the largest difference,
    it is not set by the few tokens whose top-k routing flips under a different rounding."""
    p = jax.nn.log_softmax(jnp.asarray(reference, jnp.float32), axis=-1)
    q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mesh", default="4x1")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model (CPU check of the script)")
    parser.add_argument("--pieces", help="comma-separated subset of the pieces (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    base = fullsize_checkpoint.SMOKE if args.smoke else GPT_OSS_20B
    config = dataclasses.replace(base, num_hidden_layers=args.layers, layer_types=())
    params = init_params(config, jax.random.key(0), jnp.bfloat16, experts="mxfp4")
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, config.vocab_size)
    x = (jax.random.normal(jax.random.key(2), (args.batch, args.seq_len, config.hidden_size))).astype(
        jnp.bfloat16
    )
    mlp = params["layers"][0]["mlp"]
    dense_experts = dict(
        mlp,
        experts=dict(
            zip(("gate_up_proj", "down_proj"), expert_matrices(mlp["experts"], jnp.bfloat16), strict=True),
            **{k: v for k, v in mlp["experts"].items() if k.endswith("bias")},
        ),
    )
    pieces = {
        "moe_sparse_mxfp4": (lambda p, x: moe_sparse(p, x, config), mlp, x),
        "moe_sparse_dense_experts": (lambda p, x: moe_sparse(p, x, config), dense_experts, x),
        "moe_dense": (lambda p, x: moe_dense(p, x, config), mlp, x),
        "forward_dense_moe": (
            lambda p, t: forward(p, t, None, config, options=ForwardOptions(moe="dense"))[0],
            params,
            tokens,
        ),
        "forward_sparse_moe": (lambda p, t: forward(p, t, None, config)[0], params, tokens),
        "embed": (embed, params, tokens),
        "unembed": (lambda p, x: unembed(p, x, config), params, x),
    }
    pieces = {name: pieces[name] for name in args.pieces.split(",")} if args.pieces else pieces
    mesh = make_mesh(args.mesh)
    # What train.distill runs: the residual stream pinned by rows, the MoE on each device's own rows.
    rows = residual_sharding(mesh)
    moe = functools.partial(moe_sparse, config=config)
    sharded_fns = {
        "moe_sparse_mxfp4_per_shard": by_rows(moe, rows),
        "forward_sparse_moe_pinned": lambda p, t: forward(
            p, t, None, config, options=ForwardOptions(mesh=mesh)
        )[0],
    }
    if "forward_sparse_moe" in pieces:
        pieces["forward_sparse_moe_pinned"] = pieces["forward_sparse_moe"]
    pieces["moe_sparse_mxfp4_per_shard"] = (lambda p, x: moe_sparse(p, x, config), mlp, x)
    result = {"device": jax.devices()[0].device_kind, "mesh": args.mesh, "batch": args.batch,
              "seq_len": args.seq_len, "layers": args.layers, "relative_difference": {}}  # fmt: skip
    for name, (fn, p, inputs) in pieces.items():
        one = jax.jit(fn)(p, inputs)
        sharded = jax.jit(sharded_fns.get(name, fn))(
            shard_params(p, mesh), jax.device_put(inputs, batch_sharding(mesh))
        )
        result["relative_difference"][name] = relative_difference(sharded, one)
        print(f"{name}: {result['relative_difference'][name]:.3g}", flush=True)
        if name.startswith("forward"):  # which of the two is wrong: both against float32 on one device
            f32 = jax.tree.map(lambda a: a if a.dtype == jnp.uint8 else a.astype(jnp.float32), p)
            exact = jax.jit(fn)(f32, inputs)
            for which, value in (("one_device", one), ("sharded", sharded)):
                key = f"{name}_{which}_vs_float32"
                result["relative_difference"][key] = relative_difference(value, exact)
                result.setdefault("mean_kl_from_float32", {})[key] = mean_kl(exact, value)
                print(f"{key}: {result['relative_difference'][key]:.3g}, mean KL "
                      f"{result['mean_kl_from_float32'][key]:.3g}", flush=True)  # fmt: skip
        del one, sharded
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
