"""Checks the MLA test modules share: whole-sequence logits, cached decoding against them, the absorbed and
materialized attention paths against each other."""

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax import ForwardOptions, forward, forward_jit, init_cache
from gptoss_mla_jax.attention import chunk_at
from gptoss_mla_jax.cache import entry_shapes, nbytes, values_per_token
from gptoss_mla_jax.mla import attention_mla
from gptoss_mla_jax.model import attention_inputs


def logits(params, config, tokens, **options) -> np.ndarray:
    """Logits of whole sequences without a cache (`options`: ForwardOptions fields)."""
    return np.asarray(
        forward_jit(params, jnp.asarray(tokens), None, config, options=ForwardOptions(**options)).logits
    )


def assert_absorbed_equals_materialized(params, config, tokens: np.ndarray) -> None:
    """Each converted layer's attention on the same inputs gives the same output through the absorbed
    up-projections as through materialized keys and values (float32, 1e-5), and so do the logits (1e-4:
    the layers after the first carry its rounding, a few ulp, up to 1e-5 of logits near 6 on some CPUs)."""
    tokens = jnp.asarray(tokens)
    inputs, chunk = attention_inputs(params, tokens, config), chunk_at(*tokens.shape, config)
    for i in config.mla.layers:
        p, sliding = params["layers"][i]["self_attn"], config.is_sliding(i)
        absorbed, materialized = (
            attention_mla(p, inputs[i], chunk, None, sliding, config, i, ForwardOptions(mla_absorb=absorb))[0]
            for absorb in (True, False)
        )
        np.testing.assert_allclose(absorbed, materialized, atol=1e-5, rtol=0, err_msg=f"layer {i}")
    absorbed = logits(params, config, tokens, mla_absorb=True)
    np.testing.assert_allclose(absorbed, logits(params, config, tokens, mla_absorb=False), atol=1e-4, rtol=0)


def assert_decode_matches_full(params, config, tokens: np.ndarray, cache, kernels: bool) -> None:
    """Prefill ragged prompts (3 and 6 of the 2 rows' tokens) into `cache`, then decode the rest token by
    token through the jitted donated step (on the Pallas decode kernels if `kernels`): every position's
    logits equal the whole-sequence forward's (float32, 1e-4)."""
    full = logits(params, config, tokens)
    prompt = np.array([3, 6], np.int32)
    out, cache, _ = forward_jit(
        params, jnp.asarray(tokens[:, :8]), cache, config, lengths=jnp.asarray(prompt)
    )
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out)[b, : prompt[b]], full[b, : prompt[b]], atol=1e-4, rtol=0)
    step = jax.jit(
        lambda p, c, t: forward(p, t, c, config, options=ForwardOptions(decode_kernels=kernels)),
        donate_argnums=1,
    )
    for t in range(tokens.shape[1] - prompt.max()):
        pos = prompt + t
        out, cache, _ = step(params, cache, jnp.asarray(tokens[np.arange(2), pos][:, None]))
        np.testing.assert_allclose(np.asarray(out)[:, 0], full[np.arange(2), pos], atol=1e-4, rtol=0)


def assert_exact_at_one_token(student, student_config, params, config, windows, longer, absorb) -> None:
    """A conversion whose only loss is the rotation some key dims no longer get: one-token sequences (the
    first token of each of `windows`), where query and key share a position, give the original logits
    (1e-4), and the `longer` sequences do change (the rotation really is gone)."""
    first = windows[:, :1]
    want = logits(params, config, first)
    np.testing.assert_allclose(
        logits(student, student_config, first, mla_absorb=absorb), want, atol=1e-4, rtol=0
    )
    changed = logits(student, student_config, longer, mla_absorb=absorb) - logits(params, config, longer)
    assert np.abs(changed).max() > 1e-2


def assert_cache_matches_formula(config) -> None:
    """A bf16 cache of 3 sequences x 40 slots holds exactly the formula's bytes (values per token x slots,
    sliding layers a window's worth, plus 4-byte lengths) in the entry shapes `entry_shapes` gives."""
    cache = init_cache(config, batch=3, max_len=40, dtype=jnp.bfloat16)
    layers = range(config.num_hidden_layers)
    slots = [config.sliding_window if config.is_sliding(i) else 40 for i in layers]
    assert (
        nbytes(cache)
        == sum(3 * s * values_per_token(config, i) * 2 for i, s in zip(layers, slots, strict=True)) + 3 * 4
    )
    assert all(
        cache["layers"][i][n].shape == s for i in layers for n, s in entry_shapes(config, i, 3, 40).items()
    )
