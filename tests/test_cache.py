"""KV-cache decoding reproduces the full forward at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax.cache import init_cache, nbytes
from gptoss_mla_jax.generation import (
    Sampling,
    decode_step,
    decode_steps,
    generate,
    kernels_by_default,
    prefill,
)
from gptoss_mla_jax.model import ForwardOptions
from gptoss_mla_jax.model import forward_jit as forward


def test_cache_layout(tiny):
    config, _ = tiny
    cache = init_cache(config, batch=3, max_len=40, dtype=jnp.float32)
    for i, entry in enumerate(cache["layers"]):
        slots = config.sliding_window if config.is_sliding(i) else 40
        assert entry["k"].shape == entry["v"].shape == (3, slots, config.num_key_value_heads, config.head_dim)
    assert nbytes(cache) == 3 * 4 + 2 * 4 * 3 * (40 + config.sliding_window) * 2 * 2 * config.head_dim


@pytest.mark.parametrize("kernels", [False, True], ids=["jnp", "pallas"])
def test_prefill_then_decode_matches_full_forward(tiny, kernels):
    """Batched prompts of different lengths, then one token at a time far past the sliding window (with
    `kernels`, the full-attention layers' steps on the Pallas flash-decoding kernel, interpreted)."""
    config, params = tiny
    B, T = 3, 30
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T)).astype(np.int32)
    full, _, _ = forward(params, jnp.asarray(tokens), None, config)
    full = np.asarray(full)

    prompt_lens = np.array([1, 5, 9], np.int32)  # 1 token, just past the window (4), twice past it
    padded = np.where(np.arange(12)[None] < prompt_lens[:, None], tokens[:, :12], 0)
    cache = init_cache(config, B, 32, jnp.float32)
    logits, cache, _ = forward(params, jnp.asarray(padded), cache, config, jnp.asarray(prompt_lens))
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), prompt_lens)

    step = jax.jit(
        lambda p, c, t: forward(p, t, c, config, options=ForwardOptions(decode_kernels=kernels)),
        donate_argnums=1,
    )
    for t in range(T - prompt_lens.max()):
        pos = prompt_lens + t
        logits, cache, _ = step(params, cache, jnp.asarray(tokens[np.arange(B), pos][:, None]))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(B), pos], atol=1e-4, rtol=0)


def test_chunked_prefill_matches_full_forward(tiny):
    """Chunks longer than the window written into a ring buffer, then decoded against."""
    config, params = tiny
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24)).astype(np.int32)
    full = np.asarray(forward(params, jnp.asarray(tokens), None, config)[0])
    cache = init_cache(config, 2, 24, jnp.float32)
    for lo, hi in ((0, 7), (7, 8), (8, 19), (19, 24)):
        logits, cache, _ = forward(params, jnp.asarray(tokens[:, lo:hi]), cache, config)
        np.testing.assert_allclose(np.asarray(logits), full[:, lo:hi], atol=1e-4, rtol=0)


def test_decode_step_donates_the_cache(tiny):
    config, params = tiny
    cache = init_cache(config, 2, 16, jnp.float32)
    tokens = jnp.zeros((2, 16), jnp.int32)
    key = jax.random.key(0)
    first, cache = prefill(params, cache, tokens, jnp.array([3, 5]), key, config)
    old = cache
    _, cache = decode_step(params, old, first, key, config)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), [4, 6])


def test_device_loop_equals_a_step_per_call(tiny):
    """decode_steps' loop on the device gives the tokens and cache of one decode_step per token (sampled,
    each step's key split from the running one), stops at its limit, and stops early at the eos token."""
    config, params = tiny
    sampling = Sampling(1.0, 5, 0)
    started = lambda: prefill(
        params, init_cache(config, 2, 32, jnp.float32), jnp.zeros((2, 16), jnp.int32), jnp.array([3, 5]),
        jax.random.key(1), config, sampling,
    )  # fmt: skip
    token, cache = started()
    key, want = jax.random.key(2), []
    for _ in range(5):
        key, sub = jax.random.split(key)
        token, cache = decode_step(params, cache, token, sub, config, sampling)
        want.append(np.asarray(token))
    want = np.stack(want, axis=1)

    def loop(eos: int):  # from a fresh prefill: at most 5 steps of 8
        token, cache = started()
        done, limit = jnp.zeros(2, bool), jnp.int32(5)
        return decode_steps(
            params, cache, token, jax.random.key(2), done, limit, jnp.int32(eos), config, sampling, steps=8
        )

    run = loop(-1)
    assert int(run.count) == 5 and not run.done.any()
    np.testing.assert_array_equal(np.asarray(run.tokens)[:, :5], want)
    np.testing.assert_array_equal(np.asarray(run.last), want[:, -1])
    for a, b in zip(jax.tree.leaves(run.cache), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # each sequence's eos at its own step: the loop runs until the later one (or the limit)
    eos = int(want[0, 1])
    first = [next((j for j in range(5) if row[j] == eos), 4) for row in want]
    run = loop(eos)
    stop = max(first) + 1
    assert int(run.count) == stop and bool(run.done[0])
    np.testing.assert_array_equal(np.asarray(run.tokens)[:, :stop], want[:, :stop])


def test_generate_greedy_matches_recomputation(tiny):
    config, params = tiny
    prompts = [[5, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    outs = generate(params, config, prompts, 12)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out) == 12
        logits = np.asarray(forward(params, jnp.asarray([prompt + out[:-1]]), None, config)[0][0])
        np.testing.assert_array_equal(logits.argmax(-1)[len(prompt) - 1 :], out)


def test_generate_sampling_and_eos(tiny):
    config, params = tiny
    prompts = [[3, 4, 5]] * 4
    a = generate(params, config, prompts, 10, sampling=Sampling(1.0, 5, 0))
    b = generate(params, config, prompts, 10, sampling=Sampling(1.0, 5, 0))
    c = generate(params, config, prompts, 10, sampling=Sampling(1.0, 5, 1))
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1  # rows sample independently
    greedy = generate(params, config, [[3, 4, 5]], 10)[0]
    stopped = generate(params, config, [[3, 4, 5]], 10, eos_id=greedy[2])[0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]


def test_compacted_moves_params_only_where_free_memory_is_in_pieces(monkeypatch):
    """Where the allocator's largest free block is well below its free bytes, `compacted` moves the arrays
    to the host and back: the values are kept, an array appearing twice comes back as one array in both
    places, other leaves pass, and the arrays given up are deleted. One block (or no figures, the CPU):
    the tree as it was."""
    from gptoss_mla_jax import cache as cache_lib

    shared = jnp.arange(6.0).reshape(2, 3)
    tree = {"a": shared, "b": [shared, jnp.ones(4, jnp.bfloat16)], "n": 7}
    assert cache_lib.compacted(tree) is tree  # the CPU keeps no figures
    stats = {"bytes_limit": 100, "bytes_in_use": 40}
    monkeypatch.setattr(cache_lib, "device_memory", lambda: stats | {"largest_free_block_bytes": 55})
    assert cache_lib.compacted(tree) is tree  # 55 of 60 free in one block
    monkeypatch.setattr(cache_lib, "device_memory", lambda: stats | {"largest_free_block_bytes": 30})
    sharding = shared.sharding
    out = cache_lib.compacted(tree)
    assert shared.is_deleted() and tree["b"][1].is_deleted()
    assert out["a"] is out["b"][0] and out["n"] == 7
    assert isinstance(out["a"], jax.Array) and out["a"].sharding == sharding and not out["a"].is_deleted()
    np.testing.assert_array_equal(np.asarray(out["a"]), np.arange(6.0).reshape(2, 3))
    assert out["b"][1].dtype == jnp.bfloat16 and (np.asarray(out["b"][1], np.float32) == 1).all()


def test_kernels_by_default_on_a_gpu_with_a_16_bit_cache(monkeypatch):
    assert not kernels_by_default(jnp.bfloat16)  # this machine has no GPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels_by_default(jnp.bfloat16)
    assert not kernels_by_default(jnp.float32)


@pytest.mark.parametrize("sliding", [False, True])
def test_write_of_one_token_sets_only_its_slot(sliding):
    """A single token (written as two identical rows, a scatter on the GPU) lands in its slot, the ring's
    slot position % slots on a sliding layer, and nothing else changes; a padded token writes nothing."""
    from gptoss_mla_jax.cache import write

    entry = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(1, 4, 2, 3) + 100
    new = -jnp.ones((1, 1, 2, 3))
    position = jnp.asarray([[5 if sliding else 2]])
    got = write(entry, new, position, jnp.ones((1, 1), bool), jnp.asarray([6 if sliding else 3]), sliding)
    want = np.asarray(entry).copy()
    want[0, 1 if sliding else 2] = -1
    np.testing.assert_array_equal(got, want)
    padded = write(entry, new, position, jnp.zeros((1, 1), bool), jnp.asarray([6 if sliding else 3]), sliding)
    np.testing.assert_array_equal(padded, entry)
