"""The full-size checkpoint script, run at a small size: the layout it writes is the published one and
both loaders read it to the same dequantized values."""

import json
import math
import time

import jax
import jax.numpy as jnp
import pytest

from eval.experiments import fullsize_checkpoint as script
from gptoss_mla_jax.generation import DEMO_CONFIG
from tests.compile_log import compiled, compiled_at_allocation, raising_when_run
from weights.hf_layout import hf_tensors


@pytest.fixture(scope="module")
def shared_models():
    """eval.bench.decode's tiny models (random init and MLA conversion) built once for the runs of this file
    that time whole models, each run getting the same arrays it would build."""
    from eval.bench import decode as bench_decode

    build, built = bench_decode.models, {}

    def models(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in built:
            built[key] = build(*args, **kwargs)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_decode, "models", models)
        yield


def test_written_layout_loads_in_both(tmp_path, monkeypatch):
    info = script.write_checkpoint(str(tmp_path), script.SMOKE)
    assert info["tensors"] == 459 == len(hf_tensors(script.SMOKE, "mxfp4")) and info["shards"] == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files_of_layer = {
        i: {f for n, f in index["weight_map"].items() if n.startswith(f"model.layers.{i}.")}
        for i in range(24)
    }
    assert any(len(files) == 2 for files in files_of_layer.values())  # a layer straddles two shards
    ours = script.load_ours(str(tmp_path), "dense")
    pytest.importorskip("accelerate")
    # transformers on CPU: same code path as the GPU run except the device map.
    import torch
    import transformers

    model = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    state = model.state_dict()
    for name, digest in ours["sha256"].items():
        assert script._sha(state[name].view(torch.int16).numpy()) == digest, name


@pytest.mark.slow  # started first (tests/conftest.py)
def test_decode_benchmark_runs_at_a_small_size(shared_models, tmp_path):
    """eval.bench.decode end to end on the tiny demo model: every point measured (a step per call and
    per token of a device-side loop), MLA's cache smaller."""
    from eval.bench import decode as bench_decode

    out = tmp_path / "decode.json"
    # One batch: every point compiles a step and a loop of steps, on the interpreted kernels too.
    argv = ["--smoke", "--batches", "2", "--contexts", "64", "--repeats", "2", "--decode-kernels", "both"]
    argv += ["--loop-steps", "2"]
    assert bench_decode.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"], r["decode_kernels"]) for r in rows] == [
        (model, 2, kernels) for model in ("gqa", "mla") for kernels in (False, True)
    ]
    assert all(r["step_ms"] > 0 and len(r["times_ms"]) == 2 for r in rows)
    assert all(r["loop_steps"] == 2 and r["loop_step_ms"] > 0 and len(r["loop_times_ms"]) == 2 for r in rows)
    assert rows[2]["cache_gb"] < rows[0]["cache_gb"]
    # each point beside its byte floor: its step's unavoidable bytes over the run's copy bandwidth
    assert all(r["floor_ms"] > 0 and r["step_over_floor"] == r["step_ms"] / r["floor_ms"] for r in rows)
    assert all(r["loop_over_floor"] == r["loop_step_ms"] / r["floor_ms"] for r in rows)
    assert all(r["step_gb"] > r["cache_gb"] for r in rows)


def test_step_bytes_counts_each_weight_once_and_the_cache():
    """A step's byte floor: the cache, every weight but the embedding (the batch's rows) and the experts
    (those the batch selects on average under uniform routing), counted by hand on the demo model."""

    from eval.bench import decode as bench_decode
    from gptoss_mla_jax.cache import total_bytes
    from gptoss_mla_jax.generation import DEMO_CONFIG as config
    from gptoss_mla_jax.model import init_params

    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16, experts="mxfp4"))
    E, k, D, V = config.num_local_experts, config.num_experts_per_tok, config.hidden_size, config.vocab_size
    layer = params["layers"][0]
    size = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
    experts = size(layer["mlp"]["experts"]) * config.num_hidden_layers
    others = size(params) - size(params["embed_tokens"]) - experts
    assert params["embed_tokens"].shape == (V, D)
    for batch, context in ((1, 64), (3, 100)):
        selected = E * (1 - (1 - k / E) ** batch)  # experts a batch selects on average
        want = total_bytes(config, batch, context) + others + batch * D * 2
        assert bench_decode.step_bytes(config, params, batch, context) == int(want + experts * selected / E)
    assert selected < E and bench_decode.step_bytes(config, params, 1, 64) < size(params)


def test_decode_benchmark_times_each_setting(shared_models, tmp_path, monkeypatch):
    """--state-shares, --mla-fill-programs, --absorbed-stages, --fused-norms and --decompressed-kernels: the
    points are timed once per combination of settings, each with flash_decode.STATE_SHARE,
    flash_decode.MLA_FILL_PROGRAMS, flash_decode.PIPELINE_STAGES, model.FUSED_NORMS and
    flash_decode.DECOMPRESSED_KERNEL set while its steps are traced, the defaults restored after; a setting
    none of them knows is refused."""
    from eval.bench import decode as bench_decode
    from gptoss_mla_jax import flash_decode
    from gptoss_mla_jax import model as model_lib

    seen = []
    monkeypatch.setattr(flash_decode, "STATE_SHARE", None)
    monkeypatch.setattr(flash_decode, "MLA_FILL_PROGRAMS", 132)
    monkeypatch.setattr(model_lib, "FUSED_NORMS", "router")
    monkeypatch.setattr(flash_decode, "DECOMPRESSED_KERNEL", "triton")
    stages = {"gqa": 2, "decompressed": 2, "absorbed": 3}
    monkeypatch.setattr(flash_decode, "PIPELINE_STAGES", stages)
    switches = lambda: (
        flash_decode.STATE_SHARE,
        flash_decode.MLA_FILL_PROGRAMS,
        flash_decode.PIPELINE_STAGES["absorbed"],
        model_lib.FUSED_NORMS,
        flash_decode.DECOMPRESSED_KERNEL,
    )
    monkeypatch.setattr(
        bench_decode, "step_seconds", lambda *args, **kwargs: seen.append(switches()) or [1e-3]
    )
    out = tmp_path / "share.json"
    argv = ["--smoke", "--batches", "1", "--contexts", "64", "--repeats", "1", "--decode-kernels", "on"]
    argv += ["--state-shares", "none,0.25", "--mla-fill-programs", "264", "--fused-norms", "norms,off"]
    argv += ["--decompressed-kernels", "mosaic", "--absorbed-stages", "2"]
    assert bench_decode.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    settings = [("none", "norms"), ("none", "off"), ("0.25", "norms"), ("0.25", "off")]
    keys = (
        "model",
        "state_share",
        "mla_fill_programs",
        "absorbed_stages",
        "fused_norms",
        "decompressed_kernel",
    )
    got = [(*(r[k] for k in keys), r["step_ms"]) for r in rows]
    want_rows = [
        (model, share, 264, 2, fused, "mosaic", 1.0) for share, fused in settings for model in ("gqa", "mla")
    ]
    assert got == want_rows
    want = [
        (share, 264, 2, fused, "mosaic")
        for share in (None, 0.25)
        for fused in ("norms", "off")
        for _ in range(2)  # gqa, mla
    ]
    assert seen == want
    assert switches() == (None, 132, 3, "router", "triton") and flash_decode.PIPELINE_STAGES is stages
    for flag, value in (
        ("--fused-norms", "on"),
        ("--decompressed-kernels", "cuda"),
        ("--mla-fill-programs", "x"),
        ("--absorbed-stages", "0"),
    ):
        with pytest.raises(SystemExit):
            bench_decode.main(["--smoke", flag, value])


def test_decode_splits_experiment_runs_at_a_small_size(tmp_path):
    """eval.experiments.decode_splits on the CPU interpreter: per kernel, the grid starts at the model's
    own launch, every setting agrees with the jnp path (bf16), and the state bytes are the kernel's
    outputs, in proportion to the slices."""
    from eval.experiments import decode_splits

    out = tmp_path / "splits.json"
    assert decode_splits.main(["--smoke", "--contexts", "256", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and [r["layer"] for r in result["rows"]] == list(decode_splits.LAYERS)
    for row in result["rows"]:
        first, *rest = row["configs"]
        assert first["model_launch"] and first["planned"] and first["head_block"] is None and rest
        assert not any(c["model_launch"] for c in rest)
        for config in row["configs"]:
            assert "error" not in config and config["max_abs_error"] <= 2**-6 * row["max_abs_reference"]
        whole = [c for c in row["configs"] if c["head_block"] is None]
        assert [c["state_bytes"] for c in whole] == sorted((c["state_bytes"] for c in whole), reverse=True)
        assert whole[0]["state_bytes"] == whole[-1]["state_bytes"] * whole[0]["splits"] // whole[-1]["splits"]


def test_decode_splits_tries_the_launches_asked_for(tmp_path):
    """--launches: every launch at every slice factor, the model's launch first; --model-heads: the model's
    query heads per program only; bad --launches named."""
    from eval.experiments import decode_splits

    out = tmp_path / "launches.json"
    argv = ["--smoke", "--layers", "mla_partial", "--contexts", "256", "--launches", "32x4x2,16x8x3",
            "--factors", "1,0.5", "--model-heads", "--out", str(out)]  # fmt: skip
    assert decode_splits.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    settings = [(c["block"], c["warps"], c["stages"], c["planned"]) for c in row["configs"]]
    launches = ((32, 4, 2), (16, 8, 3))
    assert sorted(settings) == sorted((b, w, s, p) for b, w, s in launches for p in (True, False))
    # the model's launch (64-slot blocks asked) is not among those asked for
    assert not any(c["model_launch"] for c in row["configs"])
    assert all(c["head_block"] is None and c["max_abs_error"] <= 2**-6 * row["max_abs_reference"]
               for c in row["configs"])  # fmt: skip
    for flag, value in (("--launches", "64x4"), ("--launches", "64xax2"), ("--factors", "x")):
        with pytest.raises(SystemExit):
            decode_splits.main(["--smoke", flag, value])


def test_step_memory_experiment_runs_on_the_demo_model(tmp_path):
    """eval.experiments.step_memory on the CPU: the step compiles and runs twice on the cache; its large
    results are listed, each with a shape the size it says, the cache writes of every full layer's latent
    among them."""
    from eval.experiments import step_memory
    from gptoss_mla_jax.generation import DEMO_CONFIG

    out = tmp_path / "memory.json"
    assert step_memory.main(["--smoke", "--model", "mla_partial", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == 2 and len(result["runs"]) == 2 and "plan" in result
    # the CPU donates the cache too: every layer's entries written in place
    assert [run["entries_not_in_place"] for run in result["runs"]] == [[], []]
    entry = result["full_layer_entry_bytes"]
    for instruction in result["large_instructions"]:  # each as large as its shape says
        dtype, dims = instruction["shape"][:-1].split("[")
        size = step_memory.DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        assert instruction["bytes"] == size
    # among them the cache writes of every full layer's latent, at the latent's shape
    batch, slots = result["batch"], result["context"]
    latent = f"bf16[{batch},{slots},{entry['c'] // (2 * batch * slots)}]"
    writes = [i for i in result["large_instructions"] if i["shape"] == latent]
    assert len(writes) >= sum(not DEMO_CONFIG.is_sliding(i) for i in range(DEMO_CONFIG.num_hidden_layers))


def test_step_memory_keeps_the_plan_when_memory_runs_out(tmp_path, monkeypatch):
    """Near capacity the cache or the step may not fit: the experiment records what ran out (the error, the
    allocator then) beside the step's plan and writes its result, instead of losing it."""
    from eval.experiments import step_memory

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.76GiB")

    real_init = step_memory.init_cache

    def init_without_room(*args, **kwargs):  # its shapes (to compile from) are made; its arrays are not
        cache = real_init(*args, **kwargs)
        if isinstance(cache["lengths"], jax.core.Tracer):
            return cache
        raise oom

    out = tmp_path / "cache.json"
    with monkeypatch.context() as patch:
        patch.setattr(step_memory, "init_cache", init_without_room)
        assert step_memory.main(["--smoke", "--model", "mla_partial", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cache_failed"]["error"].startswith("RESOURCE_EXHAUSTED") and "plan" in result
    assert "runs" not in result

    monkeypatch.setattr(step_memory, "decode_step", raising_when_run(step_memory.decode_step, oom))
    assert step_memory.main(["--smoke", "--model", "mla_partial", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [run["failed"]["error"] for run in result["runs"]] == [str(oom)] and result["plan"]["temp"] > 0


def test_decode_benchmark_loop_only_times_the_loop_alone(shared_models, tmp_path, monkeypatch):
    """--loop-only: each point compiles and times only the device loop (no step a call), each row says how
    long its point took, and the rows make the README's table (eval.bench.decode_table); without
    --loop-steps the flag is refused."""
    from eval.bench import decode as bench_decode
    from eval.bench import decode_table

    calls = []
    per_model = {"gqa": 2e-3, "mla": 1e-3}

    def timed(params, config, batch, context, repeats, kernels, loop_steps=0):
        calls.append(loop_steps)
        time.sleep(0.01)  # the point's seconds count its steps
        return [per_model["mla" if config.mla else "gqa"] * batch] * repeats

    monkeypatch.setattr(bench_decode, "step_seconds", timed)
    out = tmp_path / "loop.json"
    argv = ["--smoke", "--batches", "1,2", "--contexts", "32", "--repeats", "2", "--decode-kernels", "on"]
    assert bench_decode.main([*argv, "--loop-steps", "4", "--loop-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert calls == [4] * 4 and [(r["model"], r["batch"]) for r in rows] == [
        ("gqa", 1), ("mla", 1), ("gqa", 2), ("mla", 2)
    ]  # fmt: skip
    assert all("step_ms" not in r and r["loop_step_ms"] > 0 and r["seconds"] >= 0.01 for r in rows)
    lines = decode_table.table({"loop.json": result}).splitlines()
    assert (
        lines[0]
        == "| batch x context | GQA | MLA default | MLA partial | floor GQA / MLA default / MLA partial |"
    )
    floors = lambda batch: " / ".join(f"{r['floor_ms']:.2f}" for r in rows if r["batch"] == batch)
    assert lines[2:] == [
        f"| 1 x 32 | 2.00 | **1.00** | - | {floors(1)} / - |",
        f"| 2 x 32 | 4.00 | **2.00** | - | {floors(2)} / - |",
    ]
    for wrong in (["--loop-only"], ["--loop-steps", "4", "--loop-only", "--capacity"]):
        with pytest.raises(SystemExit):
            bench_decode.main([*argv, *wrong])


def test_a_decode_benchmark_cut_short_keeps_the_rows_it_finished(shared_models, tmp_path, monkeypatch):
    """Killed during its second point (here: interrupted), the benchmark's --out file already holds the
    first point's row, marked incomplete; a finished run overwrites it with the whole result."""
    from eval.bench import decode as bench_decode

    calls, step = [], bench_decode.step_seconds

    def interrupted_second_point(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(bench_decode, "step_seconds", interrupted_second_point)
    out = tmp_path / "decode.json"
    argv = ["--smoke", "--batches", "1", "--contexts", "32", "--repeats", "1", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench_decode.main(argv)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [r["model"] for r in partial["rows_so_far"]] == ["gqa"]
    assert partial["command"].startswith("python -m eval.bench.decode --smoke")


def test_decode_capacity_runs_at_a_small_size(shared_models, tmp_path):
    from eval.bench import decode as bench_decode

    out = tmp_path / "capacity.json"
    assert (
        bench_decode.main(["--smoke", "--capacity", "--partial", "--contexts", "64", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["capacity"]
    assert [r["model"] for r in rows] == ["gqa", "mla", "mla_partial", "mla_rorope"]
    # CPU reports no memory limit: the search starts at its bound and the step runs there.
    assert all(r["max_batch_runs"] == r["max_batch_by_bytes"] == bench_decode.MAX_BATCH for r in rows)
    assert rows[1]["per_sequence_gb"] < rows[0]["per_sequence_gb"]


def test_benchmark_steps_compile_before_their_cache(caplog, monkeypatch):
    """eval.bench.decode's steps are compiled from the cache's shapes before the cache is allocated, as
    `generate` compiles its own (one step a call and the device loop), and the timed calls reuse that
    compilation."""
    from eval.bench import decode as bench_decode

    config, params = bench_decode.models(DEMO_CONFIG, 48, only=("gqa",))["gqa"]
    with compiled_at_allocation(caplog, monkeypatch, bench_decode) as at_allocation:
        bench_decode.step_seconds(params, config, 2, 32, 2)
        bench_decode.step_seconds(params, config, 2, 32, 2, loop_steps=4)
    # each call makes its cache twice: its shapes (to compile from), then the arrays
    shapes_one, cache_one, shapes_loop, cache_loop = at_allocation
    assert "jit(decode_step)" not in shapes_one and "jit(decode_step)" in cache_one
    assert "jit(decode_steps)" not in shapes_loop and "jit(decode_steps)" in cache_loop
    assert compiled(caplog).count("jit(decode_step)") == compiled(caplog).count("jit(decode_steps)") == 1


def test_capacity_search_narrows_to_the_largest_batch_that_runs():
    """From the cache's fit down by 20% a failure, then halving the gap to the smallest failure: a step that
    runs up to 250 is found at 246 from 282 (282 fails, 225 runs, then 253 fails, 239 and 246 run)."""
    from eval.bench.decode import largest_that_runs

    tried = []
    runs = lambda batch: tried.append(batch) or batch <= 250
    assert largest_that_runs(282, runs) == (246, [282, 253])
    assert tried == [282, 225, 253, 239, 246]
    assert largest_that_runs(100, runs) == (100, [])  # the fit runs: no search
    assert largest_that_runs(3, lambda batch: False) == (0, [3, 2, 1])  # nothing runs


def test_capacity_search_records_the_allocator_at_each_failure(shared_models, monkeypatch):
    """A probe whose step runs out of memory is a failure row with XLA's first line and the allocator's
    figures then (its free bytes and largest free block), and the search goes on below it."""
    from eval.bench import decode as bench_decode
    from gptoss_mla_jax import cache as cache_lib

    real = bench_decode.step_seconds

    def step_seconds(params, config, batch, *args, **kw):
        if batch > 3:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 550.00MiB\ndump")
        return real(params, config, batch, *args, **kw)

    figures = {"bytes_limit": 100, "bytes_in_use": 90, "largest_free_block_bytes": 4}
    monkeypatch.setattr(bench_decode, "step_seconds", step_seconds)
    monkeypatch.setattr(bench_decode, "free_device_bytes", lambda: float("inf"))
    monkeypatch.setattr(bench_decode, "MAX_BATCH", 5)
    monkeypatch.setattr(bench_decode, "device_memory", lambda: figures)
    gqa = bench_decode.models(DEMO_CONFIG, 48, only=("gqa",))["gqa"]
    (row,) = bench_decode.capacity({"gqa": gqa}, [32], lambda row: None)
    assert row["max_batch_runs"] == 3 and [f["batch"] for f in row["failures"]] == [5, 4]
    assert row["failures"][0] == {
        "batch": 5, "error": "RESOURCE_EXHAUSTED: Out of memory allocating 550.00MiB", "allocator": figures
    }  # fmt: skip
    assert cache_lib.device_memory() == {}  # the CPU keeps no figures: a real run records none


def test_kernel_benchmark_runs_at_a_small_size(tmp_path):
    """eval.bench.decode --kernels on the CPU interpreter: every kernel agrees with its jnp path (bf16)."""
    from eval.bench import decode as bench_decode

    out = tmp_path / "kernels.json"
    argv = [
        "--kernels",
        "--smoke",
        "--batches",
        "1",
        "--contexts",
        "256",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert bench_decode.main(argv) == 0
    copy, *rows = json.loads(out.read_text())["kernels"]
    assert copy["copy_gb_per_s"] > 0
    layers = ["gqa", "mla", "mla_partial"]
    assert [(r["layer"], r["dtype"]) for r in rows] == [(x, "float32") for x in layers] + [
        (x, "bfloat16") for x in layers
    ]
    for row in rows:
        assert "error" not in row, row
        bound = 1e-5 if row["dtype"] == "float32" else 2**-6  # float32: exact; bf16: a few bf16 steps
        assert row["max_abs_error"] <= bound * row["max_abs_reference"]
        assert row["kernel_ms"] > 0 and row["jnp_ms"] > 0
    assert rows[0]["stock_gqa_ms"] > 0
    assert [c.get("head_block") for c in rows[-1]["configs"]] == [None, 2]  # absorbed MLA's heads split too


def test_kernel_benchmark_times_the_mosaic_gpu_kernel(monkeypatch, warpgroups_compiled_once):
    """The `mla_mosaic` layer of --kernels: decompressed MLA on the Mosaic GPU kernel (interpreted here, at
    a shape it takes: 64-slot blocks, rows of whole swizzles), one warpgroup a program and two, each launch
    run on it (not on Triton's kernel) and agreeing with the jnp path in bf16 as the Triton kernel's row
    does; a launch it does not run is an error of that launch; the switch restored after."""
    from eval.bench import decode_kernels
    from gptoss_mla_jax import flash_decode, flash_decode_mosaic

    ran = []  # the warps of each launch the Mosaic GPU kernel ran at
    kernel_before = flash_decode.DECOMPRESSED_KERNEL
    real = flash_decode_mosaic.decompressed_splits
    monkeypatch.setattr(
        flash_decode_mosaic, "decompressed_splits", lambda *a: ran.append(a[-1].warps) or real(*a)
    )
    rows = decode_kernels.kernel_rows([1], [128], 1, True, lambda row: None, ("mla_mosaic",))
    [row] = [r for r in rows if "layer" in r]
    assert "error" not in row and all("error" not in c for c in row["configs"]), row
    assert sorted(set(ran)) == [4, 8]
    assert row["max_abs_error"] <= 2**-6 * row["max_abs_reference"]
    assert kernel_before == flash_decode.DECOMPRESSED_KERNEL
    monkeypatch.setattr(decode_kernels, "MOSAIC_CONFIGS", [dict(block=64, warps=6, stages=2)])
    rows = decode_kernels.kernel_rows([1], [128], 1, True, lambda row: None, ("mla_mosaic",))
    assert "does not run" in next(r for r in rows if "layer" in r)["error"]


def test_kernel_benchmark_without_the_stock_peer(monkeypatch):
    """A JAX without pallas.ops.gpu (deprecated in 0.11): the GQA row is measured without its peer."""
    from eval.bench import decode_kernels

    monkeypatch.setattr(decode_kernels, "decode_attention", None)
    launch = [dict(block=16, warps=4, stages=2)]
    row = decode_kernels.kernel_point(
        "gqa", 1, 64, 1, 1e9, G=2, R=2, d=16, n2=4, r=24, configs=launch, head_blocks=[], dtype=jnp.float32
    )
    assert row["max_abs_error"] <= 1e-5 * row["max_abs_reference"] and row["jnp_ms"] > 0
    assert "stock_gqa_ms" not in row


def test_moe_benchmark_runs_at_a_small_size(tmp_path):
    """--moe on the CPU interpreter: per batch, the MoE on the grouped kernel (the table's launch and a
    swept one) equal to the float32 reference, the jnp path timed, the byte floor counting each distinct
    selected expert once, and the routing kernel's launches timed beside the jnp routing, with the same
    layout; once for each bound of the layout's row tile asked for (8: below every tile, the sorted layout,
    which the routing kernel does not serve), the layout's rows given to the packed products as halves
    (`--split-rows 0`); and,
    where the routing kernel serves the batch, the MoE as the decode step runs it."""
    from eval.bench import decode as bench_decode

    out = tmp_path / "moe.json"
    # One batch: every launch compiles the interpreted kernels anew; three tokens can share an expert.
    argv = ["--moe", "3", "--max-aligns", "64,8", "--split-rows", "0", "--smoke"]
    argv += ["--repeats", "1"]
    argv += ["--out", str(out)]
    assert bench_decode.main(argv) == 0
    head, *rows = json.loads(out.read_text())["moe"]
    assert head["copy_gb_per_s"] > 0
    k = bench_decode.DEMO_CONFIG.num_experts_per_tok
    rows = [row for row in rows if "copy_gb_per_s" not in row]  # each setting's head row
    assert [(r["batch"], r["max_align"], r["split_rows"]) for r in rows] == [(3, 64, 0), (3, 8, 0)]
    for row in rows:
        assert len(row["configs"]) == 2 and all("ms" in c for c in row["configs"])
        assert row["configs"][0]["launch"] == "default"
        # bf16 inputs against the float32 reference: the kernels' bf16 rounding of the activations.
        assert row["max_abs_error"] <= 2e-2 * row["max_abs_reference"]
        assert row["kernel_ms"] > 0 and row["jnp_ms"] > 0
        assert k <= row["distinct_experts"] <= row["pairs"] == k * row["batch"]
        assert row["bytes"] >= row["distinct_experts"] * head["expert_bytes"]
    # the routing kernel at each launch lays the pairs out as the jnp path does
    routed = rows[0]["routing"]["kernel"]
    assert len(routed) == 2 and all(c["same_layout"] for c in routed) and "routing" not in rows[1]
    # and the MoE as the decode step runs it, routed from the router's product
    stepped = rows[0]["stepped"]
    assert stepped["ms"] > 0 and stepped["device"]["busy_us"] >= 0
    assert stepped["max_abs_error"] <= 2e-2 * rows[0]["max_abs_reference"]
    assert "stepped" not in rows[1]


def test_decode_profile_runs_at_a_small_size(shared_models, tmp_path):
    """--profile: kernels per step and busy time from a trace of decode steps (CPU: no GPU streams, so the
    summary is empty but well formed; the GPU run fills it)."""
    from eval.bench import decode as bench_decode

    out = tmp_path / "profile.json"
    assert bench_decode.main(["--profile", "1,32", "--smoke", "--repeats", "2", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())["profile"]
    assert set(profile) == {"gqa", "mla"}
    assert all(p["wall_ms_per_step"] > 0 and p["kernels_per_step"] >= 0 for p in profile.values())


def test_decode_breakdown_runs_at_a_small_size(shared_models, tmp_path):
    """--breakdown times the step, a layer's attention and its MoE, each on jnp and on the kernels, and the
    unembedding, for GQA and MLA."""
    from eval.bench import decode as bench_decode

    out = tmp_path / "breakdown.json"
    assert bench_decode.main(["--smoke", "--breakdown", "1,64", "--repeats", "1", "--out", str(out)]) == 0
    breakdown = json.loads(out.read_text())["breakdown"]
    for model in ("gqa", "mla"):
        assert all(v > 0 for k, v in breakdown[model].items() if k.endswith("_ms")), breakdown[model]
        assert {"step_kernels_ms", "full_layer_attention_kernel_ms", "layer_moe_kernel_ms"} <= set(
            breakdown[model]
        )


def test_kernel_counters_run_at_a_small_size():
    """The Nsight Compute driver runs its kernels (the MoE on the grouped matmul, the decompressed MLA
    decode kernel) at a tiny size, interpreted."""
    from eval.experiments import kernel_counters

    assert kernel_counters.main(["--smoke", "--moe", "1,4", "--decompressed", "2,64", "--runs", "1"]) == 0
