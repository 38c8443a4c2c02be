"""The Pallas flash-attention kernel (interpret mode, CPU) equals the jnp attention it replaces, float32:
output and the gradients of q, k, v and the sinks, with grouped heads, sliding windows, right padding and
lengths off block edges, keys wider than the values (rorope MLA); the whole model (GQA and both MLA modes,
per device under a mesh) gives the jnp path's logits and gradients; the kernels lower for CUDA at
gpt-oss-20b's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from gptoss_mla_jax import flash_attention as fa
from gptoss_mla_jax.attention import attend
from gptoss_mla_jax.execution import ForwardOptions
from gptoss_mla_jax.model import forward
from weights.safetensors_io import load_hf
from weights.to_mla import convert


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 and 32 rows, different per kernel, so that short sequences span several blocks and
    the causal and window block ranges are exercised."""
    monkeypatch.setitem(fa.LAUNCH, "forward", fa.Blocks(queries=32, keys=16))
    monkeypatch.setitem(fa.LAUNCH, "dkdv", fa.Blocks(queries=16, keys=32))
    monkeypatch.setitem(fa.LAUNCH, "dq", fa.Blocks(queries=16, keys=16))


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "T, H, G, d, dv, window, lengths",
    [
        (70, 4, 2, 16, 16, None, [70, 45]),  # right padding, T off the block edges
        (64, 4, 1, 8, 8, 5, [64, 0]),  # a window shorter than a block; a row with no real token
        (50, 2, 2, 24, 24, 20, [33, 50]),  # head dim not a power of two; a window across block edges
        (40, 4, 2, 32, 16, 12, [40, 29]),  # keys twice as wide as the values (rorope MLA)
    ],
)
def test_kernel_equals_jnp_attention_and_its_gradients(small_blocks, T, H, G, d, dv, window, lengths):
    B = len(lengths)
    keys = iter(jax.random.split(jax.random.key(0), 6))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q, k, v, cotangent = normal(B, T, H, d), normal(B, T, G, d), normal(B, T, G, dv), normal(B, T, H, dv)
    sinks = normal(H)
    lengths = jnp.asarray(lengths, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = positions < lengths[:, None]
    want_fn = lambda q, k, v, s: attend(q, [(k, v, positions, valid)], positions, s, window)
    got_fn = lambda q, k, v, s: fa.flash_attention(q, k, v, lengths, s, window, interpret=True)
    close(got_fn(q, k, v, sinks), want_fn(q, k, v, sinks))
    loss = lambda fn: lambda *args: (fn(*args) * cotangent).sum()
    grads = jax.grad(loss(got_fn), (0, 1, 2, 3))(q, k, v, sinks)
    for got, want in zip(grads, jax.grad(loss(want_fn), (0, 1, 2, 3))(q, k, v, sinks), strict=True):
        close(got, want)


def test_refuses_keys_that_do_not_fit():
    q, k = jnp.zeros((1, 8, 4, 8)), jnp.zeros((1, 8, 3, 8))
    with pytest.raises(ValueError, match="do not fit"):
        fa.flash_attention(q, k, k, jnp.array([8]), jnp.zeros(4), interpret=True)


@pytest.fixture(scope="module")
def tiny_models(tiny2_hf):
    """GQA and both MLA modes (every layer converted) of the two-layer model: a sliding and a full layer."""
    config, params = load_hf(tiny2_hf[1], progress=False)
    calib = np.random.default_rng(7).integers(0, config.vocab_size, (2, 24))
    models = {"gqa": (config, params)}
    for mode, extra in (("decompressed", {}), ("partial", {"rope_pairs": 2})):
        mla_config, mla_params, _ = convert(
            params, config, 12, mode, layers=(0, 1), init="pca", calib_tokens=calib, **extra
        )
        models[mode] = (mla_config, mla_params)
    return models


@pytest.mark.parametrize("model", ["gqa", "decompressed", "partial"])
def test_model_on_the_kernel_equals_jnp(tiny_models, small_blocks, model):
    """Logits with right padding and the gradient of every parameter, float32 (each gradient to 1e-5 of
    its largest entry, as the grouped-matmul paths are compared)."""
    config, params = tiny_models[model]
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 21)))
    lengths = jnp.array([21, 13])
    cotangent = jax.random.normal(jax.random.key(4), (2, 21, config.vocab_size))

    def loss(impl):
        run = lambda p: forward(p, tokens, None, config, lengths, ForwardOptions(attention=impl)).logits
        return jax.jit(jax.value_and_grad(lambda p: (run(p) * cotangent).sum()))

    (got, got_grads), (want, want_grads) = loss("flash")(params), loss("jnp")(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_kernel_per_device_under_a_mesh(tiny_models, small_blocks):
    """On a 2-device mesh (`ForwardOptions(mesh=...)`) each device runs the kernel on its own rows."""
    config, params = tiny_models["decompressed"]
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (4, 16)))
    want = forward(params, tokens, None, config, options=ForwardOptions(attention="jnp")).logits
    options = ForwardOptions(attention="flash", mesh=mesh)
    got = jax.jit(lambda p, t: forward(p, t, None, config, options=options).logits)(params, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, dk", [(None, 64), (128, 64), (None, 128)])
def test_kernels_lower_for_the_gpu_at_gpt_oss_20b_shapes(window, dk):
    """Forward, d(k, v) and d(q) at gpt-oss-20b's attention shapes (64 query heads over 8 kv heads, head
    dim 64, 2 x 2048 tokens, bf16; keys of `dk`, 128 for rorope MLA) lower to Triton for CUDA from this
    CPU-only machine."""
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    B, T, H, G, d = 2, 2048, 64, 8, 64

    def grads(q, k, v, lengths, sinks):
        out = lambda q, k, v, s: fa.flash_attention(q, k, v, lengths, s, window, interpret=False)
        return jax.grad(lambda *a: out(*a).astype(jnp.float32).sum(), (0, 1, 2, 3))(q, k, v, sinks)

    args = (spec(B, T, H, dk), spec(B, T, G, dk), spec(B, T, G, d), spec(B, dtype=jnp.int32), spec(H))
    lowered = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3  # forward, d(k, v), d(q)
