"""The Mosaic GPU decompressed-MLA decode kernel (flash_decode_mosaic): run by the Mosaic GPU interpreter on
the CPU, its per-slice (acc, m, l) equal a jnp walk that rounds where it does (keys once after RoPE, p
before its product with the latent), and merged by `flash_decode.combine` they equal float32 attention
within the bound those roundings allow; lowered for CUDA from the CPU at gpt-oss-20b's decode shape. Each
at `Launch.warps` 4 (one warpgroup a program) and 8 (two: one makes the keys, the other attends)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import flash_decode_mosaic
from gptoss_mla_jax.flash_decode import (
    NEG,
    Launch,
    _block_diagonal,
    _online_step,
    _visible,
    combine,
    grouped_key_up,
    kv_heads_per_program,
)

BF16_ULP = 2.0**-8  # bf16's relative spacing: one rounding is off by at most half of it
# The kernel compiled where a GPU is (`decode_gpu.sh OUT mosaic` runs this file there), else interpreted.
INTERPRET = jax.default_backend() != "gpu"


def inputs(G, R, d, r, slots, lengths, per_sequence=False, dtype=jnp.bfloat16, seed=0, bias=jnp.float32):
    """Scaled queries [B, G, R, d], latent cache, grouped key up-projection (its bias in `bias`, the model's
    parameters' dtype), the slots' cos / sin, lengths."""
    B, half = len(lengths), d // 2
    keys = iter(jax.random.split(jax.random.key(seed), 6))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q = normal(B, G, R, d) * d**-0.5
    c = normal(B, slots, r).astype(dtype)
    w_k, b_k = normal(r, G, d) * r**-0.5, (normal(G, d) * 0.3).astype(bias)
    key_up = grouped_key_up(w_k, b_k, kv_heads_per_program(G, R), dtype)
    angles = normal(B if per_sequence else 1, slots, half) * 3.0
    return q, c, key_up, (jnp.cos(angles), jnp.sin(angles)), jnp.asarray(lengths, jnp.int32)


def rebuilt(q, c, key_up, rotations, P):
    """Block-diagonal queries [B, Gp, PR, N] x 2 halves and the rotated keys [B, Gp, S, N] x 2, rounded
    to the cache dtype as the kernel rounds them."""
    (w_k, b_k), (cos, sin) = key_up, rotations
    half = q.shape[-1] // 2
    qs = [_block_diagonal(part.astype(c.dtype), P) for part in (q[..., :half], q[..., half:])]
    k = jnp.einsum("bsl,glc->bgsc", c, w_k, preferred_element_type=jnp.float32) + b_k[None, :, None]
    k1, k2 = jnp.split(k, 2, axis=-1)
    cos, sin = (jnp.tile(x, (1, 1, P))[:, None] for x in (cos, sin))
    keys = [(k1 * cos - k2 * sin).astype(c.dtype), (k2 * cos + k1 * sin).astype(c.dtype)]
    return qs, keys


def walked(q, c, key_up, rotations, lengths, window, sliding, launch):
    """The slices' (acc, m, l) by `flash_decode`'s own online step and masks, block by block in jnp (at
    `launch.warps` 8 as at 4: one warpgroup attends to every block, the other makes the keys)."""
    B, G, R, _ = q.shape
    S, r = c.shape[1:]
    P = kv_heads_per_program(G, R)
    (q1, q2), (k1, k2) = rebuilt(q, c, key_up, rotations, P)
    splits, block = launch.splits, launch.block
    split = S // splits
    f32 = jnp.float32
    step = jax.vmap(lambda carry, s, visible, v: _online_step(carry, s, visible, [v]), (0, 0, None, None))
    slices = []  # per (b, j): (acc [Gp, PR, r], m, l)
    for b in range(B):
        length = int(lengths[b])
        for j in range(splits):
            start = j * split
            blocks = int(np.clip(-(-(min(length, S) - start) // block), 0, split // block))
            m = jnp.full((G // P, P * R), NEG, f32)
            carry = ([jnp.zeros((G // P, P * R, r), f32)], m, jnp.zeros_like(m))
            for i in range(blocks):
                rows = slice(start + i * block, start + (i + 1) * block)
                s = sum(
                    jnp.einsum("gqn,gsn->gqs", qh[b], kh[b, :, rows], preferred_element_type=f32)
                    for qh, kh in ((q1, k1), (q2, k2))
                )
                visible = _visible(start, i, block, length - 1, S, sliding, window)
                carry = step(carry, s, visible, c[b, rows])
            (acc,), m, l = carry
            slices.append((acc, m, l))
    # [B, J, Gp, ...] -> [B, Gp, J, ...]
    stacked = (jnp.stack(x).reshape(B, splits, *x[0].shape) for x in zip(*slices, strict=True))
    return tuple(jnp.swapaxes(x, 1, 2) for x in stacked)


CASES = {
    # ragged, length 1 (its second slice sees no slot), a full cache; 70 is off the block edges
    "ragged": dict(G=2, R=8, d=64, r=64, slots=256, lengths=[1, 70, 256], launch=Launch(2, 64, INTERPRET)),
    # several slices of gpt-oss's latent width, per-sequence rotations, a bf16 key bias (as bf16 params)
    "splits": dict(G=2, R=8, d=64, r=192, slots=512, lengths=[130, 511], launch=Launch(4, 64, INTERPRET),
                   per_sequence=True, bias=jnp.bfloat16),
    # one kv head a program (N = 32 columns: a 64-byte swizzle), blocks of 128
    "one_head": dict(G=2, R=16, d=64, r=64, slots=256, lengths=[200, 5], launch=Launch(2, 128, INTERPRET)),
    # the ring buffer of a sliding layer, wrapped, with a window shorter than the cache
    "sliding": dict(G=2, R=8, d=64, r=64, slots=256, lengths=[50, 300, 1000], launch=Launch(2, 64, INTERPRET),
                    window=100, sliding=True),
    # slices of 3, 0, 4, 1 blocks: the latent's ring of 3 buffers and the keys' of 2 come round again
    "rings": dict(G=2, R=8, d=64, r=64, slots=512, lengths=[150, 300], launch=Launch(2, 64, INTERPRET)),
}  # fmt: skip


def close(got, want, tight, loose, rtol_tight=0.0, rtol_loose=0.0):
    """Every element within the `loose` bound (a rounding moved by one step), and all but 1% within the
    `tight` one (float32 sums in another order)."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol_loose, atol=loose)
    beyond = np.abs(got - want) > tight + rtol_tight * np.abs(want)
    assert beyond.mean() <= 0.01, f"{beyond.sum()} of {beyond.size} past {tight} (+ {rtol_tight} relative)"


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("name", list(CASES))
def test_slices_equal_the_jnp_walk(name, warps, warpgroups_compiled_once):
    """acc, m, l per slice, against a walk rounding at the same points: the products' float32 sums only
    differ in order (1e-5 relative bounds it), which may move a rounding of a key or of p by one bf16 step.
    One p's step moves acc by at most BF16_ULP x max|c| (p <= 1); one key's moves a score by |q_i| x
    ulp(k_i) (`key_step`, the largest over the case's queries and keys), so m by as much and l by as much
    relatively. Each element stays within those bounds, and all but 1% within the float32 one."""
    case = dict(CASES[name])
    launch, window, sliding = case.pop("launch"), case.pop("window", None), case.pop("sliding", False)
    launch = launch._replace(warps=warps)
    args = inputs(**case)
    got = flash_decode_mosaic.decompressed_splits(*args, window, sliding, launch)
    want = walked(*args, window, sliding, launch)
    scale = float(jnp.abs(args[1].astype(jnp.float32)).max())
    q, keys = rebuilt(*args[:4], kv_heads_per_program(*args[0].shape[1:3]))
    ulp = lambda k: 2.0 ** (jnp.floor(jnp.log2(jnp.abs(k.astype(jnp.float32)) + 1e-30)) - 7)  # bf16's step
    key_step = max(float(jnp.abs(x).max()) for x in q) * max(float(ulp(k).max()) for k in keys)
    close(got[0], want[0], 1e-5 * scale, BF16_ULP * scale)
    close(got[1], want[1], 1e-5, key_step)
    close(got[2], want[2], 1e-5, 1e-5, rtol_tight=1e-5, rtol_loose=np.expm1(key_step))
    empty = np.asarray(want[2] == 0)  # slices that saw no slot: m stays NEG, l and acc 0
    if name in ("ragged", "rings"):
        assert empty.any()
    np.testing.assert_array_equal(np.asarray(got[1])[empty], np.float32(NEG))
    np.testing.assert_array_equal(np.asarray(got[2])[empty], 0.0)
    np.testing.assert_array_equal(np.asarray(got[0])[empty], 0.0)


@pytest.mark.parametrize("warps", [4, 8])
def test_merged_slices_equal_float32_attention(warps, warpgroups_compiled_once):
    """`combine` over the kernel's slices, with sinks, against attention in float32 on the same bf16 cache
    (queries, keys and p unrounded), within a bound per head: rounding the queries and the keys to bf16
    (ulp/2 relatively each) moves a score by at most ulp x sum_i |q_i k_i| (`shift`: a head's largest over
    its visible slots), so each weight e^s / (sum e^s + e^sink) by a factor within e^(+-2 shift); rounding
    p adds ulp/2 to the weights of the latent's sum (l sums p unrounded); float32 sums in another order add
    1e-5 relatively. The bound is tight enough to see a block of 64 slots left out of a sequence."""
    G, R, d, r, slots, lengths = 4, 8, 64, 128, 256, [1, 100, 256]
    launch = Launch(2, 64, INTERPRET, warps=warps)
    q, c, key_up, (cos, sin), lengths_ = inputs(G, R, d, r, slots, lengths, seed=1)
    sinks = jax.random.normal(jax.random.key(2), (G * R,))
    acc, m, l = flash_decode_mosaic.decompressed_splits(q, c, key_up, (cos, sin), lengths_, launch=launch)
    latent, mass = (np.asarray(x) for x in combine(acc, m, l, sinks))

    P, half, f32 = kv_heads_per_program(G, R), d // 2, jnp.float32
    w_k, b_k = key_up
    k = jnp.einsum("bsl,glc->bgsc", c, w_k, preferred_element_type=f32) + b_k[None, :, None]
    k1, k2 = (x.reshape(*x.shape[:3], P, half) for x in jnp.split(k, 2, axis=-1))  # [B, Gp, S, P, half]
    cos, sin = cos[:, None, :, None], sin[:, None, :, None]
    keys = jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)  # [B, Gp, S, P, d]
    terms = jnp.einsum("bgprd,bgspd->bgprsd", q.reshape(q.shape[0], G // P, P, R, d), keys)
    s_sink = sinks.reshape(1, G // P, P, R)

    def reference(lengths):
        """(latent, mass, and their bounds) of float32 attention over each sequence's first `lengths`."""
        visible = (jnp.arange(slots)[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, None]
        scores = jnp.where(visible, terms.sum(-1), -jnp.inf)
        top = jnp.maximum(scores.max(-1), s_sink)
        weights = jnp.exp(scores - top[..., None])
        weights = weights / (weights.sum(-1) + jnp.exp(s_sink - top))[..., None]
        shift = jnp.where(visible, BF16_ULP * jnp.abs(terms).sum(-1), 0.0).max(-1)
        drift = jnp.expm1(2 * shift)
        reach = jnp.einsum("bgprs,bsl->bgprl", weights, jnp.abs(c.astype(f32)))  # sum_t w_t |c_t|
        want = jnp.einsum("bgprs,bsl->bgprl", weights, c.astype(f32))
        slack = 1e-5 * float(jnp.abs(want).max())
        shaped = lambda x, like: np.asarray(x).reshape(like.shape)
        latent_bound = (drift + BF16_ULP / 2)[..., None] * reach + slack
        mass_bound = drift * weights.sum(-1) + 1e-6
        return (
            shaped(want, latent), shaped(weights.sum(-1), mass), shaped(latent_bound, latent),
            shaped(mass_bound, mass),
        )  # fmt: skip

    want_latent, want_mass, latent_bound, mass_bound = reference(lengths)
    assert np.all(np.abs(latent - want_latent) <= latent_bound)
    assert np.all(np.abs(mass - want_mass) <= mass_bound)
    short = reference([1, 100, 192])  # the last sequence's last block left out: the bound sees it
    assert np.any(np.abs(latent - short[0]) > short[2])


def lowered_for_cuda(G, R, r, S, launch, bias=jnp.float32, window=None, sliding=False, B=2, d=64):
    """The kernel lowered for CUDA from the CPU, for B sequences of G kv heads of R query heads (head dim
    d) over a bf16 latent cache of S slots and width r, its key bias in `bias`."""
    P, f32, bf16, spec = kv_heads_per_program(G, R), jnp.float32, jnp.bfloat16, jax.ShapeDtypeStruct
    args = (
        spec((B, G, R, d), f32), spec((B, S, r), bf16),
        (spec((G // P, r, P * d), bf16), spec((G // P, P * d), bias)),
        (spec((1, S, d // 2), f32), spec((1, S, d // 2), f32)), spec((B,), jnp.int32),
    )  # fmt: skip
    traced = flash_decode_mosaic.decompressed_splits.trace(
        *args, window=window, sliding=sliding, launch=launch
    )
    return traced.lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize(("window", "sliding"), [(None, False), (128, True)])
def test_lowers_for_cuda_at_gpt_oss_20b_shape(window, sliding, warps):
    """gpt-oss-20b's decode step (8 kv heads of 8 query heads, head dim 64, latent 192) over 4096 slots of
    a bf16 cache in 16 slices, batch 2: the kernel lowers for CUDA from the CPU, one warpgroup a program or
    two, within the 227 KB of shared memory a block that Mosaic GPU checks its count against when it lowers
    (no device to ask here); the key bias float32, or bf16 (as the model's bf16 parameters give it)."""
    bias = jnp.bfloat16 if sliding else jnp.float32
    launch = Launch(16, 64, interpret=False, warps=warps)
    text = lowered_for_cuda(8, 8, 192, 4096, launch, bias, window, sliding).as_text()
    assert "mosaic_gpu" in text


def test_rejects_what_it_cannot_run():
    """A float32 cache (its wgmma would be tf32, whose B operand must be K-major), blocks shorter than a
    wgmma's 64 rows, warps other than one or two warpgroups', rotary halves of less than a 32-byte swizzle
    and programs past an SM's shared memory are refused with what to change, and `runs` says so beforehand
    (the model's decode then keeps Triton)."""
    args = inputs(2, 8, 64, 64, 128, [5])
    f32_args = (args[0], args[1].astype(jnp.float32), *args[2:])
    with pytest.raises(ValueError, match=r"16-bit cache.*float32"):
        flash_decode_mosaic.decompressed_splits(*f32_args, launch=Launch(2, 64, INTERPRET))
    with pytest.raises(ValueError, match="block 32"):
        flash_decode_mosaic.decompressed_splits(*args, launch=Launch(2, 32, INTERPRET))
    with pytest.raises(ValueError, match="warps 6"):
        flash_decode_mosaic.decompressed_splits(*args, launch=Launch(2, 64, INTERPRET, warps=6))
    runs = lambda launch, dtype=jnp.bfloat16: flash_decode_mosaic.runs((1, 8, 8, 64), dtype, 192, launch)
    assert runs(Launch(2, 64)) and runs(Launch(2, 64, warps=8))
    assert not runs(Launch(2, 64, warps=12)) and not runs(Launch(2, 64, warps=6))
    assert not runs(Launch(2, 32)) and not runs(Launch(2, 64), jnp.float32)
    assert not runs(Launch(2, 128)) and not runs(Launch(2, 128, warps=8))  # past an SM's shared memory
    assert not flash_decode_mosaic.runs((1, 8, 8, 16), jnp.bfloat16, 192, Launch(2, 64))  # rows of 16 bytes
    with pytest.raises(ValueError, match="head dim 16, latent width 64: rows of"):
        flash_decode_mosaic.decompressed_splits(
            *inputs(2, 8, 16, 64, 128, [5]), launch=Launch(2, 64, INTERPRET)
        )
    gpt_oss = inputs(8, 8, 64, 192, 256, [5])
    with pytest.raises(ValueError, match="block 128, warps 4, 2 kv heads a program: 265,256 bytes"):
        flash_decode_mosaic.decompressed_splits(*gpt_oss, launch=Launch(2, 128, INTERPRET))


@pytest.mark.parametrize(
    ("G", "R", "r", "block", "warps"),
    [(8, 8, 192, 64, 4), (8, 8, 192, 64, 8), (8, 8, 192, 128, 4), (2, 16, 64, 128, 4), (2, 8, 64, 64, 8),
     (4, 8, 128, 64, 4)],
)  # fmt: skip
def test_shared_memory_count_is_mosaic_gpus(G, R, r, block, warps, monkeypatch):
    """`smem_bytes`, which `runs` holds against a program's shared memory, equals what Mosaic GPU counts
    when it lowers the kernel (read off its refusal under a limit of 0 bytes)."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    P = kv_heads_per_program(G, R)
    half = 64 // 2  # `lowered_for_cuda`'s head dim, halved
    count = flash_decode_mosaic.smem_bytes(r, half, P, R, block, flash_decode_mosaic.CONSUMERS[warps])
    monkeypatch.setattr(flash_decode_mosaic, "SMEM_BYTES", 1 << 30)  # past the wrapper's own check
    with (
        mosaic_core.artificial_shared_memory_limit(0),
        pytest.raises(Exception, match=f"smem_bytes={count} "),
    ):
        lowered_for_cuda(G, R, r, 512, Launch(2, block, warps=warps))


def test_model_decode_takes_it_where_it_runs(monkeypatch, warpgroups_compiled_once):
    """`flash_decode.DECOMPRESSED_KERNEL = "mosaic"` (or "mosaic2": two warpgroups): a decompressed layer's
    decode (`mla_decompressed_decode`, what the model calls) runs on this kernel for a 16-bit cache in
    64-slot blocks, and gives the Triton kernel's output (both interpreted, the same rounding points:
    within two bf16 steps of the largest); a float32 cache or shorter blocks keep the Triton kernel."""
    from gptoss_mla_jax import flash_decode

    G, R, d, r, S = 2, 8, 64, 64, 256
    keys = iter(jax.random.split(jax.random.key(3), 6))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q, c = normal(2, G * R, d).astype(jnp.bfloat16), normal(2, S, r).astype(jnp.bfloat16)
    kv_b = {"kernel": normal(r, 2 * G * d) * r**-0.5, "bias": normal(2 * G * d) * 0.3}
    angles = normal(1, S, d // 2) * 3.0
    slots = flash_decode.Slots(jnp.array([70, 256], jnp.int32))
    sinks, launch = normal(G * R), Launch(2, 64, INTERPRET)
    decode = lambda launch, c=c: flash_decode.mla_decompressed_decode(
        q, kv_b, c, slots, sinks, (jnp.cos(angles), jnp.sin(angles)), launch
    )
    triton = np.asarray(decode(launch), np.float32)
    calls = []  # the warps of each launch the Mosaic GPU kernel ran at
    real = flash_decode_mosaic.decompressed_splits
    spy = lambda *a: calls.append(a[-1].warps) or real(*a)
    monkeypatch.setattr(flash_decode_mosaic, "decompressed_splits", spy)
    for kernel, warps in (("mosaic", 4), ("mosaic2", 8)):  # 1, 2 warpgroups a program
        monkeypatch.setattr(flash_decode, "DECOMPRESSED_KERNEL", kernel)
        mosaic = np.asarray(decode(launch), np.float32)
        assert calls[-1] == warps
        np.testing.assert_allclose(mosaic, triton, rtol=0, atol=2 * BF16_ULP * np.abs(triton).max())
    decode(Launch(2, 32, INTERPRET))
    decode(launch, c.astype(jnp.float32))
    assert calls == [4, 8]  # neither ran here
