"""The batch-1 q / k / v finishing kernel (interpreted here) against the jnp path it replaces (bias, RoPE,
the query's scale and padding, the cache write), its CUDA lowering at gpt-oss-20b's attention shape, and
decode steps running their GQA layers through it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import attention
from gptoss_mla_jax.cache import slot_index, write
from gptoss_mla_jax.flash_decode import _pad_heads
from gptoss_mla_jax.qkv_finish import finish_qkv
from gptoss_mla_jax.rope import apply_rope


def case(S: int, G: int, R: int, d: int, slots: int, dtype, seed: int = 0):
    """Partial sums of one token's q / k / v products, their biases, a RoPE table and bf16-or-not caches."""
    keys = jax.random.split(jax.random.key(seed), 9)
    widths = (G * R * d, G * d, G * d)
    sums = tuple(jax.random.normal(k, (S, n), jnp.float32) for k, n in zip(keys[:3], widths, strict=True))
    biases = tuple(jax.random.normal(k, (n,), dtype) for k, n in zip(keys[3:6], widths, strict=True))
    angle = jax.random.uniform(keys[6], (d // 2,), jnp.float32, 0, 6.3)
    caches = tuple(jax.random.normal(k, (1, slots, G, d), dtype) for k in keys[7:9])
    return sums, biases, jnp.cos(angle) * 1.1, jnp.sin(angle) * 1.1, caches


def reference(sums, biases, cos, sin, slot, caches, R: int):
    """The jnp path: each product's sums rounded and its bias added (`attention.linears`), RoPE
    (`rope.apply_rope`), the query scaled and padded as `flash_decode.gqa_decode` feeds its kernel, the key
    and value written by `cache.write`."""
    k_cache, v_cache = caches
    G, d = k_cache.shape[2:]
    dtype = biases[0].dtype
    q, k, v = (
        (s.sum(axis=0).astype(dtype) + b).reshape(1, 1, -1, d) for s, b in zip(sums, biases, strict=True)
    )
    q, k = (apply_rope(a, cos[None, None], sin[None, None]) for a in (q, k))
    tile = _pad_heads((q[:, 0].astype(jnp.float32) * d**-0.5).reshape(1, G, R, d).astype(k_cache.dtype))
    slots = k_cache.shape[1]
    position, valid = jnp.full((1, 1), slot), jnp.full((1, 1), slot < slots)
    index = lambda: slot_index(position, valid, jnp.full((1,), slot + 1), slots, False)
    assert int(index()[0, 0]) == slot
    return tile, *(
        write(c, a, position, valid, jnp.full((1,), slot + 1), False) for c, a in ((k_cache, k), (v_cache, v))
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "S, G, R, d, slot",
    [
        (12, 8, 8, 64, 37),  # gpt-oss-20b's heads, a few slices
        (3, 2, 4, 32, 0),  # the demo model's heads: query rows padded from 4 to 16
        (1, 2, 3, 8, 63),  # three query heads a kv head (a tile of 16), the last slot, one slice
        (5, 2, 4, 16, 64),  # a dropped token (slot = slots): the caches unchanged
    ],
)
def test_equals_the_jnp_path(dtype, S, G, R, d, slot):
    """The query tile and both caches: float32 to 1e-6, bfloat16 bit for bit (every rounding where the jnp
    path rounds)."""
    sums, biases, cos, sin, caches = case(S, G, R, d, 64, dtype)
    got = finish_qkv(sums, biases, cos, sin, jnp.full((1,), slot), *caches, dtype, interpret=True)
    want = reference(sums, biases, cos, sin, slot, caches, R)
    for name, g, w in zip(("query tile", "k cache", "v cache"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if dtype == jnp.float32:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)
    if slot == 64:
        for g, c in zip(got[1:], caches, strict=True):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(c, np.float32))


def test_lowers_for_the_gpu_with_the_caches_in_place():
    """gpt-oss-20b's attention shape (64 query heads over 8 kv heads of 64, 23 slices, a 4K cache), bf16,
    lowers to one Triton kernel for CUDA from this CPU-only machine, its caches aliased to its outputs."""
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    f32 = jnp.float32
    sums = (spec(23, 4096, dtype=f32), spec(23, 512, dtype=f32), spec(23, 512, dtype=f32))
    biases = (spec(4096), spec(512), spec(512))
    cache = spec(1, 4096, 8, 64)
    fn = lambda sums, biases, cos, sin, slot, k, v: finish_qkv(sums, biases, cos, sin, slot, k, v, k.dtype)
    args = (sums, biases, spec(32, dtype=f32), spec(32, dtype=f32), spec(1, dtype=jnp.int32), cache, cache)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "output_operand_aliases" in text


@pytest.mark.parametrize("kind", ["gqa", "decompressed"])
def test_decode_step_at_batch_one_finishes_on_the_kernel(monkeypatch, kind):
    """A batch-1 decode step on the kernels (float32, random biases) finishes every GQA layer's q / k / v on
    the kernel (a converted model's sliding layers too), gives the jnp step's logits and the same
    cache, for each `attention.ONE_TOKEN` setting; "matvec" and "off" do not use it."""
    from gptoss_mla_jax import model
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.mla import with_up_projections
    from tests.test_matvec import _mla, with_random_biases

    config = DEMO_CONFIG if kind == "gqa" else _mla(DEMO_CONFIG, kind)
    calls = []
    real = attention.finish_qkv
    monkeypatch.setattr(attention, "finish_qkv", lambda *a: calls.append(1) or real(*a))
    params = with_random_biases(model.init_params(config, jax.random.key(0), jnp.float32, experts="mxfp4"))
    if kind != "gqa":
        params = with_up_projections(params, config)
    tokens = jax.random.randint(jax.random.key(1), (1, 21), 0, config.vocab_size)
    prefill = model.forward_jit(params, tokens[:, :20], init_cache(config, 1, 32, jnp.float32), config)

    def step(kernels: bool, setting: str):
        monkeypatch.setattr(attention, "ONE_TOKEN", setting)

        @functools.partial(jax.jit, static_argnames="kernels")
        def run(params, tokens, cache, kernels):  # traced here: the spy sees each call
            options = model.ForwardOptions(decode_kernels=kernels)
            return model.forward(params, tokens, cache, config, options=options)

        return run(params, tokens[:, 20:], prefill.cache, kernels)

    want = step(False, "finish")
    gqa_layers = config.num_hidden_layers - (len(config.mla.layers) if config.mla else 0)
    for setting in ("finish", "matvec", "off"):
        calls.clear()
        got = step(True, setting)
        assert len(calls) == (gqa_layers if setting == "finish" else 0), setting
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5 * float(jnp.abs(want.logits).max()))
        for g, w in zip(jax.tree.leaves(got.cache), jax.tree.leaves(want.cache), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
