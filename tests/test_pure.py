"""The functional API on plain pytrees: jax.jit, jax.grad and jax.vmap, exactly as the README shows."""

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax import forward, init_cache
from weights.safetensors_io import load_hf


def test_jit_grad_vmap_on_plain_pytrees(tiny2_hf):
    config, params = load_hf(tiny2_hf[1], progress=False)
    assert all(type(x) in (dict, list) for x in (params, params["layers"], params["layers"][0]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))

    # README: logits, cache, _ = forward(params, tokens, cache, config) under jax.jit
    cache = init_cache(config, batch=2, max_len=16, dtype=jnp.float32)
    logits, cache, _ = jax.jit(forward, static_argnums=3)(params, tokens, cache, config)
    eager, _, _ = forward(params, tokens, None, config)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(eager), atol=1e-5)
    assert logits.shape == (2, 9, config.vocab_size) and int(cache["lengths"][0]) == 9

    def loss(p):
        lg, _, _ = forward(p, tokens[:, :-1], None, config)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[:, 1:, None], -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # The gradient is the real one: a finite-difference check along the gradient direction.
    eps = 1e-3
    norm = jax.jit(lambda grads: jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))))(grads)
    step = jax.jit(lambda params, grads: jax.tree.map(lambda p, g: p - eps * g / norm, params, grads))
    np.testing.assert_allclose(
        float(value - jax.jit(loss)(step(params, grads))) / eps, float(norm), rtol=2e-2
    )

    # vmap over a stack of two parameter sets (e.g. an ensemble), tokens shared.
    stacked = jax.jit(lambda params: jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params))(params)
    batched = jax.jit(jax.vmap(lambda p: forward(p, tokens, None, config)[0]))(stacked)
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(eager), atol=1e-5)
    assert not np.allclose(np.asarray(batched[1]), np.asarray(eager))


def test_linear_of_one_token_is_the_plain_product():
    """`attention.linear` multiplies a single token as two rows (a matmul on the GPU, not a reduction):
    the same values as x @ kernel + bias, with and without a bias."""
    from gptoss_mla_jax.attention import linear

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (1, 1, 24), jnp.float32)
    p = {"kernel": jax.random.normal(keys[1], (24, 40)), "bias": jax.random.normal(keys[2], (40,))}
    np.testing.assert_allclose(linear(x, p), x @ p["kernel"] + p["bias"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(linear(x, {"kernel": p["kernel"]}), x @ p["kernel"], rtol=1e-6, atol=1e-6)
    assert linear(jnp.concatenate([x, x]), p).shape == (2, 1, 40)
