"""MLA: exactness of the conversion at full rank, absorbed == materialized, decoding, cache accounting."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import flash_decode, init_cache
from gptoss_mla_jax.cache import values_per_token
from gptoss_mla_jax.config import GptOssConfig, MlaConfig
from tests.mla_checks import (
    assert_absorbed_equals_materialized,
    assert_cache_matches_formula,
    assert_decode_matches_full,
    assert_exact_at_one_token,
    logits,
)
from weights.to_mla import convert

TOKENS = np.random.default_rng(3).integers(0, 97, (2, 19))


@pytest.mark.parametrize("init", ["svd", "pca"])
def test_decompressed_full_rank_is_exact(tiny, calib, init):
    config, params = tiny
    full_rank = 2 * config.num_key_value_heads * config.head_dim
    mla_config, mla_params, report = convert(
        params, config, full_rank, "decompressed", layers=(0, 1, 2, 3), init=init, calib_tokens=calib
    )
    np.testing.assert_allclose(
        logits(mla_params, mla_config, TOKENS), logits(params, config, TOKENS), atol=1e-4, rtol=0
    )
    assert all(abs(row["energy_retained"] - 1) < 1e-5 for row in report)


@pytest.mark.parametrize("init", ["svd", "pca"])
def test_partial_all_pairs_full_rank_is_exact(tiny, calib, init):
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mla_config, mla_params, _ = convert(
        params,
        config,
        G * d,
        "partial",
        layers=(0, 1, 2, 3),
        rope_pairs=d // 2,
        init=init,
        calib_tokens=calib,
    )
    want = logits(params, config, TOKENS)
    for absorb in (False, True):
        got = logits(mla_params, mla_config, TOKENS, mla_absorb=absorb)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_low_rank_is_not_exact_and_pca_beats_svd(tiny, calib):
    """A guard that the exactness tests can fail: at a quarter of the rank the logits move."""
    config, params = tiny
    want = logits(params, config, calib[:, :19])
    errors = {}
    for init in ("svd", "pca"):
        mla_config, mla_params, report = convert(
            params, config, 8, "decompressed", init=init, calib_tokens=calib
        )
        errors[init] = np.abs(logits(mla_params, mla_config, calib[:, :19]) - want).mean()
        assert errors[init] > 1e-3 and all(0 < row["energy_retained"] < 1 for row in report)
    # Activation-aware init fits the calibration activations better than weight SVD.
    assert errors["pca"] < errors["svd"]


def test_absorbed_equals_materialized(tiny, calib):
    """Partial mode at reduced rank, sinks and biases nonzero: both attention paths, float32."""
    config, params = tiny
    mla_config, mla_params, _ = convert(
        params, config, 10, "partial", layers=(0, 1, 3), rope_pairs=1, init="pca", calib_tokens=calib
    )
    attn = mla_params["layers"][1]["self_attn"]
    assert np.abs(np.asarray(attn["kv_b"]["bias"])).min() > 0 and np.abs(np.asarray(attn["sinks"])).min() > 0
    assert_absorbed_equals_materialized(mla_params, mla_config, TOKENS)


@pytest.mark.parametrize("kernels", [False, True], ids=["jnp", "pallas"])
@pytest.mark.parametrize("mode", ["decompressed", "partial"])
def test_mla_decode_matches_full_forward(tiny, calib, mode, kernels):
    """A model mixing MLA (layers 0, 1: sliding and full) and GQA layers, prefill then token-by-token decode
    far past the window, through the jitted donated decode path; with `kernels`, the steps attend with the
    Pallas flash-decoding kernels (interpreted) wherever the cache's slot count allows."""
    config, params = tiny
    mla_config, mla_params, _ = convert(
        params, config, 12, mode, layers=(0, 1), rope_pairs=2, init="pca", calib_tokens=calib
    )
    tokens = np.random.default_rng(4).integers(0, 97, (2, 24)).astype(np.int32)
    cache = init_cache(mla_config, 2, 32, jnp.float32)
    assert set(cache["layers"][0]) == ({"c"} if mode == "decompressed" else {"c", "k_rope"})
    assert set(cache["layers"][2]) == {"k", "v"}
    assert_decode_matches_full(mla_params, mla_config, tokens, cache, kernels)


@pytest.mark.parametrize("mode", ["gqa", "decompressed", "partial"])
def test_sliding_layers_decode_on_the_kernels(tiny, calib, mode, monkeypatch):
    """With a window of 16 (a ring buffer the kernels can split; the tiny model's 4 is not), the sliding
    layers' steps attend on the Pallas kernels too, over a ring that wraps twice: every position's logits
    equal the whole-sequence forward's (float32, 1e-4), GQA and both MLA modes (layers 0 sliding, 1 full)."""
    config, params = tiny
    config = dataclasses.replace(config, sliding_window=16)
    if mode != "gqa":
        config, params, _ = convert(
            params, config, 12, mode, layers=(0, 1), rope_pairs=2, init="pca", calib_tokens=calib
        )
    kernels = {
        "gqa": "gqa_decode",
        "decompressed": "mla_decompressed_decode",
        "partial": "mla_absorbed_decode",
    }
    sliding = []
    real = getattr(flash_decode, kernels[mode])
    spy = lambda *args, **kw: sliding.append(args[4 if mode == "partial" else 3].sliding) or real(*args, **kw)
    monkeypatch.setattr(flash_decode, kernels[mode], spy)
    tokens = np.random.default_rng(6).integers(0, 97, (2, 40)).astype(np.int32)
    assert_decode_matches_full(params, config, tokens, init_cache(config, 2, 48, jnp.float32), kernels=True)
    assert True in sliding and False in sliding  # traced for a sliding layer and a full one


def test_device_loop_derives_the_decompressed_keys_once(tiny, calib, monkeypatch):
    """A device loop of decode steps on the kernels (decompressed MLA, layer 1 full) derives the full
    layer's slot rotations and grouped key weights once, before its loop (`with_decode_keys`), and its
    steps read them: the tokens and cache equal those of one step per call, which derives them each step;
    check_params accepts the entries as made and refuses one of another shape."""
    import jax

    from gptoss_mla_jax.generation import GREEDY, decode_step, decode_steps
    from gptoss_mla_jax.mla import DECODE_KEYS, with_decode_keys
    from gptoss_mla_jax.model import check_params, forward

    config, params = tiny
    mla_config, mla_params, _ = convert(
        params, config, 12, "decompressed", layers=(0, 1), init="pca", calib_tokens=calib
    )
    key_ups = []
    real = flash_decode.mla_decompressed_decode
    spy = lambda *args: key_ups.append(args[-1] is not None) or real(*args)
    monkeypatch.setattr(flash_decode, "mla_decompressed_decode", spy)
    prompt = np.random.default_rng(5).integers(0, 97, (2, 20)).astype(np.int32)
    prefill = jax.jit(forward, static_argnames="config")
    started = lambda: prefill(
        mla_params, jnp.asarray(prompt), init_cache(mla_config, 2, 32, jnp.float32), mla_config
    )
    _, cache, _ = started()
    token, want = jnp.asarray(prompt[:, -1]), []
    for _ in range(3):
        token, cache = decode_step(mla_params, cache, token, jax.random.key(0), mla_config, GREEDY, True)
        want.append(np.asarray(token))
    assert key_ups and not any(key_ups)  # one step per call: derived in the step
    key_ups.clear()
    _, fresh, _ = started()
    run = decode_steps(
        mla_params, fresh, jnp.asarray(prompt[:, -1]), jax.random.key(0), jnp.zeros(2, bool), jnp.int32(3),
        jnp.int32(-1), mla_config, GREEDY, True, 3,
    )  # fmt: skip
    assert True in key_ups  # the full layer's steps read the derived entry (the sliding one derives its own)
    np.testing.assert_array_equal(np.asarray(run.tokens), np.stack(want, axis=1))
    for a, b in zip(jax.tree.leaves(run.cache), jax.tree.leaves(cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    derived = with_decode_keys(mla_params, mla_config, 32, jnp.float32)
    assert (
        DECODE_KEYS in derived["layers"][1]["self_attn"]
        and DECODE_KEYS not in derived["layers"][0]["self_attn"]
    )
    check_params(derived, mla_config)
    table = derived["layers"][1]["self_attn"][DECODE_KEYS]
    layers = list(derived["layers"])
    layers[1] = {
        **layers[1],
        "self_attn": {**layers[1]["self_attn"], DECODE_KEYS: {**table, "cos": table["cos"][:, :16]}},
    }
    with pytest.raises(ValueError, match="decode_keys"):
        check_params({**derived, "layers": layers}, mla_config)


def test_absorbed_decode_within_a_state_share(tiny, calib, monkeypatch):
    """With the slices' state bounded (`flash_decode.STATE_SHARE` 0: one slice), the absorbed kernel's
    decode still equals the full forward, and its launches take the bound (128 slots: 2 slices without)."""
    config, params = tiny
    mla_config, mla_params, _ = convert(
        params, config, 12, "partial", layers=(0, 1), rope_pairs=2, init="pca", calib_tokens=calib
    )
    launches = []
    real = flash_decode.mla_absorbed_decode
    monkeypatch.setattr(flash_decode, "mla_absorbed_decode", lambda *a: launches.append(a[-1]) or real(*a))
    monkeypatch.setattr(flash_decode, "STATE_SHARE", 0.0)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 24)).astype(np.int32)
    assert_decode_matches_full(
        mla_params, mla_config, tokens, init_cache(mla_config, 2, 128, jnp.float32), True
    )
    assert launches and {launch.splits for launch in launches} == {1}
    assert flash_decode.plan(128, 2) == (2, 64)


def test_cache_bytes_formula(tiny):
    config, _ = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mla = MlaConfig("partial", (1, 2), (12, 5), (((0, 3), (1, 2)), ((2, 3), (0, 1))))
    mixed = dataclasses.replace(config, mla=mla)
    assert [values_per_token(mixed, i) for i in range(4)] == [2 * G * d, 12 + G * 4, 5 + G * 4, 2 * G * d]
    for cfg in (config, mixed):
        assert_cache_matches_formula(cfg)


def test_mla_config_round_trip_and_errors(tiny):
    config, _ = tiny
    mla = MlaConfig("partial", (1, 3), (12, 8), (((0, 3), (1, 2)), ((2, 3), (0, 1))))
    mixed = dataclasses.replace(config, mla=mla)
    hf = mixed.to_hf()
    assert hf["model_type"] == "gpt_oss_mla" and hf["mla"]["rope_pairs"][0] == [[0, 3], [1, 2]]
    assert GptOssConfig.from_hf(hf) == mixed
    with pytest.raises(ValueError, match=r"latent dim 40 of layer 1 is outside 1\.\.32"):
        dataclasses.replace(config, mla=MlaConfig("decompressed", (1,), (40,)))
    with pytest.raises(ValueError, match="names layer 9"):
        dataclasses.replace(config, mla=MlaConfig("decompressed", (9,), (4,)))


@pytest.mark.parametrize("absorb", [False, True])
def test_partial_no_rope_dims_keep_yarn_mscale(tiny, calib, absorb):
    """Dims that lose RoPE are scored as RoPE at angle 0, so YaRN's mscale^2 must stay on them. At full
    latent rank the only change is the missing rotation, which is the identity where query and key share
    a position: one-token sequences must then give the original logits exactly."""
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    pairs = 1
    width = G * (d - 2 * pairs) + G * d
    assert width <= config.hidden_size  # a full-rank latent is representable
    mla_config, mla_params, _ = convert(
        params,
        config,
        width,
        "partial",
        layers=(0, 1, 2, 3),
        rope_pairs=pairs,
        init="svd",
        calib_tokens=calib,
    )
    assert_exact_at_one_token(mla_params, mla_config, params, config, calib, TOKENS, absorb)


@pytest.mark.parametrize("mode", ["partial", "rorope"])
def test_up_projections_derived_once_change_nothing(tiny, calib, mode):
    """`with_up_projections` (what `generate` gives its decode steps): the params check accepts the derived
    entry, the original params are untouched, and absorbed and materialized logits equal those that derive
    the up-projections inside every step (float32; rorope's mixing back is summed in another order outside
    the jitted forward, a few ulps apart)."""
    from gptoss_mla_jax.mla import UP, with_up_projections
    from gptoss_mla_jax.model import check_params

    config, params = tiny
    extra = {"rope_pairs": 2} if mode == "partial" else {"rope_components": 1}
    mla_config, mla_params, _ = convert(
        params, config, 12, mode, layers=(0, 1), init="pca", calib_tokens=calib, **extra
    )
    derived = with_up_projections(mla_params, mla_config)
    check_params(derived, mla_config)
    assert UP in derived["layers"][1]["self_attn"] and UP not in mla_params["layers"][1]["self_attn"]
    assert UP not in derived["layers"][2]["self_attn"]  # a GQA layer
    attn = derived["layers"][1]["self_attn"]
    wrong = {**attn, UP: {**attn[UP], "w_k": attn[UP]["w_k"][:-1]}}
    with pytest.raises(ValueError, match=r"up_projections'\]\['w_k'\] has shape"):
        check_params(
            {
                **derived,
                "layers": [
                    *derived["layers"][:1],
                    {**derived["layers"][1], "self_attn": wrong},
                    *derived["layers"][2:],
                ],
            },
            mla_config,
        )
    stray = {**derived["layers"][2], "self_attn": {**derived["layers"][2]["self_attn"], UP: attn[UP]}}
    with pytest.raises(ValueError, match="entries the config does not use"):
        check_params(
            {**derived, "layers": [*derived["layers"][:2], stray, *derived["layers"][3:]]}, mla_config
        )
    for absorb in (False, True):
        np.testing.assert_allclose(
            logits(derived, mla_config, TOKENS, mla_absorb=absorb),
            logits(mla_params, mla_config, TOKENS, mla_absorb=absorb),
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("mode", ["partial", "rorope"])
def test_budgets_per_layer(tiny, calib, mode):
    """Latent width and RoPE budget chosen per layer (a sliding layer with one pair or component, a full one
    with more): each layer's cache holds its own width, and cached decode (absorbed) equals the full
    forward (materialized); a budget that does not name exactly the converted layers is refused."""
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    budget = {"rope_pairs": {0: 1, 1: 3}} if mode == "partial" else {"rope_components": {0: 1, 1: 2}}
    mla_config, mla_params, report = convert(
        params, config, {0: 10, 1: 14}, mode, layers=(0, 1), init="pca", calib_tokens=calib, **budget
    )
    rope_values = [2 * G, 6 * G] if mode == "partial" else [d, 2 * d]
    assert [values_per_token(mla_config, i) for i in (0, 1)] == [10 + rope_values[0], 14 + rope_values[1]]
    if mode == "partial":
        assert [len(row["rope_pairs"][0]) for row in report] == [1, 3]
    assert_cache_matches_formula(mla_config)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 24)).astype(np.int32)
    assert_decode_matches_full(
        mla_params, mla_config, tokens, init_cache(mla_config, 2, 32, jnp.float32), False
    )
    with pytest.raises(
        ValueError, match=r"--latent-dim per layer names layers \[0\]; the converted layers are \[0, 1\]"
    ):
        convert(params, config, {0: 10}, mode, layers=(0, 1), init="pca", calib_tokens=calib, **budget)
