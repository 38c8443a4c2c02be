"""Each attention decode kernel against its jnp path (and JAX's stock GQA kernel), for `eval.bench.decode
--kernels`: one layer at a batch and context, random caches full to the context, the kernel over a sweep of
launches (agreement, time, share of the copy bandwidth) and the slices the model's plan picks."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eval.bench.timing import copy_bandwidth, switched, timed
from gptoss_mla_jax import flash_decode, flash_decode_mosaic, mla
from gptoss_mla_jax.attention import attend
from gptoss_mla_jax.config import GPT_OSS_20B, MlaConfig
from gptoss_mla_jax.flash_decode import Launch, Slots

try:  # the peer: JAX's stock Triton decode kernel, deprecated in JAX 0.11 with the rest of pallas.ops.gpu
    from jax.experimental.pallas.ops.gpu import decode_attention
except ImportError:
    decode_attention = None


# Launch settings tried at every point: (block, warps, pipeline stages); absorbed MLA also splits its 64
# heads over 2 or 4 programs, decompressed MLA gives each program 1, 2 or 4 kv heads (query heads per
# program: `head_block`).
KERNEL_CONFIGS = [
    dict(block=block, warps=warps, stages=stages)
    for block, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (64, 8, 2), (128, 8, 2))
]


HEAD_BLOCKS = {
    "gqa": [],
    "mla": [
        dict(block=b, warps=w, stages=s, head_block=h)
        for h in (8, 32)
        for b, w, s in ((64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))
    ],
    "mla_partial": [dict(block=64, warps=4, stages=2, head_block=h) for h in (32, 16)],
    "mla_mosaic": [],
}


# The Mosaic GPU decompressed kernel (`flash_decode_mosaic`): one warpgroup a program (4 warps) or two, one
# making the keys and one attending (8); 64-slot blocks (a program of 128-slot blocks or four kv heads would
# not fit an H200 SM's shared memory); its pipeline is its own (stages unused).
MOSAIC_CONFIGS = [dict(block=64, warps=w, stages=2) for w in (4, 8)]


def kernel_rows(
    batches: list[int],
    contexts: list[int],
    repeats: int,
    smoke: bool,
    log,
    layers=("gqa", "mla", "mla_partial"),
) -> list[dict]:
    """One layer's decode attention at gpt-oss-20b shapes over full caches of random bf16, Pallas kernel
    (flash_decode) against the jnp path it replaces: GQA (64 heads over 8 kv heads of 64; also JAX's stock
    Pallas `gqa` decode kernel, which has no sinks), decompressed MLA (the default conversion, latent 192:
    keys rebuilt on chip) and absorbed partial-mode MLA (latent 160 + 2 RoPE pairs per kv head; both 80.9%
    less cache); `mla_mosaic` (asked for by name): decompressed MLA on its Mosaic GPU kernel. Time, and bytes
    of cache read over the card's copy bandwidth."""
    shape = (
        dict(
            G=2,
            R=2,
            d=16,
            n2=4,
            r=24,
            configs=[dict(block=16, warps=4, stages=2)],
            head_blocks={
                "gqa": [],
                "mla": [dict(block=16, warps=4, stages=2, head_block=2)],
                "mla_partial": [dict(block=16, warps=4, stages=2, head_block=2)],
                "mla_mosaic": [],
            },
        )
        if smoke
        else dict(G=8, R=8, d=64, n2=4, r=160, configs=KERNEL_CONFIGS, head_blocks=HEAD_BLOCKS)
    )
    # the Mosaic GPU kernel's smallest shape: 64-slot blocks, rows of whole 128-byte swizzles
    mosaic = dict(configs=MOSAIC_CONFIGS) | (dict(G=2, R=8, d=64, n2=0, r=64) if smoke else {})
    shape_of = lambda layer: (
        shape | dict(head_blocks=shape["head_blocks"][layer]) | (mosaic if layer == "mla_mosaic" else {})
    )
    copy = copy_bandwidth(0.05 if smoke else 4.0)
    rows = [{"copy_gb_per_s": copy / 1e9}]
    # Agreement in float32 first (one small point per kernel, where bf16 rounding does not blur a bug),
    # then the bf16 speed table. In float32, block 128 with 3 stages asks an H200 for more shared memory
    # than it has; that setting's failure is recorded and the others run.
    check = [(layer, 2, min(contexts), jnp.float32) for layer in layers if layer != "mla_mosaic"]  # 16-bit
    points = [(layer, b, c, jnp.bfloat16) for c, b, layer in itertools.product(contexts, batches, layers)]
    # "mla" on the Triton kernel, "mla_mosaic" on Mosaic GPU's at each of MOSAIC_CONFIGS' warps
    kernel_choice = {"mla": "triton", "mla_mosaic": "mosaic"}
    for layer, batch, context, dtype in check + points:
        try:
            with switched(
                *(
                    [(flash_decode, "DECOMPRESSED_KERNEL", kernel_choice[layer])]
                    if layer in kernel_choice
                    else []
                )
            ):
                rows.append(
                    kernel_point(layer, batch, context, repeats, copy, dtype=dtype, **shape_of(layer))
                )
        except Exception as e:  # a lowering failure or an OOM is a result too: say which and go on
            rows.append(
                {
                    "layer": layer,
                    "batch": batch,
                    "context": context,
                    "dtype": jnp.dtype(dtype).name,
                    "error": f"{type(e).__name__}: {e}"[:1500],
                }
            )
        log(rows[-1])
    return rows


def of_copy(nbytes: int, ms: float, copy: float) -> float:
    """Bytes read in `ms` milliseconds over the card's copy bandwidth (bytes per second)."""
    return nbytes / (ms / 1e3) / copy


def path_times(paths: dict, args, nbytes: int, copy: float, repeats: int) -> dict:
    """Each non-kernel path (name -> function of `args`) timed: `{name}_ms` and `{name}_of_copy_bandwidth`."""
    out = {}
    for name, fn in paths.items():
        ms = 1e3 * timed(jax.jit(fn), *args, repeats=repeats)
        out[f"{name}_ms"], out[f"{name}_of_copy_bandwidth"] = ms, of_copy(nbytes, ms, copy)
    return out


def sweep(make, settings: list[dict], args, want, nbytes: int, copy: float, repeats: int) -> dict:
    """Each launch setting of a kernel (`make(setting)`: the function) on `args`: its time, the bytes it
    must read over the card's copy bandwidth, and its largest difference from `want`. A setting that fails
    (e.g. more shared memory than the card has) is recorded and the others still run; the best one's
    numbers are lifted to the top."""
    configs = []
    for setting in settings:
        fn = jax.jit(make(setting))
        try:
            error = float(jnp.abs(fn(*args).astype(jnp.float32) - want).max())
        except Exception as e:
            configs.append(setting | {"error": f"{type(e).__name__}: {e}"[:500]})
            continue
        ms = 1e3 * timed(fn, *args, repeats=repeats)
        configs.append(
            setting | {"ms": ms, "of_copy_bandwidth": of_copy(nbytes, ms, copy), "max_abs_error": error}
        )
    ran = [c for c in configs if "ms" in c]
    if not ran:
        raise RuntimeError(f"no launch setting ran: {configs[0]['error']}")
    best = min(ran, key=lambda c: c["ms"])
    return {
        "configs": configs,
        "kernel_ms": best["ms"],
        "kernel_of_copy_bandwidth": best["of_copy_bandwidth"],
        "kernel_plan": {
            k: v for k, v in best.items() if k not in ("ms", "of_copy_bandwidth", "max_abs_error")
        },
        "max_abs_error": max(c["max_abs_error"] for c in ran),
    }


class KernelCase(NamedTuple):
    """One layer's decode attention at one point: its inputs (`args`), the kernel's function of a launch
    (`kernel(Launch) -> fn(*args)`), the jnp path it replaces (`reference(*args)`), the cache's bytes, and
    JAX's stock peer where there is one."""

    args: tuple
    kernel: Callable
    reference: Callable
    cache_bytes: int
    peers: dict


def kernel_case(layer: str, batch: int, context: int, G, R, d, n2, r, dtype) -> KernelCase:
    """Random inputs of `layer` (gqa; mla: decompressed, latent r + G n2; mla_partial: latent r plus n2
    RoPE values per kv head; mla_rorope: one RoPE key of d values that every head reads plus a latent of
    r + G n2 - d, the same cache size) over full caches of `context` slots, every sequence at full length."""
    keys = iter(jax.random.split(jax.random.key(0), 10))
    normal = lambda *shape: jax.random.normal(next(keys), shape, dtype)
    lengths, sinks = jnp.full((batch,), context, jnp.int32), normal(G * R)
    pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    visible, q_pos = pos < lengths[:, None], (lengths - 1)[:, None]
    slots = Slots(lengths)
    if layer == "gqa":
        cache = (normal(batch, context, G, d), normal(batch, context, G, d))
        args = (normal(batch, G * R, d), *cache)
        kernel = lambda launch: lambda q, k, v: flash_decode.gqa_decode(q, k, v, slots, sinks, launch)
        reference = lambda q, k, v: attend(q[:, None], [(k, v, pos, visible)], q_pos, sinks, None)[:, 0]
        splits, block = flash_decode.plan_for("gqa", context, batch * G, 128)  # GQA's launch in the model
        stock_gqa = lambda q, k, v: decode_attention.gqa(
            q,
            k,
            v,
            kv_seq_len=lengths,
            block_k=block,
            k_splits=splits,
            interpret=jax.default_backend() == "cpu",
        )
        # a JAX without pallas.ops.gpu: the table goes on without the peer
        peers = {} if decode_attention is None else {"stock_gqa": stock_gqa}
        return KernelCase(args, kernel, reference, sum(x.nbytes for x in cache), peers)
    if layer in ("mla", "mla_mosaic"):  # mla_mosaic: the same on DECOMPRESSED_KERNEL "mosaic"
        config = dataclasses.replace(
            GPT_OSS_20B, num_attention_heads=G * R, num_key_value_heads=G, head_dim=d,
            mla=MlaConfig("decompressed", (1,), (r + G * n2,)),
        )  # fmt: skip
        kv_b = {"kernel": normal(r + G * n2, 2 * G * d), "bias": normal(2 * G * d)}
        cache = (normal(batch, context, r + G * n2),)
        args = (normal(batch, G * R, d), *cache)
        rotations = lambda: mla.slot_rotations(lengths, context, False, config)  # in the step, as in forward
        kernel = lambda launch: (
            lambda q, c: flash_decode.mla_decompressed_decode(q, kv_b, c, slots, sinks, rotations(), launch)
        )
        # mla_mosaic: a launch the Mosaic GPU kernel does not run is an error, not Triton's time
        if layer == "mla_mosaic":
            triton = kernel

            def kernel(launch):
                reason = flash_decode_mosaic.refusal((batch, G, R, d), dtype, r + G * n2, launch)
                if reason is not None:
                    raise ValueError(f"the Mosaic GPU kernel does not run {launch}: {reason}")
                return triton(launch)

        reference = lambda q, c: attend(
            q[:, None], [(*mla.keys_values({"kv_b": kv_b}, {"c": c}, pos, config, 1), pos, visible)], q_pos,
            sinks, None,
        )[:, 0]  # fmt: skip
        return KernelCase(args, kernel, reference, cache[0].nbytes, {})
    if layer == "mla_rorope":  # one shared key of one mixed component (d values), the same cache size
        r, n2, rope_heads, n = r + G * n2 - d, d, 1, d
    else:
        rope_heads, n = G, d - n2
    weights = (normal(r, G, n), normal(G, n), normal(r, G, d), normal(G, d))
    cache = (normal(batch, context, r), normal(batch, context, rope_heads, n2))
    args = (normal(batch, G, R, n2), normal(batch, G, R, n), *cache)
    kernel = lambda launch: (
        lambda q_rope, q_nope, c, k_rope: flash_decode.mla_absorbed_decode(
            q_rope, q_nope, weights, {"c": c, "k_rope": k_rope}, slots, sinks, launch
        )
    )
    reference = lambda q_rope, q_nope, c, k_rope: mla._absorbed(
        q_rope[:, None], q_nope[:, None], weights, [({"c": c, "k_rope": k_rope}, pos, visible)], q_pos,
        sinks, None,
    )[:, 0]  # fmt: skip
    return KernelCase(args, kernel, reference, sum(x.nbytes for x in cache), {})


def kernel_kind(layer: str) -> flash_decode.KernelKind:
    """The kind of decode kernel the model runs `layer` on (gqa, mla: decompressed, else absorbed)."""
    return {"gqa": "gqa", "mla": "decompressed", "mla_mosaic": "decompressed"}.get(layer, "absorbed")


def kernel_programs(layer: str, batch: int, G: int, R: int, head_block: int | None) -> int:
    """The programs per cache slice the model runs `layer`'s kernel with (`programs_per_slice`)."""
    return flash_decode.programs_per_slice(kernel_kind(layer), batch, G, R, head_block)


def kernel_plan(layer: str, context: int, programs: int, block: int) -> tuple[int, int] | None:
    """The (slices, block) the model's `decode_plan` picks for `layer`'s kernel over `context` slots."""
    return flash_decode.plan_for(kernel_kind(layer), context, programs, block)


def kernel_point(layer, batch, context, repeats, copy, G, R, d, n2, r, configs, head_blocks, dtype) -> dict:
    case = kernel_case(layer, batch, context, G, R, d, n2, r, dtype)
    want = jax.jit(case.reference)(*case.args).astype(jnp.float32)
    row = {"layer": layer, "batch": batch, "context": context, "dtype": jnp.dtype(dtype).name}
    row["bytes"] = case.cache_bytes
    row["max_abs_reference"] = float(jnp.abs(want).max())
    plans = []
    for launch in configs + head_blocks:
        programs = kernel_programs(layer, batch, G, R, launch.get("head_block"))
        # the slices decode_plan would pick for this many programs
        splits, block = kernel_plan(layer, context, programs, launch["block"])
        plans.append(launch | dict(splits=splits, block=block))
    interpret = jax.default_backend() == "cpu"
    make = lambda plan: case.kernel(Launch(**plan, interpret=interpret))
    row |= sweep(make, plans, case.args, want, row["bytes"], copy, repeats)
    return row | path_times({"jnp": case.reference, **case.peers}, case.args, row["bytes"], copy, repeats)
