"""The Pallas flash-decoding kernels (interpret mode, CPU) equal the jnp attention they replace, float32:
GQA with sinks and sliding windows (attention.attend), absorbed partial-mode MLA (mla._absorbed), and
decompressed MLA with keys rebuilt on chip (attend over mla.keys_values)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import cache as kv_cache
from gptoss_mla_jax import flash_decode
from gptoss_mla_jax.attention import attend, decode_plan
from gptoss_mla_jax.config import GPT_OSS_20B, MlaConfig
from gptoss_mla_jax.flash_decode import (
    FILL_PROGRAMS,
    MIN_ROWS,
    MLA_FILL_PROGRAMS,
    PIPELINE_SHARED_BYTES,
    PIPELINE_STAGES,
    Launch,
    Slots,
    absorbed_split,
    combine,
    fill_programs,
    gqa_decode,
    kv_heads_per_program,
    mla_absorbed_decode,
    mla_decompressed_decode,
    pipeline_stages,
    plan,
    plan_for,
    pow2_columns,
    programs_per_slice,
)
from gptoss_mla_jax.generation import DEMO_CONFIG
from gptoss_mla_jax.mla import _absorbed, keys_values, slot_rotations


def reference(q_rope, q_nope, up, entries, lengths, sinks, window, sliding):
    slots = entries["c"].shape[1]
    pos, ok = kv_cache.cached_positions(lengths, slots, sliding)
    q_pos = (lengths - 1)[:, None]
    return _absorbed(q_rope[:, None], q_nope[:, None], up, [(entries, pos, ok)], q_pos, sinks, window)[:, 0]


@pytest.mark.parametrize(
    "G, R, r, slots, splits, block, sliding, lengths",
    [
        (2, 4, 24, 256, 4, 16, False, [1, 37, 256, 100]),  # ragged, length 1, a full cache
        (8, 2, 40, 128, 2, 32, False, [5, 64, 65, 127]),  # lengths on and off block edges
        (4, 2, 16, 64, 2, 16, True, [1, 50, 64, 200]),  # ring buffer of a sliding layer, wrapped
    ],
)
def test_mla_kernel_equals_jnp_absorbed(G, R, r, slots, splits, block, sliding, lengths):
    B, n2, n, d = len(lengths), 4, 12, 16
    keys = iter(jax.random.split(jax.random.key(0), 12))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q_rope, q_nope = normal(B, G, R, n2), normal(B, G, R, n)
    w_k, b_k, w_v, b_v = normal(r, G, n) * 0.3, normal(G, n), normal(r, G, d), normal(G, d)
    entries = {"c": normal(B, slots, r), "k_rope": normal(B, slots, G, n2)}
    sinks = normal(G * R)
    lengths = jnp.asarray(lengths, jnp.int32)
    window = slots if sliding else None
    args = (q_rope, q_nope, (w_k, b_k, w_v, b_v), entries, Slots(lengths, window, sliding), sinks)
    want = reference(q_rope, q_nope, (w_k, b_k, w_v, b_v), entries, lengths, sinks, window, sliding)
    launch = Launch(splits, block, interpret=True)
    got = mla_absorbed_decode(*args, launch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The heads split over two programs per slice, each reading the latent block.
    halves = mla_absorbed_decode(*args, launch._replace(head_block=G * R // 2))
    np.testing.assert_allclose(halves, want, rtol=1e-5, atol=1e-5)

    # Blocks of slots past a sequence's length are never read: NaN there (which any product would
    # spread) changes nothing.
    first_unread = -(-lengths // block) * block
    past = jnp.arange(slots)[None, :, None] >= first_unread[:, None, None]
    junk = {
        "c": jnp.where(past, jnp.nan, entries["c"]),
        "k_rope": jnp.where(past[..., None], jnp.nan, entries["k_rope"]),
    }
    again = mla_absorbed_decode(*args[:3], junk, *args[4:], launch)
    np.testing.assert_array_equal(again, got)


CASES = [
    # kv heads, queries per kv head, slots, splits, block, sliding, lengths
    (2, 4, 256, 4, 16, False, [1, 37, 256, 100]),  # ragged, length 1, a full cache
    (8, 2, 128, 2, 32, False, [5, 64, 65, 127]),  # lengths on and off block edges
    (4, 2, 64, 2, 16, True, [1, 50, 64, 200]),  # ring buffer of a sliding layer, wrapped
    (1, 20, 64, 2, 16, False, [3, 64]),  # 20 query heads per kv head: padded to 32, a power of two
]


@pytest.mark.parametrize("G, R, slots, splits, block, sliding, lengths", CASES)
def test_gqa_kernel_equals_jnp_attend(G, R, slots, splits, block, sliding, lengths):
    window = slots if sliding else None
    args, want = gqa_case(1, G, R, 16, slots, lengths, window, sliding)
    got = gqa_decode(*slotted(args, window, sliding), Launch(splits, block, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def slotted(args, window, sliding: bool):
    """gqa_case's (q, k, v, lengths, sinks) as gqa_decode takes them."""
    q, k, v, lengths, sinks = args
    return q, k, v, Slots(lengths, window, sliding), sinks


def gqa_case(seed: int, G: int, R: int, d: int, slots: int, lengths: list[int], window, sliding: bool):
    """Random float32 (q, k, v, lengths, sinks) for gqa_decode and the jnp path's answer for them."""
    B = len(lengths)
    keys = iter(jax.random.split(jax.random.key(seed), 4))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q, k, v, sinks = normal(B, G * R, d), normal(B, slots, G, d), normal(B, slots, G, d), normal(G * R)
    lengths = jnp.asarray(lengths, jnp.int32)
    pos, ok = kv_cache.cached_positions(lengths, slots, sliding)
    want = attend(q[:, None], [(k, v, pos, ok)], (lengths - 1)[:, None], sinks, window)[:, 0]
    return (q, k, v, lengths, sinks), want


@pytest.mark.parametrize("G, R, slots, splits, block, sliding, lengths", CASES)
def test_decompressed_kernel_equals_jnp(G, R, slots, splits, block, sliding, lengths):
    """YaRN RoPE on keys rebuilt from the latent at their own positions, ring buffer included; each
    program serves as many kv heads as fill 16 query rows (2 of 4 heads each, all 8 of 2 heads each, 1
    of 20 heads)."""
    got, want = decompressed_case(G, R, slots, lengths, sliding, Launch(splits, block, True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_block", [2, 4])
def test_decompressed_kernel_kv_heads_per_program(head_block):
    """One and two kv heads per program (2 query heads each) give the same attention."""
    launch = Launch(2, 16, True, head_block=head_block)
    got, want = decompressed_case(4, 2, 64, [1, 33, 64], False, launch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert kv_heads_per_program(4, 2, head_block) == head_block // 2
    assert kv_heads_per_program(8, 8) == 2 and kv_heads_per_program(1, 20) == 1
    with pytest.raises(ValueError, match="head_block 6: not a power-of-two number of whole kv heads"):
        kv_heads_per_program(4, 2, 6)


def test_programs_per_slice_at_gpt_oss_20b_heads():
    """Per cache slice, 8 kv heads of 8 query heads at batch 2: GQA a program per kv head, decompressed MLA
    per two kv heads (16 query rows fill a tensor-core tile), absorbed MLA per sequence, or per block of
    16 query heads."""
    assert programs_per_slice("gqa", 2, 8, 8) == 16
    assert programs_per_slice("decompressed", 2, 8, 8) == 8
    assert programs_per_slice("absorbed", 2, 8, 8) == 2
    assert programs_per_slice("absorbed", 2, 8, 8, head_block=16) == 8


def decompressed_case(G: int, R: int, slots: int, lengths: list[int], sliding: bool, launch: Launch):
    """mla_decompressed_decode on random float32 inputs, and attend over mla.keys_values' answer."""
    d, r = 32, 40
    config = dataclasses.replace(
        DEMO_CONFIG, num_attention_heads=G * R, num_key_value_heads=G, head_dim=d,
        max_position_embeddings=4096, mla=MlaConfig("decompressed", (1,), (r,)),
    )  # fmt: skip
    B = len(lengths)
    keys = iter(jax.random.split(jax.random.key(3), 6))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    kv_b = {"kernel": normal(r, 2 * G * d) * 0.3, "bias": normal(2 * G * d)}
    c, q, sinks = normal(B, slots, r), normal(B, G * R, d), normal(G * R)
    lengths = jnp.asarray(lengths, jnp.int32)
    window = slots if sliding else None
    pos, ok = kv_cache.cached_positions(lengths, slots, sliding)
    k, v = keys_values({"kv_b": kv_b}, {"c": c}, pos, config, 1)
    want = attend(q[:, None], [(k, v, pos, ok)], (lengths - 1)[:, None], sinks, window)[:, 0]
    rope = slot_rotations(lengths, slots, sliding, config)
    got = mla_decompressed_decode(q, kv_b, c, Slots(lengths, window, sliding), sinks, rope, launch)
    return got, want


def test_gqa_window_shorter_than_the_cache():
    """A full-size cache read with a sliding window: only the last `window` positions count."""
    args, want = gqa_case(2, G=2, R=2, d=16, slots=128, lengths=[30, 100], window=40, sliding=False)
    got = gqa_decode(*slotted(args, 40, False), Launch(2, 16, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_without_the_triton_backend(monkeypatch):
    """A JAX without Pallas' Triton backend (deprecated in JAX 0.11): the kernels still run interpreted,
    asking for them on the GPU says what is missing and what to do, and `generate` defaults to jnp there."""
    from gptoss_mla_jax import flash_decode
    from gptoss_mla_jax.generation import kernels_by_default

    monkeypatch.setattr(flash_decode, "pl_triton", None)
    # shapes of no other test, so that gqa_decode traces afresh without the backend
    args, want = gqa_case(4, G=1, R=3, d=8, slots=32, lengths=[1, 20], window=None, sliding=False)
    got = gqa_decode(*slotted(args, None, False), Launch(2, 16, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        RuntimeError, match=r"pallas\.triton, which JAX .* no longer has.*\(decode_kernels=False"
    ):
        gqa_decode(*slotted(args, None, False), Launch(2, 16, interpret=False))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not kernels_by_default(jnp.bfloat16)


def test_pow2_columns():
    assert [(c.start, c.size) for c in pow2_columns(192)] == [(0, 128), (128, 64)]
    assert [(c.start, c.size) for c in pow2_columns(64)] == [(0, 64)]
    assert sum(c.size for c in pow2_columns(200)) == 200


def test_plan_fills_the_grid_within_its_bound():
    """Slices double until the grid has FILL_PROGRAMS programs, the slots run out of blocks, or the bound."""
    assert plan(32768, 1) == (512, 64)  # 512 blocks of 64 slots, one block a slice
    assert plan(32768, 8, 128) == (64, 128)  # 8 x 64 programs: past FILL_PROGRAMS
    assert plan(32768, 1, most_splits=64) == (64, 64)
    assert plan(32768, 1, most_splits=100) == (64, 64)  # powers of two only
    assert plan(4096, 64) == (8, 64) and plan(4096, 512) == (1, 64)
    assert plan(96, 1) == (1, 32)  # blocks shrink to divide the slots; 3 blocks do not halve
    assert plan(40, 1) is None  # not a multiple of 16


def test_mla_kernels_split_until_the_sms():
    """GQA's grid is split until it has twice the SMs' programs, the MLA kernels' until the SMs'
    (`fill_programs`, `plan_for`): at 1 x 32K absorbed MLA (one program a sequence) takes 256 slices, not
    512; at 64 x 32K decompressed MLA (4 programs a sequence, two kv heads each) one slice, where GQA's 256
    programs would take two."""
    assert fill_programs("gqa") == FILL_PROGRAMS == 2 * MLA_FILL_PROGRAMS
    assert fill_programs("absorbed") == fill_programs("decompressed") == MLA_FILL_PROGRAMS
    assert plan_for("absorbed", 32768, 1) == (256, 64) and plan(32768, 1) == (512, 64)
    assert plan_for("decompressed", 32768, 256) == (1, 64)
    assert plan_for("gqa", 32768, 256) == (2, 64)


def test_decode_plan_launches_each_kind_with_its_pipeline_stages(monkeypatch):
    """The model's steps launch each kernel kind with `PIPELINE_STAGES`' stages (absorbed MLA three, the
    others two), read when a step is traced, but no deeper than the blocks a slice walks nor than the
    pipeline's shared memory holds (two where it asks for more): at 1 x 32K absorbed MLA's 256 slices walk
    two blocks each. No plan off the kernels."""
    cache = lambda slots: {"c": jax.ShapeDtypeStruct((1, slots, 4), jnp.bfloat16)}
    stages = lambda kind, programs=8, slots=32768: decode_plan(True, cache(slots), "c", kind, programs).stages
    assert PIPELINE_STAGES == {"gqa": 2, "decompressed": 2, "absorbed": 3}
    assert [stages(kind) for kind in ("gqa", "decompressed", "absorbed")] == [2, 2, 3]  # 16 blocks a slice
    assert decode_plan(True, cache(32768), "c", "absorbed", 1)[:2] == (256, 64)
    assert stages("absorbed", 1) == 2 and stages("absorbed", 1, 131072) == 3  # 2 and 8 blocks a slice
    assert stages("absorbed", 1, 4096) == 2  # one block a slice
    # a latent whose 64-slot blocks fill the pipeline's shared memory two at a time keeps two stages
    assert pipeline_stages("absorbed", 32768, 32, 64, slot_bytes=384) == 3  # gpt-oss's, 24 KB a block
    assert pipeline_stages("absorbed", 32768, 32, 64, slot_bytes=2 * 384) == 3  # float32
    wide = PIPELINE_SHARED_BYTES // (64 * 3) + 1  # three blocks would not fit
    assert pipeline_stages("absorbed", 32768, 32, 64, slot_bytes=wide) == 2
    wide_cache = {"c": jax.ShapeDtypeStruct((1, 32768, wide // 2), jnp.bfloat16)}
    assert decode_plan(True, wide_cache, "c", "absorbed", 8).stages == 2
    monkeypatch.setattr(flash_decode, "PIPELINE_STAGES", PIPELINE_STAGES | {"absorbed": 4})
    assert stages("absorbed") == 4 and stages("absorbed", 1, 131072) == 4
    monkeypatch.setattr(flash_decode, "PIPELINE_STAGES", PIPELINE_STAGES | {"absorbed": 1})
    assert stages("absorbed") == 1  # asked for no pipelining: none
    assert decode_plan(False, cache(32768), "c", "absorbed", 8) is None


@pytest.mark.parametrize("share", [1.0, 0.25, 1e-9])
@pytest.mark.parametrize(("batch", "slots"), [(1, 4096), (1, 32768), (8, 32768), (64, 131072)])
def test_absorbed_split_keeps_the_slices_state_within_its_share(batch, slots, share):
    """gpt-oss-20b's absorbed layer (64 heads, latent 160 plus 32 RoPE values a slot, bf16): the most
    slices whose float32 sums stay within `share` of the cache (one more would not), and the heads split
    (down to MIN_ROWS a program) only while the grid is short of MLA_FILL_PROGRAMS."""
    heads, latent, slot_bytes = 64, 160, 192 * 2
    head_block, most = absorbed_split(batch, slots, heads, slot_bytes, latent, share)
    state, cache = heads * (latent + 2) * 4, slots * slot_bytes
    assert most == 1 or most * state <= share * cache < 2 * most * state
    rows = head_block or heads
    assert MIN_ROWS <= rows <= heads and heads % rows == 0
    programs = batch * heads // rows * most
    assert rows == MIN_ROWS or programs >= MLA_FILL_PROGRAMS
    assert head_block is None or programs // 2 < MLA_FILL_PROGRAMS  # split no further than the grid needs
    assert absorbed_split(batch, slots, heads, slot_bytes, latent, None) == (None, None)


@pytest.mark.parametrize("heads", [36, 48, 50, 96])
def test_absorbed_split_keeps_head_blocks_whole_and_tall(heads):
    """Heads other than gpt-oss's 64: blocks that divide the heads and keep MIN_ROWS rows (36 -> 18,
    50 -> 25), however short the grid."""
    head_block, _ = absorbed_split(1, 32768, heads, 384, 160, 1e-9)
    rows = head_block or heads
    assert heads % rows == 0 and rows >= MIN_ROWS and rows < heads


def test_combine_counts_the_sink_once():
    """Two slices, each with one token of score 0, and a sink of 0: three equal weights."""
    acc = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 1, 2)  # [B, G, J, Hq, dv]
    m, l = jnp.zeros((1, 1, 2, 1)), jnp.ones((1, 1, 2, 1))
    out, mass = combine(acc, m, l, jnp.zeros(1))
    np.testing.assert_allclose(out.reshape(2), [1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(mass.reshape(()), 2 / 3, rtol=1e-6)
    # A slice that saw no token (m at the mask value) weighs nothing.
    out, mass = combine(acc, jnp.array([0.0, -1e30]).reshape(1, 1, 2, 1), l, jnp.zeros(1))
    np.testing.assert_allclose(out.reshape(2), [0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(mass.reshape(()), 0.5, rtol=1e-6)


def test_bad_split_is_refused():
    one_head = lambda slots, **plan: mla_absorbed_decode(
        jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)),
        (jnp.zeros((4, 1, 2)), jnp.zeros((1, 2)), jnp.zeros((4, 1, 2)), jnp.zeros((1, 2))),
        {"c": jnp.zeros((1, slots, 4)), "k_rope": jnp.zeros((1, slots, 1, 2))},
        Slots(jnp.ones(1, jnp.int32)), jnp.zeros(1), Launch(block=64, interpret=True, **plan),
    )  # fmt: skip
    with pytest.raises(ValueError, match="not a multiple of splits x block"):
        one_head(100, splits=8)
    with pytest.raises(ValueError, match="head_block 3 does not divide the 1 query heads"):
        one_head(128, splits=2, head_block=3)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("kind", ["gqa", "absorbed", "decompressed", "decompressed_triton"])
def test_kernels_lower_for_the_gpu(kind, sliding, monkeypatch):
    """Each kernel, at gpt-oss-20b's head shapes in bf16, lowers for CUDA from this CPU-only machine: every
    op in it has a Pallas-GPU lowering (compiling the IR needs the GPU itself). GQA and absorbed MLA lower
    to Triton, decompressed MLA to its default kernel in Mosaic GPU (`flash_decode.DECOMPRESSED_KERNEL`) and,
    chosen by name, to its Triton kernel (the one a call keeps where Mosaic GPU does not run it)."""
    B, G, R, d, S, r, n2 = 2, 8, 8, 64, 256, 160, 4
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    lengths, sinks = spec(B, dtype=jnp.int32), spec(G * R, dtype=jnp.float32)
    window = 128 if sliding else None
    if kind == "gqa":
        fn = lambda q, k, v, lengths, sinks: gqa_decode(
            q, k, v, Slots(lengths, window, sliding), sinks, Launch(2, 64, stages=PIPELINE_STAGES["gqa"])
        )
        args = (spec(B, G * R, d), spec(B, S, G, d), spec(B, S, G, d))
    elif kind == "absorbed":
        fn = lambda q_rope, q_nope, w_k, b_k, w_v, b_v, c, k_rope, lengths, sinks: mla_absorbed_decode(
            q_rope, q_nope, (w_k, b_k, w_v, b_v), {"c": c, "k_rope": k_rope}, Slots(lengths, window, sliding),
            sinks, Launch(2, 64, stages=PIPELINE_STAGES["absorbed"]),
        )  # fmt: skip
        args = (spec(B, G, R, n2), spec(B, G, R, d - n2), spec(r, G, d - n2), spec(G, d - n2))
        args += (spec(r, G, d), spec(G, d), spec(B, S, r), spec(B, S, G, n2))
    else:
        if kind == "decompressed_triton":
            monkeypatch.setattr(flash_decode, "DECOMPRESSED_KERNEL", "triton")
        config = dataclasses.replace(
            GPT_OSS_20B, mla=MlaConfig("decompressed", (1,), (r + G * n2,))
        )  # the 20b's rope
        fn = lambda q, kernel, bias, c, lengths, sinks: mla_decompressed_decode(
            q, {"kernel": kernel, "bias": bias}, c, Slots(lengths, window, sliding), sinks,
            slot_rotations(lengths, S, sliding, config), Launch(2, 64),
        )  # fmt: skip
        args = (spec(B, G * R, d), spec(r + G * n2, 2 * G * d), spec(2 * G * d), spec(B, S, r + G * n2))
    text = jax.jit(fn).trace(*args, lengths, sinks).lower(lowering_platforms=("cuda",)).as_text()
    mosaic = kind == "decompressed"
    assert (text.count("xla.gpu.triton"), text.count("mosaic_gpu_v2")) == ((0, 1) if mosaic else (1, 0))
    if kind in ("gqa", "absorbed"):  # these Triton kernels carry their launch's pipeline depth
        assert f"num_stages = {PIPELINE_STAGES[kind]} : i32" in text
