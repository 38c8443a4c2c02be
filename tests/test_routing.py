"""The decode routing kernel (interpreted here) against `moe.route` and the jnp aligned layout, and its
CUDA lowering at gpt-oss-20b's router shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax.moe import ALIGN, _aligned_slots
from gptoss_mla_jax.routing import MAX_TOKENS, decode_routing, layout_rows


def reference(x, kernel, bias, k: int, align: int):
    """moe.route's weights and experts, then the layout as the jnp path computes it."""
    logits = x @ kernel + bias
    top, experts = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1)
    slot, padded = _aligned_slots(experts.reshape(-1), kernel.shape[1], align)
    return weights, experts, slot, padded


@pytest.mark.parametrize(
    "tokens, D, E, k, routing",
    [
        (1, 2880, 32, 4, "random"),  # gpt-oss-20b's router, batch 1
        (3, 100, 4, 2, "random"),  # contraction off the 64-column step, experts below the tile
        (64, 2880, 32, 4, "random"),  # the most tokens one program takes
        (37, 200, 20, 3, "random"),  # nothing a power of two: blocks larger than the arrays
        (3, 64, 40, 3, "far below zero"),  # k off a power of two, logits whose exp underflows
        (5, 64, 8, 2, "one expert for all"),  # every token picks expert 0
        (6, 64, 8, 4, "ties"),  # equal logits: the lower experts, as jax.lax.top_k
    ],
)
def test_equals_the_router_and_the_jnp_layout(tokens, D, E, k, routing):
    keys = jax.random.split(jax.random.key(tokens), 3)
    x = jax.random.normal(keys[0], (tokens, D), jnp.float32)
    kernel = jax.random.normal(keys[1], (D, E), jnp.float32) * D**-0.5
    bias = jax.random.normal(keys[2], (E,), jnp.float32)
    if routing == "one expert for all":
        bias = bias.at[0].set(1e4)
    if routing == "far below zero":
        bias = bias - 200
    if routing == "ties":
        kernel, bias = jnp.zeros_like(kernel), jnp.zeros_like(bias)
    got = decode_routing(x, kernel, bias, k, ALIGN, interpret=True)
    assert np.isfinite(np.asarray(got[0])).all()
    want = reference(x, kernel, bias, k, ALIGN)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)  # weights
    for name, g, w in zip(("experts", "slots", "padded sizes"), got[1:4], want[1:], strict=True):
        np.testing.assert_array_equal(g, w, err_msg=name)
    # Each row of the layout: the token whose pair sits there, -1 elsewhere.
    row_token = np.full(layout_rows(tokens, k, E, ALIGN), -1)
    row_token[np.asarray(want[2])] = np.arange(tokens * k) // k
    np.testing.assert_array_equal(got.row_token, row_token)
    if routing == "one expert for all":
        assert (np.asarray(got[1]) == 0).any(axis=1).all()
    if routing == "ties":
        np.testing.assert_array_equal(got[1], np.tile(np.arange(k), (tokens, 1)))


def test_refuses_more_tokens_than_one_program_serves():
    x = jnp.zeros((MAX_TOKENS + 1, 64))
    with pytest.raises(ValueError, match=f"{MAX_TOKENS + 1} tokens; one program serves at most"):
        decode_routing(x, jnp.zeros((64, 8)), jnp.zeros(8), 2, ALIGN, interpret=True)


@pytest.mark.parametrize("tokens, E, k", [(1, 32, 4), (MAX_TOKENS, 32, 4), (MAX_TOKENS, 128, 4), (3, 20, 3)])
def test_lowers_for_the_gpu(tokens, E, k):
    """bf16 routers of gpt-oss-20b (2880 x 32, top-4), gpt-oss-120b (128 experts) and one of sizes off
    powers of two lower to one Triton kernel for CUDA from this CPU-only machine."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    fn = lambda x, w, b: decode_routing(x, w, b, k, ALIGN)
    traced = jax.jit(fn).trace(spec(tokens, 2880), spec(2880, E), spec(E))
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1


@pytest.mark.parametrize("splits", [1, 3])
def test_routing_of_logits_equals_the_fused_kernel(splits):
    """The routing kernel fed the router's product as partial sums over slices of its contraction
    (`routing_of_logits`: one, XLA's product; three, padded to a tile of four, as `add_norm_routed` gives
    twelve at gpt-oss-20b's width) gives the fused kernel's weights, experts and layout."""
    from gptoss_mla_jax.routing import routing_of_logits

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    kernel, bias = jnp.asarray(rng.standard_normal((96, 8)), jnp.float32), jnp.asarray(rng.standard_normal(8))
    fused = decode_routing(x, kernel, bias, 2, ALIGN, interpret=True)
    partials = jnp.stack(
        [a @ w for a, w in zip(jnp.split(x, splits, 1), jnp.split(kernel, splits), strict=True)]
    )
    split = routing_of_logits(partials, bias, 2, ALIGN, jnp.float32, interpret=True)
    np.testing.assert_allclose(split[0], fused[0], rtol=1e-6, atol=1e-6)  # sums in another order
    for a, b in zip(fused[1:], split[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_routing_of_logits_rounds_the_sum_before_the_bias():
    """bf16 activations: the partial sums' total is rounded to bf16 and the bias added in bf16, as x @ W + b
    in bf16 (`moe.route`) rounds; experts that differ only below the rounding tie and go to the lower."""
    from gptoss_mla_jax.routing import routing_of_logits

    partials = jnp.asarray([[[1.0, 1.0 + 2**-10, 0.5, 3.0]], [[0.0, 0.0, 0.0, -3.0]]], jnp.float32)
    bias = jnp.zeros(4, jnp.bfloat16)
    weights, experts, *_ = routing_of_logits(partials, bias, 2, ALIGN, jnp.bfloat16, interpret=True)
    np.testing.assert_array_equal(experts, [[0, 1]])  # 1 + 2^-10 rounds to 1 in bf16: a tie, lower first
    np.testing.assert_allclose(weights, [[0.5, 0.5]])
