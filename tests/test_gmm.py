"""The Pallas grouped matmul (interpret mode, CPU, float32) equals jax.lax.ragged_dot and its gradients on
ragged group sizes, MXFP4 weights equal dequantize-then-ragged_dot, the whole model on it equals the other
MoE paths and transformers, and every kernel lowers to Triton for CUDA at gpt-oss-20b's expert shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax.gmm import Glu, Mxfp4, Tiles, gmm, grouped_product, tgmm, tile_map
from gptoss_mla_jax.mxfp4 import dequantize_experts, pad_scales

# Small tiles, so that groups end inside tiles and span several (the launch table's are for the GPU).
SMALL = {
    ("gmm", None, None): Tiles(rows=16, cols=16, depth=16),
    ("gmm_t", None, None): Tiles(rows=16, cols=16, depth=16),
    ("tgmm", None, None): Tiles(rows=16, cols=16),
    ("mxfp4", None, None): Tiles(rows=16, cols=16, depth=64),
    ("mxfp4_t", None, None): Tiles(rows=16, cols=64, depth=16),
}
SIZES = {
    "zeros, one row, groups ending inside tiles, rows past the groups": ([0, 1, 17, 0, 40, 5], 3),
    "one group holds every row, M not a multiple of the tile": ([0, 0, 50, 0], 0),
    "groups on tile edges": ([16, 32, 16], 0),
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(gmm_lib, "LAUNCH", SMALL)


def ragged_case(sizes, extra_rows, K, N, seed=0):
    rng = np.random.default_rng(seed)
    M = sum(sizes) + extra_rows
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((len(sizes), N)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    return lhs, jnp.asarray(sizes, jnp.int32), bias, cot


def random_mxfp4(G: int, K: int, N: int, seed: int) -> tuple[Mxfp4, jax.Array]:
    """Random packed weights W[g] [N, K] (scales 2^-10 .. 2^8) and their exact dequantization [G, K, N]."""
    rng = np.random.default_rng(seed)
    blocks = jnp.asarray(rng.integers(0, 256, (G, N, K // 32, 16), dtype=np.uint8))
    scales = jnp.asarray(rng.integers(117, 136, (G, N, K // 32), dtype=np.uint8))
    return Mxfp4(blocks, scales), dequantize_experts(blocks, scales, jnp.float32)


def with_bias(out, sizes, bias):
    """ragged_dot's output plus each row's group bias (rows past the groups stay zero)."""
    group = np.searchsorted(np.cumsum(sizes), np.arange(out.shape[0]), side="right")
    inside = (group < len(sizes))[:, None]
    return out + jnp.where(inside, bias[np.minimum(group, len(sizes) - 1)], 0)


def close(got, want):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", list(SIZES))
@pytest.mark.parametrize("K, N", [(48, 40), (40, 24)])
def test_forward_and_gradients_equal_ragged_dot(case, K, N):
    lhs, sizes, bias, cot = ragged_case(*SIZES[case], K, N)
    rhs = jnp.asarray(np.random.default_rng(1).standard_normal((len(sizes), K, N)), jnp.float32)
    ours = lambda l, r, b: gmm(l, r, sizes, b)
    ref = lambda l, r, b: with_bias(jax.lax.ragged_dot(l, r, sizes), np.asarray(sizes), b)
    got, got_vjp = jax.vjp(ours, lhs, rhs, bias)
    want, want_vjp = jax.vjp(ref, lhs, rhs, bias)
    close(got, want)
    for g, w in zip(got_vjp(cot), want_vjp(cot), strict=True):
        close(g, w)


def test_tgmm_gives_zeros_to_empty_groups():
    lhs, sizes, _, cot = ragged_case([0, 20, 0], 0, 32, 16)
    grads = tgmm(lhs, cot, sizes, jnp.float32)
    assert not np.asarray(grads[0]).any() and not np.asarray(grads[2]).any()
    close(grads[1], lhs.T @ cot)


@pytest.mark.parametrize("case", list(SIZES))
def test_mxfp4_equals_dequantize_then_ragged_dot(case):
    K, N = 96, 40  # 3 groups of 32 along K: the 64-wide depth tile ends inside K
    lhs, sizes, bias, cot = ragged_case(*SIZES[case], K, N)
    packed, dense = random_mxfp4(len(SIZES[case][0]), K, N, seed=2)
    got, got_vjp = jax.vjp(lambda l: gmm(l, packed, sizes, bias), lhs)
    want, want_vjp = jax.vjp(
        lambda l: with_bias(jax.lax.ragged_dot(l, dense, sizes), np.asarray(sizes), bias), lhs
    )
    close(got, want)
    close(got_vjp(cot)[0], want_vjp(cot)[0])


@pytest.mark.parametrize("rows", [16, 64], ids=["short tiles: lhs split on chip", "tall tiles: split halves"])
def test_mxfp4_forward_takes_lhs_either_way(rows):
    """The packed forward kernel's two ways of getting lhs's even and odd columns agree with ragged_dot."""
    case = SIZES["zeros, one row, groups ending inside tiles, rows past the groups"]
    K, N = 96, 40
    lhs, sizes, bias, _ = ragged_case(*case, K, N)
    packed, dense = random_mxfp4(len(case[0]), K, N, seed=7)
    assert gmm_lib._splits_lhs_on_chip(Tiles(rows=rows), aligned=False) == (rows == 16)
    assert gmm_lib._splits_lhs_on_chip(Tiles(rows=rows), aligned=True) == (rows <= gmm_lib.SPLIT_ROWS)
    got = grouped_product(lhs, packed, sizes, bias, launch=Tiles(rows=rows, cols=16, depth=64))
    close(got, with_bias(jax.lax.ragged_dot(lhs, dense, sizes), np.asarray(sizes), bias))


@pytest.mark.parametrize(
    "weights, split_rows",
    [("dense", 64), ("mxfp4", 64), ("mxfp4 with padded scales", 64), ("mxfp4", 0)],
    ids=["dense", "mxfp4", "mxfp4 with padded scales", "mxfp4, lhs as halves"],
)
def test_groups_aligned_to_the_row_tile_find_their_own_tiles(weights, split_rows, monkeypatch):
    """`rows` given (groups start at multiples of it, as the MoE lays out decode batches): each program
    finds its group from the sizes; forward and d(lhs) equal ragged_dot, empty groups and rows past the
    groups included; packed weights also with their scale rows padded as `generate` gives them to the
    kernels (`mxfp4.pad_scales`), and with lhs split on chip or given as halves (`gmm.SPLIT_ROWS`)."""
    monkeypatch.setattr(gmm_lib, "SPLIT_ROWS", split_rows)
    sizes_list, K, N = [16, 0, 32, 16, 0], 64, 40
    lhs, sizes, bias, cot = ragged_case(sizes_list, 16, K, N)
    if weights == "dense":
        rhs = dense = jnp.asarray(np.random.default_rng(4).standard_normal((5, K, N)), jnp.float32)
    else:
        rhs, dense = random_mxfp4(5, K, N, seed=4)
        if weights == "mxfp4 with padded scales":
            rhs = Mxfp4(rhs.blocks, pad_scales(rhs.scales))
            assert rhs.scales.shape[-1] == 16
    got, got_vjp = jax.vjp(lambda l: gmm(l, rhs, sizes, bias, rows=16), lhs)
    want, want_vjp = jax.vjp(lambda l: with_bias(jax.lax.ragged_dot(l, dense, sizes), sizes_list, bias), lhs)
    close(got, want)
    close(got_vjp(cot)[0], want_vjp(cot)[0])


@pytest.mark.parametrize("weights", ["dense", "mxfp4"])
@pytest.mark.parametrize("glu", [None, Glu(1.702, 7.0)], ids=["product", "glu on chip"])
def test_one_row_broadcast_equals_its_copies(weights, glu):
    """`broadcast`: lhs of one row standing for every row of an aligned layout (one token's decode layout)
    gives exactly what the rows copied out give, K and N ragged, the layout's height not a multiple of the
    tile, an empty group included; as partial sums too. Refused where it cannot hold: lhs of more rows, a
    product without aligned rows, d(lhs), or a launch that takes lhs as halves."""
    K, N, sizes_list = 40, 40, [16, 0, 16, 13]
    rng = np.random.default_rng(11)
    token = jnp.asarray(rng.standard_normal((1, K)), jnp.float32)
    sizes = jnp.asarray(sizes_list, jnp.int32)
    bias = jnp.asarray(rng.standard_normal((len(sizes_list), N)), jnp.float32)
    if weights == "dense":
        rhs = jnp.asarray(rng.standard_normal((len(sizes_list), K, N)), jnp.float32)
    else:
        rhs, _ = random_mxfp4(len(sizes_list), 64, N, seed=12)
        token = jnp.pad(token, ((0, 0), (0, 64 - K)))
    product = lambda lhs, **kw: grouped_product(lhs, rhs, sizes, bias, rows=16, glu=glu, **kw)
    want = product(jnp.broadcast_to(token, (45, token.shape[1])))
    np.testing.assert_array_equal(product(token, broadcast=45), want)
    if glu is None:
        partial = lambda lhs, **kw: grouped_product(lhs, rhs, sizes, bias, rows=16, partials=True, **kw)
        np.testing.assert_array_equal(
            partial(token, broadcast=45), partial(jnp.broadcast_to(token, (45, token.shape[1])))
        )
    with pytest.raises(ValueError, match="broadcast takes lhs of one row \\(not 2\\)"):
        grouped_product(jnp.concatenate([token, token]), rhs, sizes, rows=16, broadcast=45)
    with pytest.raises(ValueError, match="aligned to `rows`"):
        grouped_product(token, rhs, sizes, broadcast=45)
    if weights == "mxfp4":
        with pytest.raises(ValueError, match="broadcast needs a row tile that splits lhs on chip"):
            grouped_product(
                token, rhs, sizes, rows=16, broadcast=45, launch=Tiles(rows=128, cols=16, depth=64)
            )


@pytest.mark.parametrize("weights", ["dense", "mxfp4"])
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("aligned", [False, True], ids=["tile map", "aligned groups"])
def test_split_contractions_equal_ragged_dot(weights, splits, aligned):
    """Forward products whose contraction is divided among `splits` programs per tile (3 steps of 32:
    shares of 2 and 1, 1 each, and splits past the steps that add only zeros) equal ragged_dot, bias
    counted once, and so do their float32 partial sums added afterwards (`partials`); transposed products
    refuse to split."""
    ragged = "zeros, one row, groups ending inside tiles, rows past the groups"
    (sizes_list, extra), K, N = ([16, 0, 32, 16, 0], 0) if aligned else SIZES[ragged], 96, 40
    lhs, sizes, bias, _ = ragged_case(sizes_list, extra, K, N)
    if weights == "dense":
        rhs = dense = jnp.asarray(
            np.random.default_rng(6).standard_normal((len(sizes_list), K, N)), jnp.float32
        )
    else:
        rhs, dense = random_mxfp4(len(sizes_list), K, N, seed=6)
    launch = Tiles(rows=16, cols=16, depth=32, warps=4, stages=3, splits=splits)
    got = grouped_product(lhs, rhs, sizes, bias, launch=launch, rows=16 if aligned else None)
    close(got, with_bias(jax.lax.ragged_dot(lhs, dense, sizes), sizes_list, bias))
    parts = grouped_product(lhs, rhs, sizes, bias, launch=launch, rows=16 if aligned else None, partials=True)
    assert parts.shape[0] == splits and parts.dtype == jnp.float32
    close(parts.sum(axis=0)[: lhs.shape[0]], got)
    whole = grouped_product(lhs, rhs, sizes, bias, launch=Tiles(rows=16, cols=16, depth=32), partials=True)
    assert whole.shape[0] == 1 and whole.dtype == lhs.dtype
    close(whole[0, : lhs.shape[0]], got)
    with pytest.raises(ValueError, match="only a forward product without glu returns its partial sums"):
        grouped_product(lhs, rhs, sizes, bias, launch=launch, glu=Glu(1.7, 7.0), partials=True)
    with pytest.raises(ValueError, match="only forward products split"):
        grouped_product(lhs[:, :N], rhs, sizes, None, transpose_rhs=True, launch=launch)


@pytest.mark.parametrize("fill, K, split", [(100, 96, True), (8, 96, False), (100, 32, False)])
def test_products_of_few_programs_split_their_contraction(monkeypatch, fill, K, split):
    """A launch's `fill_programs`: an aligned forward product of fewer programs (here 3 column tiles x 4
    row tiles = 12) splits its contraction in two, unless it has a single step (K = 32 at depth 32); the
    result equals ragged_dot either way."""
    sizes_list, N = [16, 0, 32, 16, 0], 40
    lhs, sizes, bias, _ = ragged_case(sizes_list, 0, K, N)
    rhs, dense = random_mxfp4(len(sizes_list), K, N, seed=5)
    launched = []
    forward = gmm_lib._forward
    monkeypatch.setattr(gmm_lib, "_forward", lambda *a: launched.append(a[6].splits) or forward(*a))
    launch = Tiles(rows=16, cols=16, depth=32, fill_programs=fill)
    got = grouped_product(lhs, rhs, sizes, bias, launch=launch, rows=16)
    assert launched == [2 if split else 1]
    close(got, with_bias(jax.lax.ragged_dot(lhs, dense, sizes), sizes_list, bias))


@pytest.mark.parametrize("weights", ["dense", "mxfp4"])
@pytest.mark.parametrize("aligned", [False, True], ids=["tile map", "aligned groups"])
def test_glu_on_chip_equals_glu_after_the_product(weights, aligned):
    """`glu` in the forward kernels (each tile's column pairs into half as many outputs; 40 columns end
    inside the last 16-column tile) equals it applied to ragged_dot's product, and so do the gradients in
    lhs and bias; split contractions apply it after adding their partial sums; transposed products refuse
    it."""
    ragged = "zeros, one row, groups ending inside tiles, rows past the groups"
    (sizes_list, extra), K, N = ([16, 0, 32, 16, 0], 0) if aligned else SIZES[ragged], 64, 40
    lhs, sizes, bias, _ = ragged_case(sizes_list, extra, K, N)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal((lhs.shape[0], N // 2)), jnp.float32)
    if weights == "dense":
        rhs = dense = jnp.asarray(
            np.random.default_rng(8).standard_normal((len(sizes_list), K, N)), jnp.float32
        )
    else:
        rhs, dense = random_mxfp4(len(sizes_list), K, N, seed=8)
        rhs, dense = Mxfp4(rhs.blocks, rhs.scales - 6), dense / 64  # products near the clamp
    glu = Glu(alpha=1.702, limit=7.0)
    rows = 16 if aligned else None
    got, got_vjp = jax.vjp(lambda l, b: gmm(l, rhs, sizes, b, rows=rows, glu=glu), lhs, bias)
    want, want_vjp = jax.vjp(
        lambda l, b: glu(with_bias(jax.lax.ragged_dot(l, dense, sizes), sizes_list, b)), lhs, bias
    )
    product = with_bias(jax.lax.ragged_dot(lhs, dense, sizes), sizes_list, bias)
    assert float(product.max()) > glu.limit and float(product.min()) < -glu.limit  # both clamps at work
    close(got, want)
    for g, w in zip(got_vjp(cot), want_vjp(cot), strict=True):
        close(g, w)
    split = grouped_product(lhs, rhs, sizes, bias, launch=Tiles(16, 16, 32, splits=2), rows=rows, glu=glu)
    close(split, want)  # the partial sums added first, then glu
    with pytest.raises(ValueError, match="glu needs a forward product"):
        grouped_product(lhs[:, :N], rhs, sizes, None, transpose_rhs=True, glu=glu)


def test_tile_map_covers_every_row_once():
    sizes, rows, m = jnp.asarray([0, 1, 17, 0, 40, 5], jnp.int32), 16, 80
    tm = jax.tree.map(np.asarray, tile_map(sizes, m, rows))
    covered = np.zeros(m, int)
    for g, t in zip(tm.group, tm.tile, strict=True):
        if g <= len(sizes):  # a real pair (group G: the rows past the groups)
            r = np.arange(t * rows, (t + 1) * rows)
            covered[r[(r >= tm.start[g]) & (r < tm.end[g])]] += 1
    assert (covered == 1).all()


def test_refusals():
    lhs, sizes = jnp.zeros((8, 48)), jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match="has 48 columns, the weights contract over 40"):
        gmm(lhs, jnp.zeros((1, 40, 16)), sizes)
    packed = Mxfp4(jnp.zeros((1, 16, 2, 16), jnp.uint8), jnp.zeros((1, 16, 2), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        grouped_product(jnp.zeros((8, 64)), packed, sizes, launch=Tiles(16, 16, 16))


def test_row_tiles_follow_the_rows_per_group():
    """A batched decode step's few pairs per expert get short row tiles, training's keep the table's."""
    tall = Tiles(rows=256)
    assert gmm_lib._fit_rows(tall, 256, 32).rows == 16
    assert gmm_lib._fit_rows(tall, 16384, 32).rows == 256


def test_decode_launches_follow_the_batch(monkeypatch):
    """The packed products at gpt-oss-20b's decode layouts (32 experts; heights as the MoE lays out the
    pairs of batches 1, 8, 64 and 256) take the "_small" launch where few experts or few rows per expert
    are selected and the "_small_wide" one where every expert holds rows; training heights the table's."""
    monkeypatch.undo()
    launch = lambda m, rows: gmm_lib.choose_launch("mxfp4", 2880, 5760, m, 32, rows)
    small = gmm_lib.LAUNCH[("mxfp4_small", None, None)]
    wide = gmm_lib.LAUNCH[("mxfp4_small_wide", None, None)]
    assert launch(4 + 4 * 15, 16) == small and launch(32 + 32 * 15, 16) == small
    assert launch(256 + 32 * 15, 16) == wide
    assert launch(1024 + 32 * 63, 64) == dataclasses.replace(wide, rows=64)  # batch 256's layout
    assert launch(1024, None) == dataclasses.replace(wide, rows=32)
    assert launch(16384, None) == gmm_lib.LAUNCH[("mxfp4", None, None)]
    assert gmm_lib.choose_launch("gmm", 2880, 5760, 1024, 32) == dataclasses.replace(
        gmm_lib.LAUNCH[("gmm_small", None, None)], rows=32
    )


def test_kernels_lower_for_the_gpu_at_gpt_oss_20b_shapes(monkeypatch):
    """Forward, d(lhs) and d(rhs) at gpt-oss-20b's expert shapes (bf16 and MXFP4, 16,384 pairs) lower to
    Triton for CUDA from this CPU-only machine, with the launch table's settings."""
    monkeypatch.undo()
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    M, E, D, F = 16384, 32, 2880, 5760
    sizes = spec(E, dtype=jnp.int32)
    packed = lambda n, k: (spec(E, n, k // 32, 16, dtype=jnp.uint8), spec(E, n, k // 32, dtype=jnp.uint8))
    cases = {  # name: (function, args, Triton calls: the forward is dead code in a grad of a sum)
        "dense gate_up grads": (
            lambda l, w, s, b: jax.grad(lambda l, w: gmm(l, w, s, b, interpret=False).sum(), (0, 1))(l, w),
            (spec(M, D), spec(E, D, F), sizes, spec(E, F)),
            2,
        ),
        "dense down forward": (
            lambda l, w, s, b: gmm(l, w, s, b, interpret=False),
            (spec(M, F // 2), spec(E, F // 2, D), sizes, spec(E, D)),
            1,
        ),
        "mxfp4 gate_up forward": (
            lambda l, bl, sc, s, b: gmm(l, Mxfp4(bl, sc), s, b, interpret=False),
            (spec(M, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "mxfp4 gate_up forward at a decode batch (groups aligned to the row tile)": (
            lambda l, bl, sc, s, b: gmm(l, Mxfp4(bl, sc), s, b, interpret=False, rows=16),
            (spec(64, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "mxfp4 gate_up forward at a decode batch of 256 (the wide launch)": (
            lambda l, bl, sc, s, b: gmm(l, Mxfp4(bl, sc), s, b, interpret=False),
            (spec(1024, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "the same in batch 256's layout (groups aligned to 64-row tiles)": (
            lambda l, bl, sc, s, b: gmm(
                l, Mxfp4(bl, sc), s, b, interpret=False, rows=64, glu=Glu(1.702, 7.0)
            ),
            (spec(1024 + 32 * 63, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "the same with one token's row for every row (broadcast)": (
            lambda l, bl, sc, s, b: grouped_product(
                l, Mxfp4(bl, sc), s, b, interpret=False, rows=16, glu=Glu(1.702, 7.0), broadcast=64
            ),
            (spec(1, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "the same with the SwiGLU on chip": (
            lambda l, bl, sc, s, b: gmm(
                l, Mxfp4(bl, sc), s, b, interpret=False, rows=16, glu=Glu(1.702, 7.0)
            ),
            (spec(64, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "the same with the contraction split among 4 programs per tile": (
            lambda l, bl, sc, s, b: grouped_product(
                l, Mxfp4(bl, sc), s, b, interpret=False, rows=16, launch=Tiles(16, 64, 256, 4, 3, splits=4)
            ),
            (spec(64, D), *packed(F, D), sizes, spec(E, F)),
            1,
        ),
        "mxfp4 gate_up forward with the scale rows padded (mxfp4.pad_scales)": (
            lambda l, bl, sc, s, b: gmm(l, Mxfp4(bl, sc), s, b, interpret=False, rows=16),
            (spec(64, D), packed(F, D)[0], spec(E, F, 96, dtype=jnp.uint8), sizes, spec(E, F)),
            1,
        ),
        "mxfp4 down d(lhs)": (
            lambda l, bl, sc, s, b: jax.grad(lambda l: gmm(l, Mxfp4(bl, sc), s, b, interpret=False).sum())(l),
            (spec(M, F // 2), *packed(D, F // 2), sizes, spec(E, D)),
            1,
        ),
    }
    for name, (fn, args, calls) in cases.items():
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == calls, name
        # Packed forward products decode with two bf16x2 multiplies per output word (2 nibbles x 2 words);
        # with padded scale rows also the folded way, one multiply, chosen by the rows' flag on chip.
        if "mxfp4" in name and "d(lhs)" not in name:
            want = 4 * (2 + 1) if "padded" in name else 4 * 2
            assert lowered.as_text().count("mul.rn.bf16x2") == want, name
    # A batch-1 down product (4 experts' tiles x 45 column tiles = 180 programs, under the launch's
    # fill_programs) splits its contraction in two: float32 halves out of the kernel.
    down = lambda l, bl, sc, s, b: gmm(l, Mxfp4(bl, sc), s, b, interpret=False, rows=16)
    lowered = jax.jit(down).trace(spec(64, F // 2), *packed(D, F // 2), sizes, spec(E, D))
    assert "tensor<2x64x2880xf32>" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_model_on_gmm_per_device_equals_dense_moe(experts):
    """The whole model with the grouped matmul inside the per-device MoE (on a 2-device mesh the model keeps
    each device on its rows: the kernel runs in shard_map) gives moe_dense's logits, float32, dense and
    packed experts."""
    from jax.sharding import AxisType

    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.model import ForwardOptions, forward, init_params

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    params = init_params(DEMO_CONFIG, jax.random.key(0), jnp.float32, experts=experts)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, DEMO_CONFIG.vocab_size)
    want = forward(params, tokens, None, DEMO_CONFIG, options=ForwardOptions(moe="dense"))[0]
    got = jax.jit(
        lambda p, t: forward(p, t, None, DEMO_CONFIG, options=ForwardOptions(moe="gmm", mesh=mesh))[0]
    )
    close(got(params, tokens), want)
