"""How finely a flash-decoding kernel should split the cache at small batches, timed on the device.

`flash_decode.plan` splits a sequence's cache slots into slices until the grid has twice the SMs' programs
(GQA) or the SMs' (the MLA kernels; `flash_decode.fill_programs`). Each slice writes float32 partial sums for
every query head it serves (acc, m, l) that the combine reads back: for absorbed MLA at batch 1 x 32K 512
slices of 64 slots would write 21 MB for a 12.6 MB cache (its plan takes 256, 10.6 MB).
Fewer slices write less but leave SMs idle, unless the heads are split over programs instead (absorbed MLA:
`head_block`; its programs then share each latent block through L2). This times every attention kernel of the
model (GQA, decompressed MLA, absorbed partial and rorope MLA; gpt-oss-20b's shapes, the converted layers at
192 values per token) over a grid of slice counts around the plan's and of head blocks, by the device's busy
time per call (the kernel, the combine of its slices and the up-projection after it: a wall clock buries a few
microseconds under dispatch), beside each setting's state bytes (read off the Triton kernels' outputs: the
Mosaic GPU decompressed kernel's are not counted, 0), and the kernel's own time with the cache it reads over
the card's copy bandwidth. `--launches` tries other launches too (slots a step, warps, pipeline stages).
Every setting's output is checked against the jnp path.

    python -m eval.experiments.decode_splits --batches 1 --contexts 4096,32768 --out splits.json
    python -m eval.experiments.decode_splits --layers mla_partial --batches 8 --contexts 32768 \
        --launches 64x4x2,64x4x3,128x4x3 --factors 1,0.5 --model-heads    # absorbed MLA's launches
    python -m eval.experiments.decode_splits --smoke         # the CPU interpreter, tiny shapes (no times)
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from eval.bench.decode_kernels import kernel_case, kernel_kind, kernel_plan, kernel_programs
from eval.bench.timing import copy_bandwidth, device_us
from gptoss_mla_jax.flash_decode import Launch, pipeline_stages
from support.results import write_json

LAYERS = ("gqa", "mla", "mla_partial", "mla_rorope")
# gpt-oss-20b's attention; the converted layers at 192 values per token (partial: latent 160 plus 2 RoPE
# pairs per kv head; rorope and decompressed derive theirs from the same numbers, `kernel_case`).
SHAPE = dict(G=8, R=8, d=64, n2=4, r=160)
SMOKE_SHAPE = dict(G=2, R=8, d=16, n2=4, r=24)
# The model's launches (attention.attention, mla.attention_mla): GQA reads 128 slots a step, MLA 64.
BLOCKS = {"gqa": 128, "mla": 64, "mla_partial": 64, "mla_rorope": 64}
# Query heads per program tried: None is the model's (absorbed: all heads; decompressed: the fewest whole kv
# heads that fill 16 rows).
HEAD_BLOCKS = {"gqa": (None,), "mla": (None,), "mla_partial": (None, 32, 16), "mla_rorope": (None, 32, 16)}
SMOKE_HEAD_BLOCKS = {"gqa": (None,), "mla": (None,), "mla_partial": (None, 8), "mla_rorope": (None, 8)}
# Slice counts tried: the plan's times these factors (where the slots divide so).
SPLIT_FACTORS = (2, 1, 1 / 2, 1 / 4, 1 / 8, 1 / 32)


def _pallas_outputs(jaxpr):
    """The output avals of every pallas_call in a jaxpr and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)  # a ClosedJaxpr's, or a Jaxpr
            if hasattr(inner, "eqns"):
                yield from _pallas_outputs(inner)


def slice_state(fn, args) -> int:
    """Bytes of the per-slice state `fn` (one attention call) has its kernel write and its combine read
    back: the kernel's outputs, read off the traced call (query rows padded to 16 included, as written)."""
    return sum(aval.size * aval.dtype.itemsize for aval in _pallas_outputs(jax.make_jaxpr(fn)(*args).jaxpr))


def kernel_us(entry: dict) -> float:
    """The Pallas kernel's own device time of one timed setting: its kernels named after the kernel
    functions (`_split_kernel`, `_decompressed_kernel`, the Mosaic GPU kernel's), without the combine and
    the XLA work around it."""
    return sum(us for name, us in entry["kernels_us"].items() if "kernel" in name)


def settings(
    layer: str, batch: int, context: int, shape: dict, head_blocks, launches=None, factors=SPLIT_FACTORS,
    slot_bytes: int = 0,
) -> list[dict]:  # fmt: skip
    """The grid of one point: per head block and launch ((block, warps, stages); default the model's:
    BLOCKS' slots a step, 4 warps, `flash_decode.pipeline_stages`' stages), the plan's slices times `factors`
    that divide the slots; the model's own launch first (`model_launch`)."""
    kind, out = kernel_kind(layer), []
    model_stages = lambda splits, block: pipeline_stages(kind, context, splits, block, slot_bytes)
    for head_block, (block_asked, warps, stages) in itertools.product(
        head_blocks[layer], launches or [(BLOCKS[layer], 4, None)]
    ):
        programs = kernel_programs(layer, batch, shape["G"], shape["R"], head_block)
        steps = kernel_plan(layer, context, programs, block_asked)
        if steps is None:
            raise ValueError(
                f"--contexts: {context} slots, not a multiple of 16; the kernels split no such cache"
            )
        planned, block = steps
        for factor in factors:
            splits = int(planned * factor)
            if splits >= 1 and context % (splits * block) == 0:
                here = model_stages(splits, block) if stages is None else stages
                model = (factor == 1, head_block, warps, block, here) == (
                    True, None, 4, BLOCKS[layer], model_stages(splits, block)
                )  # fmt: skip
                out.append(
                    dict(splits=splits, block=block, warps=warps, stages=here, head_block=head_block,
                         planned=factor == 1, model_launch=model)
                )  # fmt: skip
    return sorted(out, key=lambda s: not s["model_launch"])


def point(layer: str, batch: int, context: int, smoke: bool, launches=None, factors=SPLIT_FACTORS,
          all_heads: bool = True, copy: float | None = None) -> dict:  # fmt: skip
    shape = SMOKE_SHAPE if smoke else SHAPE
    case = kernel_case(layer, batch, context, dtype=jnp.bfloat16, **shape)
    want = jax.jit(case.reference)(*case.args).astype(jnp.float32)
    interpret = jax.default_backend() == "cpu"
    row = {"layer": layer, "batch": batch, "context": context, "cache_bytes": case.cache_bytes, "configs": []}
    head_blocks = SMOKE_HEAD_BLOCKS if smoke else HEAD_BLOCKS
    if not all_heads:
        head_blocks = {name: (None,) for name in head_blocks}
    slot_bytes = case.cache_bytes // (batch * context)
    for setting in settings(layer, batch, context, shape, head_blocks, launches, factors, slot_bytes):
        launch = Launch(
            setting["splits"], setting["block"], interpret, setting["warps"], setting["stages"],
            setting["head_block"],
        )  # fmt: skip
        fn = jax.jit(case.kernel(launch))
        entry = setting | {"state_bytes": slice_state(fn, case.args)}
        try:
            entry["max_abs_error"] = float(jnp.abs(fn(*case.args).astype(jnp.float32) - want).max())
            if not interpret:
                entry |= device_us(fn, *case.args)
                entry["kernel_us"] = kernel_us(entry)
                if copy:  # the cache read in the kernel's time, over the card's copy bandwidth
                    entry["kernel_of_copy"] = case.cache_bytes / (entry["kernel_us"] / 1e6) / copy
        except Exception as e:  # more shared memory than the card has, say: recorded, the grid goes on
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
        row["configs"].append(entry)
    timed = [c for c in row["configs"] if "busy_us" in c]
    if timed:
        best = min(timed, key=lambda c: c["busy_us"])
        keys = ("splits", "block", "warps", "stages", "head_block", "busy_us", "state_bytes")
        row["best"] = {k: best[k] for k in keys}
        fastest = min(timed, key=lambda c: c["kernel_us"])
        row["fastest_kernel"] = {k: fastest.get(k) for k in (*keys[:5], "kernel_us", "kernel_of_copy")}
        row["model_launch_busy_us"] = (
            row["configs"][0].get("busy_us") if row["configs"][0]["model_launch"] else None
        )
    row["max_abs_reference"] = float(jnp.abs(want).max())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--batches", default="1")
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument(
        "--launches",
        help="BLOCKxWARPSxSTAGES,... tried at every point (default the model's launch)",
    )
    parser.add_argument(
        "--factors", default=",".join(map(str, SPLIT_FACTORS)), help="the plan's slices times these"
    )
    parser.add_argument("--model-heads", action="store_true", help="only the model's query heads per program")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (no times)")
    parser.add_argument("--out", help="write the rows as JSON here (after every point)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    launches = args.launches and [launch.split("x") for launch in args.launches.split(",")]
    if launches and not all(len(launch) == 3 and all(v.isdigit() for v in launch) for launch in launches):
        parser.error(f"--launches: {args.launches!r} is not a list of BLOCKxWARPSxSTAGES")
    launches = launches and [tuple(int(v) for v in launch) for launch in launches]
    try:
        factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        parser.error(f"--factors: {args.factors!r} is not a list of numbers")
    contexts = [int(c) for c in args.contexts.split(",")]
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": [], "complete": False}
    copy = None if args.smoke else copy_bandwidth(4.0)  # bytes / s, read + write counted
    result["copy_gb_per_s"] = copy and copy / 1e9
    for context in contexts:
        for batch in batches:
            for layer in args.layers.split(","):
                result["rows"].append(
                    point(layer, batch, context, args.smoke, launches, factors, not args.model_heads, copy)
                )
                row = result["rows"][-1]
                print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
                if args.out:
                    write_json(args.out, result)
    result["complete"] = True
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
