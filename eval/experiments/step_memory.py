"""Where one decode step's device memory goes: XLA's plan for the compiled step against what the device's
allocator really holds while it compiles and runs.

At capacity (`eval.bench.decode --capacity`) a step can run out of memory allocating a buffer the size of one
full-attention layer's cache entry, while the plan of the same step (`memory_analysis()`) has far fewer
temporaries. This compiles `generation.decode_step` on the kernels for one model at a batch and context (the
cache abstract, so nothing is allocated for it yet) and records: the plan (arguments, outputs, the outputs
aliased to donated arguments, temporaries); the allocator's figures after it compiles and, with the cache
allocated, after each of two runs (the peaks count the model's making too), and the cache entries that did not
come back in the buffer they went in (a donated entry written in place does; any other was allocated anew).
Then (`--pressures`) one step each with the device filled until only the plan's temporaries and some share of
a layer's cache entry stay free: the least the step really needs. `--first-under` does that first of all
through jit's dispatch, compiling under that pressure as the capacity search does (XLA's autotuner, for one,
times candidate kernels on buffers of their operands' shapes while it compiles). With XLA's dump on
(`XLA_FLAGS=--xla_dump_to=DIR`, `--dump`), the buffer assignment's allocations at least half a layer's cache
entry are listed, with the values in them; and the optimized HLO's instructions whose result is that large,
besides parameters and tuples, and its copies counted. Near capacity, where the cache or a run of the step
runs out of memory, the result keeps the plan and records what ran out and the allocator then (`cache_failed`,
a run's `failed`: its free bytes and largest free block).

    python -m eval.experiments.step_memory --model mla_partial --batch 32 --context 32768 --out mem.json \
        --pressures 0.25,0.75,1.25,2.5
    XLA_FLAGS=--xla_dump_to=/tmp/dump python -m eval.experiments.step_memory ... --dump /tmp/dump
    python -m eval.experiments.step_memory --smoke      # the demo model on the CPU (no allocator figures)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp

from eval.bench.decode import models
from gptoss_mla_jax.cache import device_memory, entry_shapes, free_device_bytes, init_cache
from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.generation import DEMO_CONFIG, GREEDY, decode_step
from support.results import write_json

MODELS = ("gqa", "mla", "mla_partial", "mla_rorope")
# HLO ops that name a buffer without making one: a large result of these is not a copy.
NOT_BUFFERS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}


def allocator() -> dict | None:
    """The device allocator's bytes in use, peak, limit and largest free block (None on a backend that
    keeps no such figures)."""
    stats = device_memory()
    if not stats:
        return None
    names = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_free_block_bytes")
    return {name: stats.get(name) for name in names}


def _failure(error: jax.errors.JaxRuntimeError) -> dict:
    """What an allocation that ran out of memory asked for, and the allocator then."""
    return {"error": str(error).splitlines()[0][:300], "allocator": allocator()}


def buffers(cache) -> dict[str, int]:
    """Each layer's cache entries' device buffers ("3/c" -> address; the lengths are set anew each step)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.unsafe_buffer_pointer()
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache["layers"])[0]
    }


def large_instructions(hlo: str, at_least: int) -> list[dict]:
    """Instructions of optimized HLO text whose (array) result has at least `at_least` bytes, other than
    those that only name a buffer (`NOT_BUFFERS`): opcode, name, shape, the computation they are in."""
    out, computation = [], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(", line)
        if not m:
            continue
        name, dtype, dims, opcode = m.groups()
        size = math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
        if size >= at_least and opcode not in NOT_BUFFERS:
            out.append(
                {"computation": computation, "name": name, "opcode": opcode, "shape": f"{dtype}[{dims}]",
                 "bytes": size}
            )  # fmt: skip
    return out


def large_allocations(dump_dir: str, at_least: int) -> list[dict]:
    """The decode step's buffer assignment (XLA's dump) allocations of at least `at_least` bytes, each with
    its header and the values it holds (first 8)."""
    files = sorted(glob.glob(f"{dump_dir}/*decode_step*buffer-assignment.txt"))
    if not files:
        return [{"error": f"no *decode_step*buffer-assignment.txt under {dump_dir}"}]
    out, current = [], None
    for line in pathlib.Path(files[-1]).read_text().splitlines():
        header = re.match(r"^allocation (\d+): size (\d+), (.*)", line)
        if header:
            current = None
            if int(header.group(2)) >= at_least:
                current = {"allocation": int(header.group(1)), "bytes": int(header.group(2)),
                           "kind": header.group(3)[:300], "values": []}  # fmt: skip
                out.append(current)
        elif current is not None and line.strip().startswith("value:") and len(current["values"]) < 8:
            current["values"].append(line.strip()[:300])
    return out


def ballast(free_bytes: int) -> list:
    """Arrays filling the device until about `free_bytes` stay free, in pieces of 256 MB halved down to 1 MB
    where the allocator's free blocks are smaller (as a nearly full cache leaves it): what a step then can
    still allocate is what capacity leaves it. A piece that took more than it asked for (the allocator
    hands out a whole free block) and left less than `free_bytes` is given back and a smaller one tried."""
    pieces, piece = [], 1 << 28
    while piece >= 1 << 20:
        if free_device_bytes() - free_bytes < piece:
            piece //= 2
            continue
        try:
            pieces.append(jax.block_until_ready(jnp.zeros((piece,), jnp.uint8)))
        except jax.errors.JaxRuntimeError:  # no free block that large left: smaller pieces
            piece //= 2
            continue
        if free_device_bytes() < free_bytes:
            pieces.pop().delete()
            piece //= 2
    return pieces


def step_under_pressure(step, params, config, batch: int, context: int, free_bytes: int) -> dict:
    """`step(params, cache, tokens, key)` once on a fresh cache with about `free_bytes` left free: whether it
    ran, or its error."""
    cache = init_cache(config, batch, context)
    cache["lengths"] = jnp.full((batch,), context - 1, jnp.int32)
    pieces = ballast(free_bytes)
    out = {"free_bytes": free_device_bytes()}
    try:
        jax.block_until_ready(step(params, cache, jnp.zeros((batch,), jnp.int32), jax.random.key(0)))
        out["ran"] = True
    except jax.errors.JaxRuntimeError as e:  # out of memory: the step needed more than was left
        out |= {"ran": False, "error": str(e).splitlines()[0][:300]}
    del pieces, cache
    return out


def measure(
    model: str, batch: int, context: int, smoke: bool, dump_dir: str | None, pressures=(), first_under=None
) -> dict:
    partial = model in ("mla_partial", "mla_rorope")
    if smoke:  # the demo model's latent, as `eval.bench.decode --smoke` converts it
        built = models(DEMO_CONFIG, 48, partial, only=(model,), wide="only")
    else:  # the experts in the wide-batch layout alone, as the capacity runs hold them
        built = models(GPT_OSS_20B, partial=partial, only=(model,), wide="only")
    config, params = built[model]
    full = next(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    entry_bytes = {
        name: math.prod(shape) * 2 for name, shape in entry_shapes(config, full, batch, context).items()
    }
    layer_bytes = max(entry_bytes.values())
    row = {"model": model, "batch": batch, "context": context, "full_layer_entry_bytes": entry_bytes}
    row["params_only"] = allocator()
    # As the capacity search meets a batch: the step compiled and run by its first call through jit with
    # little left (the share of a layer's entry asked for beside `free_bytes`, what was free).
    if first_under is not None and row["params_only"]:
        step = lambda p, c, t, k: decode_step(p, c, t, k, config, GREEDY, True)
        free = int(first_under * layer_bytes)
        row["first_call_under_pressure"] = {"free_in_layer_entries": first_under} | step_under_pressure(
            step, params, config, batch, context, free
        )
    cache_shapes = jax.eval_shape(lambda: init_cache(config, batch, context))
    tokens, key = jnp.zeros((batch,), jnp.int32), jax.random.key(0)
    compiled = decode_step.lower(params, cache_shapes, tokens, key, config, GREEDY, True).compile()
    row["after_compile"] = allocator()
    plan = compiled.memory_analysis()
    if plan is not None:
        row["plan"] = {
            name: getattr(plan, f"{name}_size_in_bytes")
            for name in ("argument", "output", "alias", "temp", "generated_code")
        }
    hlo = compiled.as_text()
    row["large_instructions"] = large_instructions(hlo, layer_bytes // 2)
    row["copies"] = len(re.findall(r"= [^=]+? copy(?:-start)?\(", hlo))
    try:  # near capacity the cache itself may not fit: the plan above is kept
        cache = init_cache(config, batch, context)
        cache["lengths"] = jnp.full((batch,), context - 1, jnp.int32)
        jax.block_until_ready(cache)
    except jax.errors.JaxRuntimeError as e:
        row["cache_failed"] = _failure(e)
        return row
    row["with_cache"] = allocator()
    row["runs"] = []
    for _ in range(2):
        before = buffers(cache)
        try:
            tokens, cache = jax.block_until_ready(compiled(params, cache, tokens, key))
        except jax.errors.JaxRuntimeError as e:  # the donated cache is gone with the failed step
            row["runs"].append({"failed": _failure(e)})
            return row
        # A donated entry written in place comes back in the buffer it went in: any other was allocated
        moved = [name for name, pointer in buffers(cache).items() if before.get(name) != pointer]
        cache["lengths"] = jnp.full((batch,), context - 1, jnp.int32)
        row["runs"].append({"allocator": allocator(), "entries_not_in_place": moved})
    if dump_dir:
        row["large_allocations"] = large_allocations(dump_dir, layer_bytes // 2)
    if row["with_cache"] and pressures:
        del cache
        temp = row["plan"]["temp"]
        row["under_pressure"] = [
            {"free_over_temp_in_layer_entries": m}
            | step_under_pressure(compiled, params, config, batch, context, temp + int(m * layer_bytes))
            for m in pressures
        ]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="mla_partial")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--dump", metavar="DIR", help="XLA's dump directory (XLA_FLAGS=--xla_dump_to=DIR)")
    parser.add_argument(
        "--pressures", default="",
        help="after the runs, one step each with the plan's temporaries plus this many of a full layer's "
        "largest cache entries left free (the rest filled), e.g. 0.25,0.75,1.25",
    )  # fmt: skip
    parser.add_argument(
        "--first-under", type=float, metavar="ENTRIES",
        help="first of all, compile and run the step (jit's dispatch, as the capacity search does) with only "
        "this many of a full layer's largest cache entries left free",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="the demo model on the CPU, batch 2 x 256")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    batch, context = (2, 256) if args.smoke else (args.batch, args.context)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    pressures = [float(m) for m in args.pressures.split(",") if m]
    result |= measure(args.model, batch, context, args.smoke, args.dump, pressures, args.first_under)
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
