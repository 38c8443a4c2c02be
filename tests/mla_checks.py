"""Checks the MLA test modules share: whole-sequence logits, and cached decoding against them."""

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax import ForwardOptions, forward, forward_jit


def logits(params, config, tokens, **options) -> np.ndarray:
    """Logits of whole sequences without a cache (`options`: ForwardOptions fields)."""
    return np.asarray(
        forward_jit(params, jnp.asarray(tokens), None, config, options=ForwardOptions(**options)).logits
    )


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
