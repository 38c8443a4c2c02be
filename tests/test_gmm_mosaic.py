"""The wide-batch MXFP4 kernel (`gmm_mosaic`) in the Mosaic GPU interpreter against float32 products of the
dequantized experts: both orientations of the activations, two program widths, the SwiGLU epilogue, tiles
of one expert throughout, experts no tile chooses and empty tiles; its layouts; what `prepare` refuses;
the MoE's decode rows on it against the grouped matmul's; and its lowering for CUDA at gpt-oss-20b's
shapes. Outputs are bf16: each within bf16's rounding (2^-8 of its value) of the float32 reference, plus
float32's summation-order error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.experiments import mosaic_ptxas
from gptoss_mla_jax import gmm_mosaic as gm
from gptoss_mla_jax import moe
from gptoss_mla_jax.config import GPT_OSS_20B
from gptoss_mla_jax.generation import DEMO_CONFIG
from gptoss_mla_jax.gmm import Glu
from gptoss_mla_jax.model import (
    check_params,
    init_params,
    wide_experts_bytes,
    wide_only,
    with_wide_experts,
    without_wide_experts,
)
from gptoss_mla_jax.mxfp4 import FOLDABLE_EXPONENT, dequantize
from weights.orbax_io import save_checkpoint
from weights.safetensors_io import save_hf

G, K, N = 3, 128, 256
GLU = Glu(1.702, 7.0)


@pytest.fixture(scope="module")
def experts():
    keys = jax.random.split(jax.random.key(0), 4)
    blocks = jax.random.bits(keys[0], (G, N, K // 32, 16), jnp.uint8)
    # exponents from far below 127 to the largest the one-multiply decoding takes
    scales = jax.random.randint(keys[1], (G, N, K // 32), 100, FOLDABLE_EXPONENT + 1).astype(jnp.uint8)
    bias = jax.random.normal(keys[2], (G, N))
    return blocks, scales, bias, dequantize(blocks, scales, jnp.float32)


def reference(x, w, bias, tile_expert, tile=gm.ROWS):
    """float32 rows of x through their tile's expert, [M, N] (tiles of `tile` rows); rows of empty tiles
    (expert G) as NaN."""
    row_expert = np.repeat(np.asarray(tile_expert), tile)
    clamped = np.minimum(row_expert, G - 1)
    out = jnp.einsum("mk,mnk->mn", x.astype(jnp.float32), w[clamped], precision="highest") + bias[clamped]
    return jnp.where((row_expert < G)[:, None], out, jnp.nan)


def assert_bf16_close(got, want):
    """got (bf16) within bf16's rounding of want (float32), on want's rows that are not NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want)
    real = ~np.isnan(want).any(axis=1)
    bound = 2.0**-8 * np.abs(want[real]) + 1e-5 * np.abs(want[real]).max()
    assert np.all(np.abs(got[real] - want[real]) <= bound), np.abs(got[real] - want[real]).max()


# expert 1 for every tile; experts 2 then 0 (1 chosen by none); an empty tile (G) between real ones
TILES = {"one_expert": [1, 1, 1], "some_experts": [2, 2, 0], "empty_tile": [0, G, 2, 1]}


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "launch",
    [gm.Launch(64, 2), gm.Launch(128, 3), gm.Launch(128, 2, rows_out=True), gm.Launch(64, 2, True, rows=64)],
)
def test_product_equals_float32_reference(experts, tiles, transposed, launch):
    blocks, scales, bias, w = experts
    tile_expert = jnp.asarray(TILES[tiles], jnp.int32)
    M = tile_expert.shape[0] * launch.rows
    x = jax.random.normal(jax.random.key(len(tiles)), (M, K)).astype(jnp.bfloat16)
    packed = gm.Packed(gm.pack(blocks, launch.cols), gm.exponents(scales, K))
    operand = x.T if transposed else x
    out = gm.product_t(
        operand, tile_expert, packed, bias, transposed=transposed, launch=launch, interpret=True
    )
    out = out if launch.rows_out else out.T
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    assert_bf16_close(out, reference(x, w, bias, tile_expert, launch.rows))


def test_programs_wider_than_a_copy():
    """Programs of 384 weight rows, more than a TMA copy takes (`gm.BOX`): their words, exponents and biases
    come in two copies each, with the SwiGLU's gates and ups three pieces each."""
    keys = jax.random.split(jax.random.key(3), 4)
    blocks = jax.random.bits(keys[0], (2, 384, K // 32, 16), jnp.uint8)
    scales = jax.random.randint(keys[1], (2, 384, K // 32), 110, FOLDABLE_EXPONENT + 1).astype(jnp.uint8)
    bias = jax.random.normal(keys[2], (2, 384))
    tile_expert = jnp.asarray([1, 0], jnp.int32)
    x = jax.random.normal(keys[3], (2 * gm.ROWS, K)).astype(jnp.bfloat16)
    w = dequantize(blocks, scales, jnp.float32)
    row_expert = np.repeat(np.asarray(tile_expert), gm.ROWS)
    want = (
        jnp.einsum("mk,mnk->mn", x.astype(jnp.float32), w[row_expert], precision="highest") + bias[row_expert]
    )
    order = gm.glu_rows(192, 384)
    packed = gm.Packed(gm.pack(blocks[:, order], 384), gm.exponents(scales[:, order], K))
    out = gm.product_t(
        x, tile_expert, packed, bias[:, order], glu=GLU, launch=gm.Launch(384, 2), interpret=True
    )
    assert_bf16_close(out.T, GLU(want))


def test_swiglu_epilogue_takes_gates_and_ups_from_one_program(experts):
    """gate_up's rows in `glu_rows`' order: each program's SwiGLU of its outputs, in the natural order."""
    blocks, scales, bias, w = experts
    tile_expert = jnp.asarray([2, 0], jnp.int32)
    x = jax.random.normal(jax.random.key(7), (2 * gm.ROWS, K)).astype(jnp.bfloat16)
    order = gm.glu_rows(N // 2, 128)
    packed = gm.Packed(gm.pack(blocks[:, order], 128), gm.exponents(scales[:, order], K))
    out = gm.product_t(
        x, tile_expert, packed, bias[:, order], glu=GLU, launch=gm.Launch(128, 2), interpret=True
    )
    assert out.shape == (N // 2, 2 * gm.ROWS)
    assert_bf16_close(out.T, GLU(reference(x, w, bias, tile_expert)))


def test_layouts():
    """glu_rows: gates then ups of each program's outputs, every row once; permute_bytes: its own inverse;
    by_halves: byte j of a run of 64 values holds values j and 32 + j."""
    order = gm.glu_rows(256, 128)
    assert sorted(order) == list(range(512))
    assert list(order[:3]) == [0, 2, 4] and list(order[64:67]) == [1, 3, 5] and order[128] == 128
    b = jnp.arange(64, dtype=jnp.uint8).reshape(1, 64)
    assert jnp.array_equal(gm.permute_bytes(gm.permute_bytes(b)), b)
    assert list(np.asarray(gm.permute_bytes(b))[0, :4]) == [0, 1, 8, 9]
    pairs = jnp.asarray(np.arange(32) % 16 | ((np.arange(32) + 3) % 16) << 4, jnp.uint8).reshape(2, 16)
    values = np.stack([np.asarray(pairs).ravel() & 15, np.asarray(pairs).ravel() >> 4], -1).ravel()  # 64
    halves = np.asarray(gm.by_halves(pairs))
    assert list(halves & 15) == list(values[:32]) and list(halves >> 4) == list(values[32:])


def test_refuses_what_it_cannot_run(experts):
    blocks, scales, bias, _ = experts
    packed = gm.Packed(gm.pack(blocks, 64), gm.exponents(scales, K))
    x = jnp.zeros((gm.ROWS, K), jnp.bfloat16)
    with pytest.raises(ValueError, match="takes bf16 x"):
        gm.product_t(x.astype(jnp.float32), jnp.zeros(1, jnp.int32), packed, bias, launch=gm.Launch(64, 2))
    with pytest.raises(ValueError, match="packed for programs of 64 rows"):
        gm.product_t(x, jnp.zeros(1, jnp.int32), packed, bias, launch=gm.Launch(128, 2))
    with pytest.raises(ValueError, match="one expert a tile"):
        gm.product_t(x[:16], jnp.zeros(1, jnp.int32), packed, bias, launch=gm.Launch(64, 2))
    assert "multiple of 128" in gm.refusal(K, N, gm.Launch(64, 2), glu=True)
    assert "steps of 64" in gm.refusal(96, N, gm.Launch(64, 2), glu=False)
    assert "up to 1024 rows" in gm.refusal(K, 2048, gm.Launch(2048, 2), glu=False)
    assert "tiles of 32 or 64 rows" in gm.refusal(K, N, gm.Launch(64, 2, rows=16), glu=False)


WIDE_CONFIG = dataclasses.replace(
    DEMO_CONFIG, hidden_size=192, intermediate_size=128, num_local_experts=4, num_hidden_layers=1,
    layer_types=DEMO_CONFIG.layer_types[:1],
)  # fmt: skip  # shapes the kernel's launches take: D a multiple of 192, 2F of 128


def test_wide_batches_are_those_measured():
    """gpt-oss's calls of 2 pairs an expert and more (16 tokens and more) take the wide-batch kernel where
    the experts carry its layout beside the checkpoint's; with its layout alone, every call does."""
    batches = (1, 8, 15, 16, 32, 594, 1024, 4096)
    assert [n for n in batches if moe.wide_batch(n, GPT_OSS_20B)] == [16, 32, 594, 1024, 4096]
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    beside, alone = (with_wide_experts(params, WIDE_CONFIG, replace=r) for r in (False, True))
    takes = lambda p, n: moe.takes_wide(p["layers"][0]["mlp"], n, WIDE_CONFIG, jnp.bfloat16)
    assert [n for n in (1, 3, 4, 16) if takes(beside, n)] == [4, 16]  # WIDE_CONFIG: top 2 of 4 experts
    assert [n for n in (1, 3, 4, 16) if takes(alone, n)] == [1, 3, 4, 16]
    assert not takes(params, 16)


def test_decode_step_at_a_wide_batch_leaves_the_router_to_the_wide_path(monkeypatch):
    """With `model.FUSED_NORMS` "router", a decode step takes the router's product in the residual add's
    kernel (`add_norm_routed`) only for a MoE that reads it: not where the batch takes the wide-batch
    kernel, which routes in jnp."""
    from gptoss_mla_jax import model
    from gptoss_mla_jax.cache import init_cache

    calls, routed = [], model.add_norm_routed
    monkeypatch.setattr(model, "add_norm_routed", lambda *a: calls.append("routed") or routed(*a))
    monkeypatch.setattr(model, "FUSED_NORMS", "router")
    params = with_wide_experts(
        init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4"), WIDE_CONFIG
    )
    batch = 32
    assert moe.routed_in_kernel(batch, WIDE_CONFIG) and moe.wide_batch(batch, WIDE_CONFIG)
    tokens, cache = jnp.zeros((batch, 1), jnp.int32), init_cache(WIDE_CONFIG, batch, 16, jnp.bfloat16)
    options = model.ForwardOptions(decode_kernels=True)
    step = lambda p, cache: model.forward(p, tokens, cache, WIDE_CONFIG, options=options)[0]
    for p, want in ((params, []), (without_wide_experts(params), ["routed"])):
        calls.clear()
        jax.eval_shape(step, p, cache)
        assert calls == want


def test_counts_the_bytes_it_adds():
    """`wide_experts_bytes`: what `with_wide_experts` adds, counted before it is made (at most the
    exponents' padding more), for `generate` to check it fits."""
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    added = sum(
        leaf.nbytes
        for leaf in jax.tree.leaves(
            with_wide_experts(params, WIDE_CONFIG)["layers"][0]["mlp"]["experts"][moe.WIDE]
        )
    )
    assert wide_experts_bytes(params) == added


def test_without_wide_experts_leaves_the_checkpoints_layout():
    """`without_wide_experts` undoes `with_wide_experts` (benchmarks time the grouped matmul's step on it)."""
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    wide = with_wide_experts(params, WIDE_CONFIG)
    assert moe.WIDE in wide["layers"][0]["mlp"]["experts"]
    back = without_wide_experts(wide)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True))


def test_prepare_refuses_what_the_kernel_cannot_decode():
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    experts = params["layers"][0]["mlp"]["experts"]
    assert gm.prepare(experts, WIDE_CONFIG.intermediate_size) is not None
    large = experts["down_proj_scales"].at[0, 0, 0].set(FOLDABLE_EXPONENT + 1)
    assert gm.prepare({**experts, "down_proj_scales": large}, WIDE_CONFIG.intermediate_size) is None
    dense = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "dense")
    assert with_wide_experts(dense, WIDE_CONFIG) is dense
    small = init_params(DEMO_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")  # D = 128: no launch divides
    assert with_wide_experts(small, DEMO_CONFIG) is small
    assert with_wide_experts(small, DEMO_CONFIG, replace=True, consume=True) is small
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(small))  # nothing given up for nothing


def test_consumed_checkpoint_layout_is_deleted_layer_by_layer():
    """`with_wide_experts(..., replace=True, consume=True)` (the command line's): the same layout as without
    `consume`, the checkpoint's packed arrays deleted, the rest of the caller's params kept; `consume`
    without `replace` is refused."""
    config = dataclasses.replace(WIDE_CONFIG, num_hidden_layers=2, layer_types=DEMO_CONFIG.layer_types[:2])
    fresh = lambda: init_params(config, jax.random.key(0), jnp.bfloat16, "mxfp4")
    want = with_wide_experts(fresh(), config, replace=True)
    params = fresh()
    with pytest.raises(ValueError, match="needs replace=True"):
        with_wide_experts(params, config, consume=True)
    got = with_wide_experts(params, config, replace=True, consume=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for layer in params["layers"]:
        experts = layer["mlp"]["experts"]
        assert sorted(name for name, leaf in experts.items() if leaf.is_deleted()) == [
            "down_proj_blocks", "down_proj_scales", "gate_up_proj_blocks", "gate_up_proj_scales"
        ]  # fmt: skip
    assert not params["embed_tokens"].is_deleted()


@pytest.mark.parametrize(("rows_out", "batch"), [(False, 32), (True, 32), (True, 64)])
def test_decode_rows_equal_the_grouped_matmuls(monkeypatch, rows_out, batch):
    """Decode batches of 32 and 64 tokens (16 and 32 pairs an expert: `moe.wide_batch`) through one layer's
    MoE on the kernels: with the experts' wide layout (`with_wide_experts`, accepted by `check_params`) the
    rows come from this kernel (both products, on tiles of 32 and 64 rows: `gm.at_pairs`), and equal the
    grouped matmul's within bf16, down's output written as rows or transposed."""
    down = dataclasses.replace(gm.LAUNCH["down"], rows_out=rows_out)
    monkeypatch.setattr(gm, "LAUNCH", {**gm.LAUNCH, "down": down})
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    experts = params["layers"][0]["mlp"]["experts"]
    for i, name in enumerate(("gate_up_proj_bias", "down_proj_bias")):  # nonzero: their order is checked
        experts[name] = 0.5 * jax.random.normal(jax.random.key(i), experts[name].shape, jnp.bfloat16)
    wide = with_wide_experts(params, WIDE_CONFIG)
    check_params(wide, WIDE_CONFIG)
    p, p_wide = params["layers"][0]["mlp"], wide["layers"][0]["mlp"]
    assert moe.WIDE in p_wide["experts"] and moe.wide_batch(batch, WIDE_CONFIG)
    x = jax.random.normal(jax.random.key(1), (batch, 1, WIDE_CONFIG.hidden_size), jnp.bfloat16)
    calls, product_t = [], gm.product_t
    monkeypatch.setattr(gm, "product_t", lambda *a, **kw: calls.append(kw) or product_t(*a, **kw))
    got = moe.moe_sparse(p_wide, x, WIDE_CONFIG, kernels=True).astype(jnp.float32)
    assert [kw.get("transposed", False) for kw in calls] == [False, True]  # gate_up on x, down on its out^T
    pairs = batch * WIDE_CONFIG.num_experts_per_tok / WIDE_CONFIG.num_local_experts
    assert [kw["launch"].rows for kw in calls] == [64 if pairs > gm.ROWS_64_ABOVE else 32] * 2
    monkeypatch.setattr(gm, "product_t", product_t)
    want = moe.moe_sparse(p, x, WIDE_CONFIG, kernels=True).astype(jnp.float32)
    assert float(jnp.abs(got - want).max()) <= 2.0**-7 * float(jnp.abs(want).max())


@pytest.mark.parametrize(
    ("product", "launch"),
    [
        ("gate_up", gm.LAUNCH["gate_up"]), ("down", gm.LAUNCH["down"]), ("gate_up", gm.Launch(384, 3)),
        ("down", gm.Launch(320, 4, rows_out=True)), ("gate_up", gm.Launch(128, 4, rows=32)),
        ("down", gm.Launch(192, 4, rows_out=True, rows=32)),
    ],
)  # fmt: skip
def test_lowers_for_cuda_at_gpt_oss_20b_shape(product, launch):
    """Batch 256's layout through gpt-oss-20b's experts at the launch table's launches (64-row tiles there),
    on 32-row tiles (batch 128's) and at the widest of the sweep's (`eval.bench.decode_moe.WIDE_LAUNCHES`),
    down written as rows: lowered for CUDA from the CPU (no device here: Mosaic GPU's lowering, not ptxas)."""
    assert mosaic_ptxas.moe_module(product, batch=256, launch=launch)  # one Mosaic GPU module


def test_experts_in_the_wide_layout_alone(monkeypatch, tmp_path):
    """`with_wide_experts(..., replace=True)`: the checkpoint's packed bytes dropped, `check_params` accepts
    the rest; one layer's MoE of 3 tokens (below `moe.wide_batch`) and of 40 in chunks of 16
    (`moe.WIDE_CHUNK`: two whole ones and the rest) on the kernel equals the checkpoint layout's jnp path
    within bf16; with both layouts, a grouped path asked for by name is taken; a gradient through the kernel,
    what reads the checkpoint's layout (saving too), float32 activations and `without_wide_experts`
    refuse."""
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    experts = params["layers"][0]["mlp"]["experts"]
    for i, name in enumerate(("gate_up_proj_bias", "down_proj_bias")):  # nonzero: their order is checked
        experts[name] = 0.5 * jax.random.normal(jax.random.key(i), experts[name].shape, jnp.bfloat16)
    alone = with_wide_experts(params, WIDE_CONFIG, replace=True)
    check_params(alone, WIDE_CONFIG)
    assert wide_only(alone) and not wide_only(with_wide_experts(params, WIDE_CONFIG))
    assert not any(name.endswith(("_blocks", "_scales")) for name in alone["layers"][0]["mlp"]["experts"])
    p, p_alone = params["layers"][0]["mlp"], alone["layers"][0]["mlp"]
    monkeypatch.setattr(moe, "WIDE_CHUNK", 16)
    calls, wide_rows = [], moe._wide_rows
    monkeypatch.setattr(
        moe, "_wide_rows", lambda p, flat, *a: calls.append(len(flat)) or wide_rows(p, flat, *a)
    )
    for n, chunks in ((3, [3]), (40, [16, 8])):  # lax.map traces one whole chunk
        calls.clear()
        x = jax.random.normal(jax.random.key(n), (n, 1, WIDE_CONFIG.hidden_size), jnp.bfloat16)
        got = moe.moe_sparse(p_alone, x, WIDE_CONFIG).astype(jnp.float32)
        assert calls == chunks
        want = moe.moe_sparse(p, x, WIDE_CONFIG).astype(jnp.float32)
        assert float(jnp.abs(got - want).max()) <= 2.0**-7 * float(jnp.abs(want).max()), n
    beside = with_wide_experts(params, WIDE_CONFIG)["layers"][0]["mlp"]
    calls.clear()
    moe.moe_sparse(beside, x, WIDE_CONFIG, grouped="ragged_dot")  # a path asked for by name: as asked
    assert calls == []
    with pytest.raises(ValueError, match="runs forward only"):
        jax.grad(lambda x: moe.moe_sparse(p_alone, x, WIDE_CONFIG).astype(jnp.float32).sum())(x)
    x = jnp.ones((2, 1, WIDE_CONFIG.hidden_size), jnp.bfloat16)
    with pytest.raises(ValueError, match="wide-batch kernel's layout"):
        moe.moe_dense(p_alone, x, WIDE_CONFIG)
    with pytest.raises(ValueError, match="bf16 activations; got float32"):
        moe.moe_sparse(p_alone, x.astype(jnp.float32), WIDE_CONFIG)
    with pytest.raises(ValueError, match="no other to keep"):
        without_wide_experts(alone)
    with pytest.raises(ValueError, match="wide-batch kernel's layout"):  # a layout only this kernel reads
        save_hf(alone, WIDE_CONFIG, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="wide-batch kernel's layout"):
        save_checkpoint(str(tmp_path / "orbax"), alone, WIDE_CONFIG)
    assert not list(tmp_path.iterdir())  # nothing written


def test_model_on_the_wide_layout_alone_equals_the_checkpoints(monkeypatch):
    """A prefill of 2 x 24 tokens (the MoE in two chunks of 20 tokens and the rest) and a decode step on the
    kernels through the model with the experts in the wide-batch kernel's layout alone: the logits equal the
    checkpoint layout's within bf16 (the MoE's rows rounded to bf16 on another path: 2^-7 of the largest)."""
    from gptoss_mla_jax import model
    from gptoss_mla_jax.cache import init_cache

    monkeypatch.setattr(moe, "WIDE_CHUNK", 20)
    params = init_params(WIDE_CONFIG, jax.random.key(0), jnp.bfloat16, "mxfp4")
    experts = params["layers"][0]["mlp"]["experts"]
    for i, name in enumerate(("gate_up_proj_bias", "down_proj_bias")):  # nonzero: their order is checked
        experts[name] = 0.5 * jax.random.normal(jax.random.key(i), experts[name].shape, jnp.bfloat16)
    alone = with_wide_experts(params, WIDE_CONFIG, replace=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, WIDE_CONFIG.vocab_size)
    step = jnp.array([[3], [5]], jnp.int32)
    logits = {}
    for name, p in (("checkpoint", params), ("alone", alone)):
        cache = init_cache(WIDE_CONFIG, 2, 32, jnp.bfloat16)
        prefill = model.forward(p, tokens, cache, WIDE_CONFIG)
        options = model.ForwardOptions(decode_kernels=True)
        decoded = model.forward(p, step, prefill.cache, WIDE_CONFIG, options=options)
        logits[name] = (prefill.logits, decoded.logits)
    for got, want in zip(logits["alone"], logits["checkpoint"], strict=True):
        assert float(jnp.abs(got - want).max()) <= 2.0**-7 * float(jnp.abs(want).max())


def test_command_line_holds_the_experts_once_for_a_wide_batch(monkeypatch):
    """`generation.experts_for_batch` (the command line's): where `generate` would take the wide-batch
    kernel (compiled kernels, bf16, a wide batch: 4 tokens and more for WIDE_CONFIG's top 2 of 4) the experts
    in its layout alone, the checkpoint's arrays deleted; otherwise the params as they are."""
    from gptoss_mla_jax import flash_decode, generation

    monkeypatch.setattr(flash_decode, "runs_compiled", lambda: True)  # as on a GPU; nothing runs here
    fresh = lambda dtype=jnp.bfloat16: init_params(WIDE_CONFIG, jax.random.key(0), dtype, "mxfp4")
    for params, batch, kernels in ((fresh(), 3, None), (fresh(), 4, False), (fresh(jnp.float32), 4, None)):
        assert generation.experts_for_batch(params, WIDE_CONFIG, batch, kernels) is params
    params = fresh()
    alone = generation.experts_for_batch(params, WIDE_CONFIG, 4, None)
    assert wide_only(alone)
    assert params["layers"][0]["mlp"]["experts"]["gate_up_proj_blocks"].is_deleted()
    assert generation.experts_for_batch(alone, WIDE_CONFIG, 4, None) is alone
