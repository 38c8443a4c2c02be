"""Compile for an NVIDIA H200 on a machine without a GPU (XLA's deviceless ahead-of-time compilation) and
read what the GPU would run: the kernels a decode step launches, the tensor-core instructions in each
Pallas decode kernel's PTX, and each such kernel's registers and main-loop instructions once assembled.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # the CUDA plugin
    python -m eval.experiments.cuda_aot --step 1,4096 --out step.json   # kernels per step, by stage and op
    python -m eval.experiments.cuda_aot --step 64,32768 --model mla     # the same with MLA attention
    python -m eval.experiments.cuda_aot --step 1,4096 --loop            # the body of generate's device loop
    python -m eval.experiments.cuda_aot --ptx --out ptx.json            # wgmma / mma.sync per decode kernel
    python -m eval.experiments.cuda_aot --sass --out sass.json          # registers, main-loop instructions
                                                                        # (pip install nvidia-cuda-nvdisasm)
    python -m eval.experiments.cuda_aot --train-step study              # a teacher's training step, as
                                                                        # compiled with deterministic ops too

The target is `h200_target_config.txtpb` (XLA's GpuTargetConfig: 132 SMs, compute capability 9.0). The
CUDA plugin needs no driver for this (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` is set here), and the model's
code is told it runs on a GPU so that it picks the compiled Pallas kernels, as `generate` does there.
Times are not measured: kernel counts, sorts and instruction mixes only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import get_args

TARGET = os.path.join(os.path.dirname(__file__), "h200_target_config.txtpb")
STAGES = ("moe", "attention", "sample")


def computation(hlo: str, name: str) -> str:
    """The text of computation `name` (as HLO text names it, without the %) of optimized HLO text."""
    start = re.search(rf"^%?{re.escape(name)} .*\{{$", hlo, re.MULTILINE)
    if start is None:
        raise ValueError(f"no computation {name} in the HLO")
    return hlo[start.start() : hlo.index("\n}", start.end()) + 2]


def while_body(hlo: str) -> str:
    """The body of the entry computation's first while loop."""
    entry = hlo[hlo.index("\nENTRY") :]
    return computation(hlo, re.search(r" while\(.*?body=%?([\w.\-]+)", entry).group(1))


def census(hlo: str, body: str | None = None) -> dict:
    """Kernels in the entry computation of optimized GPU HLO text (or in `body`, a computation's text, such
    as a loop's body): fusions and custom calls (Pallas' Triton kernels), counted by stage (the
    `named_scope` in each op's name: moe, attention, sample, other) and by fused computation (numbers
    stripped)."""
    entry = hlo[hlo.index("\nENTRY") :] if body is None else body
    kernels = [line for line in entry.split("\n") if " fusion(" in line or " custom-call(" in line]
    by_stage, by_op = collections.Counter(), collections.Counter()
    for line in kernels:
        op_name = re.search(r'op_name="([^"]+)"', line)
        scopes = op_name.group(1).split("/") if op_name else []
        by_stage[next((s for s in STAGES if s in scopes), "other")] += 1
        called = re.search(r"calls=%?([\w.\-]+)", line) or re.search(r'custom_call_target="([^"]+)"', line)
        by_op[re.sub(r"[._]\d+", "", called.group(1)) if called else "?"] += 1
    return {
        "kernels": len(kernels),
        # Buffer copies (a device memcpy each), not counted as kernels above: e.g. a buffer of zeros that
        # each layer's in-place scatter needs a copy of.
        "copies": len(re.findall(r"= .+? copy(?:-start)?\(", entry)),
        "triton_calls": sum("xla.gpu.triton" in line for line in kernels),
        "by_stage": dict(by_stage.most_common()),
        "by_op": dict(by_op.most_common()),
    }


def _counted(pattern: str, text: str) -> dict[str, int]:
    """The matches of `pattern`'s group in `text`, counted, most common first."""
    return dict(collections.Counter(re.findall(pattern, text)).most_common())


def tensor_core_mix(ptx: str) -> dict:
    """Tensor-core instructions in PTX text by kind and shape ({"wgmma.mma_async...m64n128k16...": 12})."""
    return _counted(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)


def _topology():
    """The H200 mesh and replicated sharding of a deviceless compile; the model's code then believes it
    runs on a GPU."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=pathlib.Path(TARGET).read_text(), topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(
            f"cuda_aot: no CUDA compiler here ({e}); install the CUDA plugin of this JAX: "
            f'pip install "jax[cuda12]=={jax.__version__}"'
        ) from None
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    jax.default_backend = lambda: "gpu"  # the model picks its compiled kernels by this
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


MODELS = ("gqa", "mla", "mla_rorope")


def model_config(model: str):
    """gpt-oss-20b as shipped (`gqa`), or its full-attention layers converted to MLA at the default 192
    values per token: `mla` the default conversion (decompressed, that latent), `mla_rorope` one mixed RoPE
    component per pair (head_dim values) and the rest as latent, as `eval.bench.decode` builds them."""
    from gptoss_mla_jax.config import FULL, GPT_OSS_20B, MlaConfig
    from weights.to_mla import DEFAULT_LATENT_DIM

    config = GPT_OSS_20B
    full = tuple(i for i, kind in enumerate(config.layer_types) if kind == FULL)
    if model == "mla":
        mla = MlaConfig("decompressed", full, (DEFAULT_LATENT_DIM,) * len(full))
        return dataclasses.replace(config, mla=mla)
    if model == "mla_rorope":
        latent = (DEFAULT_LATENT_DIM - config.head_dim,) * len(full)
        mla = MlaConfig("rorope", full, latent, rope_components=(1,) * len(full))
        return dataclasses.replace(config, mla=mla)
    return config


def step_census(batch: int, context: int, model: str = "gqa", loop: bool = False, wide: bool = True) -> dict:
    """One decode step of gpt-oss-20b (MXFP4 experts, bf16 cache of `context` slots, Pallas kernels),
    its attention as `model` says (`model_config`). `loop`: the body of `generation.decode_steps`' device
    loop instead, as `generate` runs the steps (what it derives once for the loop hoisted out of it).
    `wide`: the experts' wide-batch layout where the batch takes it, as `generate` gives it (its kernel is
    Mosaic GPU's, whose deviceless compile needs the host symbols that a CPU-only install of the CUDA plugin
    lacks; without it, the grouped matmul's kernels)."""
    import jax
    import jax.numpy as jnp

    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import GREEDY, decode_step, decode_steps
    from gptoss_mla_jax.mla import with_up_projections
    from gptoss_mla_jax.model import init_params, with_aligned_scales, with_wide_experts
    from gptoss_mla_jax.moe import wide_batch

    placed = _topology()
    config = model_config(model)
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), tree)

    def made():  # as `generate` derives them: the wide-batch kernel's layout where the batch takes it
        params = init_params(config, jax.random.key(0), jnp.bfloat16, "mxfp4")
        params = with_aligned_scales(with_up_projections(params, config))
        wanted = wide and wide_batch(batch, config)
        return with_wide_experts(params, config, decodable=True) if wanted else params

    params = spec(jax.eval_shape(made))
    cache = spec(jax.eval_shape(lambda: init_cache(config, batch, context)))
    key = spec(jax.eval_shape(lambda: jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placed)
    if loop:
        scalar = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
        steps = jax.jit(
            lambda p, c, t, k, done, limit, eos: decode_steps(
                p, c, t, k, done, limit, eos, config, GREEDY, True
            ),
            donate_argnums=1,
        )
        args = (tokens, key, scalar(jnp.bool_, batch), scalar(jnp.int32), scalar(jnp.int32))
        hlo = steps.lower(params, cache, *args).compile().as_text()
        out = census(hlo, while_body(hlo))
    else:
        step = jax.jit(lambda p, c, t, k: decode_step(p, c, t, k, config, GREEDY, True), donate_argnums=1)
        out = census(step.lower(params, cache, tokens, key).compile().as_text())
    out["per_layer"] = {stage: n / config.num_hidden_layers for stage, n in out["by_stage"].items()}
    where = {"loop": "decode_steps' loop body"} if loop else {}
    return {
        "model": model,
        "batch": batch,
        "context": context,
        "layers": config.num_hidden_layers,
        **where,
        **out,
    }


def sorts(hlo: str) -> dict[str, int]:
    """Sort instructions of optimized HLO text by their first operand's shape ({"s32[16777216]": 24})."""
    return _counted(r"= \(?(\w+\[[\d,]*\])[^=]*? sort\(", hlo)


def train_step_census(preset: str) -> dict:
    """One step of `train.pretrain` (its default recipe's optimizer, batch and window) for the config preset,
    compiled as it is by default and with XLA's deterministic ops (which a teacher retrained bit for bit
    elsewhere needs, and which sort every scatter-add with repeated indices element by element)."""
    import jax
    import jax.numpy as jnp

    from gptoss_mla_jax.model import init_params
    from train.pretrain import CONFIGS, Recipe, training_step

    placed = _topology()
    config, recipe = CONFIGS[preset], Recipe()
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), tree)
    optimizer, step = training_step(config, recipe.steps, recipe.lr)
    params = spec(jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.float32)))
    state = spec(jax.eval_shape(optimizer.init, params))
    tokens = jax.ShapeDtypeStruct((recipe.batch, recipe.seq_len + 1), jnp.int32, sharding=placed)
    lowered = step.lower(params, state, tokens)
    out = {"preset": preset}
    for name, options in (("default", {}), ("deterministic", {"xla_gpu_deterministic_ops": True})):
        hlo = lowered.compile(compiler_options=options).as_text()
        out[name] = {"kernels": census(hlo)["kernels"], "sorts": sorts(hlo)}
    return out


def _decode_kernels(batch: int, context: int) -> dict:
    """The Pallas decode kernels to read, as {name: (function, argument specs)}: the attention kernels at
    gpt-oss-20b's attention shape (64 query heads over 8 kv heads of 64; decompressed MLA latent 192;
    absorbed MLA latent 160 + 32 RoPE values) over `context` slots at `batch`, one layer's MoE on the
    grouped matmul (MXFP4 experts, the routing kernel and both packed products) at batches 1 and 256, the
    fused residual add + norm after the MoE at batch 1 (its rows in two contraction splits), and at batch 1
    the one before the MoE with the router's product (`add_norm_routed`) and the routing kernel fed by it
    (at batches 1 and 64)."""
    import jax
    import jax.numpy as jnp

    placed = _topology()
    from jax.experimental import pallas as pl

    from eval.bench.decode_moe import moe_layer
    from gptoss_mla_jax import flash_decode, mla
    from gptoss_mla_jax.add_norm import ROUTER_DEPTH, ExpertRows, add_norm, add_norm_routed
    from gptoss_mla_jax.config import GPT_OSS_20B, MlaConfig
    from gptoss_mla_jax.moe import ALIGN, moe_sparse
    from gptoss_mla_jax.routing import routing_of_logits

    B, S, G, R, d, r = batch, context, 8, 8, 64, 192
    D, E = GPT_OSS_20B.hidden_size, GPT_OSS_20B.num_local_experts
    config = dataclasses.replace(GPT_OSS_20B, mla=MlaConfig("decompressed", (1,), (r,)))
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
    slots = lambda lengths: flash_decode.Slots(lengths, None, False)
    launch = lambda kind, **options: flash_decode.Launch(  # the model's launch of a `kind` kernel
        *flash_decode.plan_for(kind, S, flash_decode.programs_per_slice(kind, B, G, R), 64),
        interpret=False,
        **options,
    )
    lengths, sinks = spec(B, dtype=jnp.int32), spec(G * R, dtype=jnp.float32)
    experts = jax.eval_shape(lambda: moe_layer(GPT_OSS_20B))
    return {
        "gqa": (
            lambda q, k, v, n, s: flash_decode.gqa_decode(q, k, v, slots(n), s, launch("gqa")),
            (spec(B, G * R, d), spec(B, S, G, d), spec(B, S, G, d), lengths, sinks),
        ),
        "mla_decompressed": (
            lambda q, w, b, c, n, s: flash_decode.mla_decompressed_decode(
                q, {"kernel": w, "bias": b}, c, slots(n), s, mla.slot_rotations(n, S, False, config),
                launch("decompressed"),
            ),
            (spec(B, G * R, d), spec(r, 2 * G * d), spec(2 * G * d), spec(B, S, r), lengths, sinks),
        ),
        "mla_absorbed": (
            lambda qr, qn, wk, bk, wv, bv, c, kr, n, s: flash_decode.mla_absorbed_decode(
                qr, qn, (wk, bk, wv, bv), {"c": c, "k_rope": kr}, slots(n), s, launch("absorbed")
            ),
            (
                spec(B, G, R, 4), spec(B, G, R, d - 4), spec(160, G, d - 4), spec(G, d - 4), spec(160, G, d),
                spec(G, d), spec(B, S, 160), spec(B, S, G, 4), lengths, sinks,
            ),
        ),
        **{
            f"moe_batch{n}": (
                lambda p, x: moe_sparse(p, x, GPT_OSS_20B, kernels=True),
                (
                    jax.tree.map(lambda a: spec(*a.shape, dtype=a.dtype), experts),
                    spec(n, 1, GPT_OSS_20B.hidden_size),
                ),
            )
            for n in (1, 256)
        },
        "add_norm_batch1": (
            lambda x, rows, slot, weights, w: add_norm(x, ExpertRows(rows, slot, weights), w, 1e-5),
            (
                spec(1, GPT_OSS_20B.hidden_size), spec(2, 64, GPT_OSS_20B.hidden_size, dtype=jnp.float32),
                spec(16, 4, dtype=jnp.int32), spec(16, 4, dtype=jnp.float32), spec(GPT_OSS_20B.hidden_size),
            ),
        ),
        "add_norm_routed_batch1": (
            lambda x, delta, w, router: add_norm_routed(x, delta, w, router, 1e-5),
            (spec(1, D), spec(1, D), spec(D), spec(D, E)),
        ),
        **{
            f"routing_of_logits_batch{n}": (
                lambda partials, bias: routing_of_logits(partials, bias, 4, ALIGN, jnp.bfloat16, tiles=True),
                (spec(pl.cdiv(D, ROUTER_DEPTH), n, E, dtype=jnp.float32), spec(E)),
            )
            for n in (1, 64)
        },
    }  # fmt: skip


def kernel_ptx(batch: int = 64, context: int = 32768) -> dict[str, str]:
    """The PTX of each Pallas kernel of `_decode_kernels` ({"gqa/_split_kernel": text}), compiled with
    XLA's dump on."""
    import jax

    out = {}
    for name, (fn, args) in _decode_kernels(batch, context).items():
        with tempfile.TemporaryDirectory() as dump:
            jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})
            for path in glob.glob(os.path.join(dump, "*.ptx")):
                text = pathlib.Path(path).read_text()
                entry = re.search(r"\.entry (\w+)", text)
                if entry and not entry.group(1).startswith(
                    ("loop_", "input_", "gemm_", "fusion", "wrapped_")
                ):
                    out[f"{name}/{entry.group(1)}"] = text
    return out


def ptx_census(batch: int = 64, context: int = 32768) -> dict:
    """Each Pallas decode kernel's tensor-core instruction mix (`kernel_ptx`)."""
    kernels = {name: tensor_core_mix(text) for name, text in kernel_ptx(batch, context).items()}
    return {"batch": batch, "context": context, "kernels": kernels}


SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def _loops(sass: str) -> list[list[str]]:
    """The bodies of the loops in `nvdisasm` output (each from a label to the last branch back to it),
    longest first. Branches placed after the function's last EXIT are not loops of its body: ptxas puts a
    barrier wait's retry there, jumping back to the wait (Mosaic GPU kernels)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\.(L\w+):", line))}
    exits = [i for i, line in enumerate(lines) if SASS_LINE.search(line) and " EXIT" in line]
    ends: dict[str, int] = {}
    for j, line in enumerate(lines[: exits[-1] if exits else len(lines)]):
        target = re.search(r"BRA `\(\.(L\w+)\)", line)
        if target and labels.get(target.group(1), j) < j:
            ends[target.group(1)] = j
    return sorted((lines[labels[label] : j + 1] for label, j in ends.items()), key=len, reverse=True)


def _mix(body: list[str]) -> dict:
    opcodes = collections.Counter(m.group(1) for line in body if (m := SASS_LINE.search(line)))
    return {"instructions": sum(opcodes.values()), "opcodes": dict(opcodes.most_common())}


def main_loop_mix(sass: str) -> dict:
    """The instruction mix of the longest loop in `nvdisasm` output: {"instructions": n, "opcodes":
    {"HMMA": 32, ...}}, opcodes without modifiers."""
    loops = _loops(sass)
    return _mix(loops[0] if loops else [])


def other_loops(sass: str, least: int = 16) -> list[dict]:
    """The mixes of the other loops of at least `least` instructions, longest first: a kernel whose loop
    the compiler unswitched on a flag (the packed products' folded decoding) has one loop per way."""
    return [mix for mix in map(_mix, _loops(sass)[1:]) if mix["instructions"] >= least]


def registers(ptxas_log: str) -> int:
    """Registers per thread from `ptxas -v`'s report."""
    return int(re.search(r"Used (\d+) registers", ptxas_log).group(1))


def spilled_bytes(ptxas_log: str) -> int:
    """Bytes of registers spilled to local memory (stores plus loads) in `ptxas -v`'s report of one
    kernel: its function properties line (`N bytes stack frame, N bytes spill stores, N bytes spill
    loads`), which a warning line may repeat (so the largest line, not the sum)."""
    lines = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return max((int(stores) + int(loads) for stores, loads in lines), default=0)


def _tool(name: str, package_bins: tuple[str, ...], install: str) -> str:
    """The path of CUDA tool `name`: on PATH, or in the bin folder of a pip-installed NVIDIA package."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec else []
    paths = [os.path.join(root, package, "bin", name) for package in package_bins for root in roots]
    found = shutil.which(name) or next((path for path in paths if os.path.exists(path)), None)
    if found is None:
        raise SystemExit(f"cuda_aot --sass: no {name} here; install it: pip install {install}")
    return found


def sass_census(batch: int = 64, context: int = 32768) -> dict:
    """Each Pallas decode kernel assembled for an H200 (`ptxas`, from the CUDA plugin's nvcc package) and
    disassembled (`nvdisasm`): its registers per thread (they set how many programs share an SM), the bytes
    it spills, and the instruction mix of its main loop, per thread and step."""
    ptxas = _tool("ptxas", ("cuda_nvcc",), '"jax[cuda12]"')
    nvdisasm = _tool("nvdisasm", ("cu13", "cuda_nvdisasm"), "nvidia-cuda-nvdisasm")
    out = {}
    for name, text in kernel_ptx(batch, context).items():
        with tempfile.TemporaryDirectory() as work:
            ptx, cubin = os.path.join(work, "k.ptx"), os.path.join(work, "k.cubin")
            pathlib.Path(ptx).write_text(text)
            log = subprocess.run(
                [ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True
            )
            sass = subprocess.run([nvdisasm, cubin], capture_output=True, text=True, check=True).stdout
        out[name] = {
            "registers": registers(log.stdout + log.stderr),
            "spilled_bytes": spilled_bytes(log.stdout + log.stderr),
            "main_loop": main_loop_mix(sass),
            "other_loops": other_loops(sass),
        }
    return {"batch": batch, "context": context, "kernels": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", metavar="BATCH,CONTEXT", help="kernels of one decode step")
    parser.add_argument(
        "--loop", action="store_true", help="--step: the body of generate's device loop of decode steps"
    )
    parser.add_argument("--model", choices=MODELS, default="gqa", help="--step: the attention (model_config)")
    from gptoss_mla_jax.flash_decode import DecompressedKernel

    parser.add_argument(
        "--decompressed-kernel", choices=get_args(DecompressedKernel), default="triton",
        help="--step --model mla: the decompressed layers' decode kernel (flash_decode.DECOMPRESSED_KERNEL)",
    )  # fmt: skip
    parser.add_argument(
        "--no-wide", action="store_true",
        help="--step: batches of 16 and more on the grouped matmul, not the wide-batch kernel generate takes",
    )  # fmt: skip
    parser.add_argument("--ptx", action="store_true", help="tensor-core instructions of the decode kernels")
    parser.add_argument(
        "--sass", action="store_true", help="registers and main-loop instructions of the decode kernels"
    )
    parser.add_argument("--train-step", metavar="PRESET", help="a train.pretrain preset's training step")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if sum((bool(args.step), args.ptx, args.sass, bool(args.train_step))) != 1:
        parser.error("pass one of --step BATCH,CONTEXT, --ptx, --sass or --train-step PRESET")
    from support.results import write_json

    if args.step:
        from gptoss_mla_jax import flash_decode

        batch, context = (int(n) for n in args.step.split(","))
        flash_decode.DECOMPRESSED_KERNEL = args.decompressed_kernel
        result = step_census(batch, context, args.model, args.loop, wide=not args.no_wide)
        result["decompressed_kernel"] = args.decompressed_kernel
    elif args.train_step:
        result = train_step_census(args.train_step)
    elif args.sass:
        result = sass_census()
    else:
        result = ptx_census()
    result["target"] = os.path.basename(TARGET)
    result["command"] = " ".join(["python -m eval.experiments.cuda_aot", *(argv or sys.argv[1:])])
    print(result)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
