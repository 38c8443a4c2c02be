"""One layer's MoE in a decode step, for `eval.bench.decode --moe`: on the grouped matmul's kernels (the
launch table's launch and a sweep), on the jnp path, its routing alone and as the decode step runs it, each
timed on the device and set against the bytes it must read."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench.timing import copy_bandwidth, device_us, in_loop, switched, timed
from gptoss_mla_jax import flash_decode, gmm_mosaic, routing
from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax import moe as moe_lib
from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig
from gptoss_mla_jax.generation import DEMO_CONFIG
from gptoss_mla_jax.model import init_params, with_aligned_scales

# Launch settings of the grouped matmul's decode-batch products ("_small" kinds: row tiles of 16 or 32)
# tried by --moe beside the table's own choice: (output columns, contraction step, warps, stages,
# contraction splits). "deep": deeper software pipelines (`--moe-launches deep`); at batch 1 a program's 12
# steps looked as if each waited out a memory latency with two loads ahead, but none of them was faster.
MOE_LAUNCHES = {
    name: [
        dict(cols=cols, depth=depth, warps=warps, stages=stages, splits=splits)
        for cols, depth, warps, stages, splits in launches
    ]
    for name, launches in {
        "standard": (
            (64, 256, 4, 3, 1), (64, 128, 4, 4, 1), (32, 256, 4, 3, 1), (128, 128, 4, 3, 1),
            (64, 512, 4, 2, 1), (128, 256, 8, 3, 1), (64, 256, 4, 3, 2), (64, 256, 4, 3, 4),
            (128, 256, 4, 3, 4), (32, 256, 4, 3, 2),
        ),
        "deep": (
            (64, 256, 4, 3, 1), (64, 256, 4, 4, 1), (64, 256, 4, 5, 1), (64, 256, 4, 6, 1),
            (64, 128, 4, 6, 1), (64, 128, 4, 8, 1), (32, 256, 4, 5, 1), (64, 256, 8, 4, 1),
            (128, 128, 4, 5, 1), (64, 256, 4, 5, 2),
        ),
        "none": (),  # the launch table's own only: A/B runs of layouts
    }.items()
}  # fmt: skip


# Routing kernel launches tried by --moe where it serves the batch (depth, warps, stages): default first.
ROUTER_LAUNCHES = [
    dict(depth=depth, warps=warps, stages=stages)
    for depth, warps, stages in (
        (256, 4, 3), (64, 4, 1), (128, 4, 4), (256, 8, 3), (512, 4, 2), (256, 2, 3), (256, 1, 3), (128, 1, 4),
        (512, 4, 3), (256, 4, 5), (512, 8, 3), (1024, 4, 2), (1024, 8, 3),
    )
]  # fmt: skip


def routing_rows(p, flat, config: GptOssConfig, smoke: bool) -> dict:
    """A decode batch's routing (router, top-k, softmax, the aligned layout), its device time per call
    (`device_us`): the routing kernel at each of ROUTER_LAUNCHES, and the jnp path (`moe.route` and
    `moe._aligned_slots`, several XLA kernels) for comparison; each kernel launch's layout checked equal to
    the jnp path's."""
    from gptoss_mla_jax.moe import _aligned_slots, layout_align, route

    k, E = config.num_experts_per_tok, config.num_local_experts
    align = layout_align(flat.shape[0], config)

    def on_jnp(p, flat):
        weights, idx = route(p, flat, config)
        expert = idx.reshape(-1)
        slot, padded = _aligned_slots(expert, E, align)
        return weights, slot, padded

    on_jnp = jax.jit(on_jnp)
    want = on_jnp(p, flat)
    out = {"jnp": device_us(on_jnp, p, flat), "kernel": []}
    for launch in ROUTER_LAUNCHES[:2] if smoke else ROUTER_LAUNCHES:
        kernel = jax.jit(
            functools.partial(
                lambda p, flat, tiles: routing.decode_routing(
                    flat, p["router"]["kernel"], p["router"]["bias"], k, align,
                    interpret=not flash_decode.runs_compiled(), launch=tiles,
                ), tiles=routing.RouterLaunch(**launch),
            )
        )  # fmt: skip
        try:
            got = kernel(p, flat)
        except Exception as e:  # a launch that does not compile (shared memory) is recorded
            out["kernel"].append(launch | {"error": f"{type(e).__name__}: {e}"[:300]})
            continue
        same = bool((got[2] == want[1]).all() & (got[3] == want[2]).all())
        out["kernel"].append(launch | device_us(kernel, p, flat) | {"same_layout": same})
    return out


def moe_layer(config: GptOssConfig) -> dict:
    """One layer's MoE parameters (random, MXFP4 experts) as `generate` hands them to the kernels: scale
    rows padded (`with_aligned_scales`)."""
    one_layer = dataclasses.replace(config, num_hidden_layers=1, layer_types=config.layer_types[:1])
    params = with_aligned_scales(init_params(one_layer, jax.random.key(0), jnp.bfloat16, "mxfp4"))
    return params["layers"][0]["mlp"]


# The wide-batch kernel's launches tried by --moe (`--wide-launches`): (gate_up, down) programs' weight rows,
# stages, (down) whether it writes rows and the layout's row tile (`gmm_mosaic.Launch`, 32 rows unless given);
# "default" the launch table's alone (its row tile by the batch: `gmm_mosaic.at_pairs`). Programs of 384 / 320
# rows read the activations' tiles once for more weights (a third / three fifths of the L2 reads per weight of
# 128 / 192) but hold 218 / 188 registers a thread (two programs an SM; `mosaic_ptxas`); down written as rows
# spares the weighted sum its transposed read; tiles of 64 rows decode an expert's weights once for up to 64
# pairs (batch 256's 32 an expert on average, the most above 32: half the programs of 32-row tiles) at 125 /
# 170 registers.
WIDE_LAUNCHES = {
    "default": [None],
    "sweep": [
        None, ((128, 4), (192, 4, False)), ((128, 3), (192, 3, True)), ((128, 5), (192, 5, True)),
        ((384, 3), (320, 4, True)), ((384, 4), (320, 3, True)),
    ],
    "rows": [
        None, ((128, 4, False, 32), (192, 4, True, 32)), ((128, 4, False, 64), (192, 4, True, 64)),
        ((128, 3, False, 64), (192, 3, True, 64)), ((128, 5, False, 64), (192, 5, True, 64)),
        ((128, 4, False, 64), (64, 4, True, 64)),
    ],
}  # fmt: skip


def wide_params(p, config: GptOssConfig, launches) -> tuple[dict | None, dict]:
    """One layer's MoE parameters with the experts' wide-batch layout at `launches` ((gate_up, down), each
    `gmm_mosaic.Launch`'s fields; None: the launch table's; None where the kernel is not compiled here), and
    that launch table, which the step must be traced under (`gmm_mosaic.LAUNCH`)."""
    table = gmm_mosaic.LAUNCH
    if launches is not None:
        names = ("gate_up", "down")
        table = {name: gmm_mosaic.Launch(*launch) for name, launch in zip(names, launches, strict=True)}
    if not flash_decode.runs_compiled():
        return None, table
    with switched((gmm_mosaic, "LAUNCH", table)):
        wide = gmm_mosaic.prepare(p["experts"], config.intermediate_size)
    return (None if wide is None else {**p, "experts": {**p["experts"], moe_lib.WIDE: wide}}), table


def moe_rows(
    batches: list[int], repeats: int, smoke: bool, log, sweep: str = "standard", wide_sweep: str = "default"
) -> list[dict]:
    """One layer's MoE in a decode step at each batch, MXFP4 experts: on the kernels (the grouped matmul,
    the launch table's choice, then each of MOE_LAUNCHES[sweep]; on the GPU, at batches that take it, the
    wide-batch kernel, launch "wide") and on the jnp path (gather the selected
    experts, dequantize, multiply), each timed on the device (`in_loop`), and its routing alone
    (`routing_rows`); the byte floor (the distinct selected experts' packed bytes, read once, over the copy
    bandwidth); and the kernels' largest difference from the float32 reference on the same routing."""
    from gptoss_mla_jax.gmm import Tiles
    from gptoss_mla_jax.moe import moe_dense, moe_sparse, route

    config = DEMO_CONFIG if smoke else GPT_OSS_20B
    p = jax.block_until_ready(moe_layer(config))
    wides = [wide_params(p, config, launches) for launches in WIDE_LAUNCHES[wide_sweep]]
    on_kernels = lambda p, x: moe_sparse(p, x, config, kernels=True)
    launches = MOE_LAUNCHES[sweep][-1:] if smoke else MOE_LAUNCHES[sweep]  # smoke: the default and one
    inner = 2 if smoke else 20
    copy = copy_bandwidth(0.05 if smoke else 4.0)
    expert_bytes = sum(v[0].nbytes for k, v in p["experts"].items())  # one expert: blocks, scales, biases
    f32 = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def reference(p, x):  # float32 experts on the kernels' own (bf16) routing: a near tie can flip a choice
        routing = route(p, x.reshape(-1, x.shape[-1]), config)
        return moe_dense(jax.tree.map(f32, p), x.astype(jnp.float32), config, routing)

    out = [{"copy_gb_per_s": copy / 1e9, "expert_bytes": expert_bytes}]
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, 1, config.hidden_size), jnp.bfloat16)
        _, idx = route(p, x.reshape(batch, -1), config)
        distinct = len(set(np.asarray(idx).ravel().tolist()))
        nbytes = distinct * expert_bytes + p["router"]["kernel"].nbytes
        row = {"batch": batch, "pairs": batch * config.num_experts_per_tok, "distinct_experts": distinct}
        row["bytes"], row["floor_ms"] = nbytes, 1e3 * nbytes / copy
        want = jax.jit(reference)(p, x)
        row["max_abs_reference"] = float(jnp.abs(want).max())
        ms = lambda fn, x=x, p=p: 1e3 * timed(in_loop(fn, inner), p, x, repeats=repeats) / inner
        row["jnp_ms"] = ms(lambda p, x: moe_sparse(p, x, config))

        def measured(params, label: dict, x=x, want=want, ms=ms) -> dict:
            """`label` with the MoE on the kernels with `params` timed, its busy time and its difference
            from `want`, or with why it did not run (a launch that does not compile: shared memory)."""
            try:
                error = float(jnp.abs(jax.jit(on_kernels)(params, x).astype(jnp.float32) - want).max())
                device = device_us(jax.jit(on_kernels), params, x)
                return label | {"ms": ms(on_kernels, x, params), "max_abs_error": error, "device": device}
            except Exception as e:
                return label | {"error": f"{type(e).__name__}: {e}"[:300]}

        configs = []
        for launch in [None, *launches]:  # None: the launch table's own choice at this batch
            kinds = ("mxfp4_small", "mxfp4_small_wide", "mxfp4_t_small")
            swept = {} if launch is None else {(k, None, None): Tiles(rows=16, **launch) for k in kinds}
            with switched((gmm_lib, "LAUNCH", {**gmm_lib.LAUNCH, **swept})):
                configs.append(measured(p, launch or {"launch": "default"}))
        for p_wide, table in wides:  # the wide-batch kernel where the batch takes it
            if p_wide is not None and moe_lib.wide_batch(batch, config):
                named = {name: dataclasses.astuple(launch) for name, launch in table.items()}
                with switched((gmm_mosaic, "LAUNCH", table)):
                    configs.append(measured(p_wide, {"launch": "wide", "wide": named}))
        ran = [c for c in configs if "ms" in c]
        best = min(ran, key=lambda c: c["ms"])
        row |= {"configs": configs, "kernel_ms": best["ms"], "kernel_launch": best}
        if moe_lib.routed_in_kernel(batch, config):
            row["routing"] = routing_rows(p, x.reshape(batch, -1), config, smoke)
            row["stepped"] = stepped_moe(p, x, config, ms, want)
        row["kernel_over_floor"] = best["ms"] / row["floor_ms"]
        row["max_abs_error"] = max(c["max_abs_error"] for c in ran)
        log(row)
        out.append(row)
    return out


def stepped_moe(p, x, config: GptOssConfig, ms, want) -> dict:
    """The MoE as a decode step on the kernels runs it: routed from the router's product, which the step
    takes in the kernel of the residual add before it (`add_norm.add_norm_routed`; here given, not timed),
    the rows' weighted sum in jnp (`add_norm.moe_delta`; the step takes it in the kernel of the residual add
    after it); timed by `ms` and by the device's busy time, and its largest difference from `want` (the
    float32 reference)."""
    from gptoss_mla_jax.add_norm import moe_delta

    flat = x.reshape(-1, x.shape[-1])
    partials = jnp.dot(flat, p["router"]["kernel"], preferred_element_type=jnp.float32)[None]

    def fn(p, x):
        # Tied to this call's input, so that a loop of calls (`in_loop`) cannot hoist the routing out of it.
        x, given = jax.lax.optimization_barrier((x, partials))
        return moe_delta(moe_lib.expert_rows(p, x, config, given), flat.shape[0], x.dtype).reshape(x.shape)

    error = float(jnp.abs(jax.jit(fn)(p, x).astype(jnp.float32) - want).max())
    return {"ms": ms(fn), "max_abs_error": error, "device": device_us(jax.jit(fn), p, x)}
