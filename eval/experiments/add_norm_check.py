"""The fused residual add + RMSNorm kernel (`add_norm`) compiled on the GPU: its agreement with the jnp path
it replaces, and its device time against XLA's kernels for the same work, at gpt-oss-20b's width.

Per batch (1, 8, 64 tokens of 2,880 bf16 values): the plain form (after the attention: x + delta and its
norm) and the MoE form (the down product's rows gathered by slot, its two contraction splits added, the
weighted sum, the add and the norm), each compiled against the jitted jnp reference (`add_norm_reference`,
which XLA runs as its own kernels): the largest difference of each output and both device busy times
(profiler). Then the add before the MoE and the routing kernel with the router's product taken in the
add's kernel (`add_norm_routed`, `routing_of_logits`) and without (`add_norm`, `decode_routing`): whether
both route alike, and both pairs' device time. Then a decode step of the demo model on the kernels with
each setting of `model.FUSED_NORMS`, bf16: the largest logit difference from the step without the fused
adds and whether the same tokens win. Both paths
round differently (XLA may keep float32 between ops where the kernel rounds to bf16 as the jnp code is
written), so a near-tie in the routing can flip an expert and move a logit by more than a few bf16 steps.

    python -m eval.experiments.add_norm_check --out eval/results/add_norm_check_h200.json
"""

from __future__ import annotations

import argparse
import json
from typing import get_args

import jax
import jax.numpy as jnp

from eval.bench.timing import device_us
from gptoss_mla_jax import model as model_lib
from gptoss_mla_jax.add_norm import ExpertRows, add_norm, add_norm_reference, add_norm_routed
from gptoss_mla_jax.flash_decode import runs_compiled
from gptoss_mla_jax.moe import ALIGN
from gptoss_mla_jax.routing import decode_routing, routing_of_logits
from support.results import write_json

D, E, K, EPS = 2880, 32, 4, 1e-5


def inputs(N: int, seed: int = 0):
    """x, a plain delta, the norm's weight and the MoE's rows (two float32 split partials over an aligned
    layout, token n's k pairs at distinct slots, routing tiles of 16 rows as the routing kernel stores
    them), bf16."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (N, D), jnp.bfloat16) * 3
    delta = jax.random.normal(keys[1], (N, D), jnp.bfloat16)
    weight = 1 + 0.1 * jax.random.normal(keys[2], (D,), jnp.bfloat16)
    M, tile = 16 * (N * K + 16), max(16, N)
    rows = jax.random.normal(keys[3], (2, M, D), jnp.float32)
    slot = (
        jnp.zeros((tile, K), jnp.int32).at[:N].set(jax.random.permutation(keys[4], M)[: N * K].reshape(N, K))
    )
    routing = jnp.zeros((tile, K)).at[:N].set(jax.nn.softmax(jax.random.normal(keys[5], (N, K)), axis=-1))
    return x, delta, weight, ExpertRows(rows, slot, routing)


def kernel_rows(batches) -> list[dict]:
    interpret = not runs_compiled()
    out = []
    for N in batches:
        x, delta, weight, experts = inputs(N)
        for form, d in (("plain", delta), ("moe", experts)):
            fused = jax.jit(lambda x, d, w: add_norm(x, d, w, EPS, interpret))
            xla = jax.jit(lambda x, d, w: add_norm_reference(x, d, w, EPS))
            got, want = fused(x, d, weight), xla(x, d, weight)
            row = {"tokens": N, "form": form}
            row |= {
                f"max_abs_error_{name}": float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max())
                for name, g, w in zip(("x", "h"), got, want, strict=True)
            }
            row["max_abs_h"] = float(jnp.abs(want[1].astype(jnp.float32)).max())
            if not interpret:
                row["kernel"] = device_us(fused, x, d, weight)
                row["xla"] = device_us(xla, x, d, weight)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def router_rows(batches) -> list[dict]:
    """The add before the MoE and the routing as the model runs them with the router's product in the add's
    kernel (`add_norm_routed`, then `routing_of_logits` on its partial sums) and without (`add_norm`, then
    `decode_routing`): whether both route alike, and the device busy time of each pair of kernels."""
    interpret = not runs_compiled()
    keys = jax.random.split(jax.random.key(7), 2)
    router = D**-0.5 * jax.random.normal(keys[0], (D, E), jnp.bfloat16)
    bias = jax.random.normal(keys[1], (E,), jnp.bfloat16)

    def split(x, d, w):
        x, h, partials = add_norm_routed(x, d, w, router, EPS, interpret)
        return x, h, routing_of_logits(partials, bias, K, ALIGN, x.dtype, interpret, tiles=True)

    def whole(x, d, w):
        x, h = add_norm(x, d, w, EPS, interpret)
        return x, h, decode_routing(h, router, bias, K, ALIGN, interpret, tiles=True)

    out = []
    for N in batches:
        x, delta, weight, _ = inputs(N)
        fns = {"routed": jax.jit(split), "plain": jax.jit(whole)}
        (*a, ra), (*b, rb) = (fn(x, delta, weight) for fn in fns.values())
        row = {"tokens": N, "same_x_h": all(bool((p == q).all()) for p, q in zip(a, b, strict=True))}
        row["max_abs_weight_difference"] = float(jnp.abs(ra[0][:N, :K] - rb[0][:N, :K]).max())
        row["same_experts"] = bool((ra[1][:N, :K] == rb[1][:N, :K]).all())
        row["same_slots"] = bool((ra[2][:N, :K] == rb[2][:N, :K]).all())
        if not interpret:
            row |= {f"{name}_us": device_us(fn, x, delta, weight) for name, fn in fns.items()}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def step_rows(batches) -> list[dict]:
    """The demo model's decode step on the kernels, bf16, with the fused adds (with the router's product in
    the first and without) and without them."""
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG as config

    params = model_lib.with_aligned_scales(
        model_lib.init_params(config, jax.random.key(0), jnp.bfloat16, experts="mxfp4")
    )
    out, default = [], model_lib.FUSED_NORMS
    for B in batches:
        tokens = jax.random.randint(jax.random.key(B), (B, 33), 0, config.vocab_size)
        cache = init_cache(config, B, 64)
        _, cache, _ = model_lib.forward_jit(params, tokens[:, :32], cache, config)
        logits = {}
        for setting in get_args(model_lib.FusedNorms):
            model_lib.FUSED_NORMS = setting
            jax.clear_caches()  # read when the step is traced
            options = model_lib.ForwardOptions(decode_kernels=True)
            logits[setting] = model_lib.forward_jit(params, tokens[:, 32:], cache, config, options=options)[0]
        model_lib.FUSED_NORMS = default
        row = {"batch": B, "max_abs_logit": float(jnp.abs(logits["off"]).max())}
        for setting in ("router", "norms"):
            row[f"max_abs_logit_difference_{setting}"] = float(jnp.abs(logits[setting] - logits["off"]).max())
            row[f"same_top_token_{setting}"] = bool(
                (logits[setting].argmax(-1) == logits["off"].argmax(-1)).all()
            )
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    result["kernel"] = kernel_rows(batches)
    result["router"] = router_rows(batches)
    result["step"] = step_rows(batches)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
