"""rorope MLA: exact at full rank with every component kept, absorbed == materialized, decoding on the jnp
path and the Pallas kernels, the flash-attention prefill, cache accounting, config round trip; FreqFold
(`rope_fold` 2) likewise, exact against the original with each group's frequencies folded into one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import ForwardOptions, forward, init_cache, rope
from gptoss_mla_jax import cache as kv_cache
from gptoss_mla_jax.cache import accounting, values_per_token
from gptoss_mla_jax.config import GptOssConfig, MlaConfig
from gptoss_mla_jax.flash_decode import Launch, Slots, mla_absorbed_decode
from gptoss_mla_jax.mla import _absorbed
from tests.mla_checks import (
    assert_absorbed_equals_materialized,
    assert_cache_matches_formula,
    assert_decode_matches_full,
    assert_exact_at_one_token,
    logits,
)
from weights.to_mla import convert, rorope_mix

TOKENS = np.random.default_rng(3).integers(0, 97, (2, 19))
ALL_LAYERS = (0, 1, 2, 3)


def _rorope(tiny, calib, latent_dim, components, init="pca", layers=ALL_LAYERS, fold=1):
    config, params = tiny
    return convert(
        params,
        config,
        latent_dim,
        "rorope",
        layers=layers,
        init=init,
        calib_tokens=calib,
        rope_components=components,
        rope_fold=fold,
    )


@pytest.mark.parametrize("init", ["svd", "pca"])
def test_all_components_full_rank_is_exact(tiny, calib, init):
    """Every mixed component keeps RoPE (the mixing is orthogonal, so it cancels) and the latent holds V
    at full rank: the original logits, on both attention paths."""
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mla_config, mla_params, report = _rorope(tiny, calib, G * d, G, init)
    assert all(abs(row["rope_energy_retained"] - 1) < 1e-6 for row in report)
    want = logits(params, config, TOKENS)
    for absorb in (False, True):
        np.testing.assert_allclose(
            logits(mla_params, mla_config, TOKENS, mla_absorb=absorb), want, atol=1e-4, rtol=0
        )


def test_freqfold_all_components_full_rank_is_exact_with_folded_frequencies(tiny, calib, monkeypatch):
    """FreqFold turns each group of two pairs at its first pair's frequency: with every component kept at
    full rank the logits are the original model's with those frequencies, and differ from its own."""
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mla_config, mla_params, _ = _rorope(tiny, calib, G * d, 2 * G, fold=2)
    for absorb in (False, True):
        got = logits(mla_params, mla_config, TOKENS, mla_absorb=absorb)
        assert np.abs(got - logits(params, config, TOKENS)).max() > 1e-2
    original = rope.inv_freq
    monkeypatch.setattr(rope, "inv_freq", lambda cfg: np.repeat(original(cfg)[::2], 2))
    folded = jax.jit(lambda p, t: forward(p, t, None, config).logits)  # a fresh trace: folded tables
    np.testing.assert_allclose(got, np.asarray(folded(params, jnp.asarray(TOKENS))), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("absorb", "fold"), [(False, 1), (True, 1), (True, 2)])
def test_dropped_components_keep_yarn_mscale(tiny, calib, absorb, fold):
    """With one component kept per pair (group) and the latent at full rank, the only change is the
    rotation the other components lost (and FreqFold's): the identity where query and key share a
    position, so one-token sequences give the original logits exactly (this pins the mixing of the no-RoPE
    part and its mscale^2), longer ones do not."""
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    width = G * d - d // fold + G * d
    mla_config, mla_params, report = _rorope(tiny, calib, width, 1, "svd", fold=fold)
    assert all(0 < row["rope_energy_retained"] < 1 for row in report)
    assert_exact_at_one_token(mla_params, mla_config, params, config, calib, TOKENS, absorb)


@pytest.mark.parametrize("fold", [1, 2])
def test_mixing_is_orthogonal_and_ordered(tiny, calib, fold):
    """Per pair (group of pairs), U is orthogonal and its rows come by decreasing energy of the
    calibration keys."""
    config, params = tiny
    from gptoss_mla_jax.model import attention_inputs

    h = attention_inputs(params, jnp.asarray(calib), config)[1].reshape(-1, config.hidden_size)
    mix, energy = rorope_mix(params["layers"][1]["self_attn"], h, config, fold)
    G, Q = config.num_key_value_heads, config.head_dim // (2 * fold)
    assert mix.shape == (Q, G * fold, G, fold)
    flat = np.asarray(mix).reshape(Q, G * fold, G * fold)
    np.testing.assert_allclose(
        np.einsum("qjx,qkx->qjk", flat, flat), np.broadcast_to(np.eye(G * fold), flat.shape), atol=1e-5
    )
    assert np.all(np.diff(np.asarray(energy), axis=1) <= 1e-6)


@pytest.mark.parametrize("fold", [1, 2])
def test_absorbed_equals_materialized(tiny, calib, fold):
    """Reduced rank, one component per pair (group), sinks and biases nonzero: both attention paths,
    float32."""
    mla_config, mla_params, _ = _rorope(tiny, calib, 10, 1, layers=(0, 1, 3), fold=fold)
    attn = mla_params["layers"][1]["self_attn"]
    assert np.abs(np.asarray(attn["kv_b"]["bias"])).min() > 0 and np.abs(np.asarray(attn["sinks"])).min() > 0
    assert_absorbed_equals_materialized(mla_params, mla_config, TOKENS)


@pytest.mark.parametrize(
    ("kernels", "fold"), [(False, 1), (True, 1), (True, 2)], ids=["jnp", "pallas", "pallas-fold2"]
)
def test_decode_matches_full_forward(tiny, calib, kernels, fold):
    """MLA on layers 0 (sliding) and 1 (full), GQA elsewhere: prefill with ragged prompts, then
    token-by-token decode far past the window through the jitted donated path; with `kernels`, on the
    Pallas flash-decoding kernel (interpreted) wherever the cache's slot count allows."""
    config = tiny[0]
    mla_config, mla_params, _ = _rorope(tiny, calib, 12, 1, layers=(0, 1), fold=fold)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 24)).astype(np.int32)
    cache = init_cache(mla_config, 2, 32, jnp.float32)
    assert {n: x.shape for n, x in cache["layers"][1].items()} == {
        "c": (2, 32, 12),
        "k_rope": (2, 32, 1, config.head_dim // fold),
    }
    assert_decode_matches_full(mla_params, mla_config, tokens, cache, kernels)


@pytest.mark.parametrize("sliding", [False, True])
def test_kernel_serves_the_shared_rope_key(sliding):
    """`mla_absorbed_decode` with one RoPE key read by every head (k_rope [B, S, 1, m d], dense queries)
    equals `mla._absorbed` on the same cache, float32, interpreted; also with the heads split over two
    programs."""
    B, G, R, r, n2, d, slots = 3, 4, 2, 24, 16, 8, 64
    keys = iter(jax.random.split(jax.random.key(1), 12))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
    q_rope, q_nope = normal(B, G, R, n2), normal(B, G, R, d)
    up = (normal(r, G, d) * 0.3, normal(G, d), normal(r, G, d), normal(G, d))
    entries = {"c": normal(B, slots, r), "k_rope": normal(B, slots, 1, n2)}
    sinks = normal(G * R)
    lengths = jnp.asarray([1, 40, 100], jnp.int32)
    window = 48 if sliding else None
    pos, ok = kv_cache.cached_positions(lengths, slots, sliding)
    want = _absorbed(
        q_rope[:, None], q_nope[:, None], up, [(entries, pos, ok)], (lengths - 1)[:, None], sinks, window
    )[:, 0]
    whole = Launch(2, 16, interpret=True)
    for launch in (whole, whole._replace(head_block=G * R // 2)):
        got = mla_absorbed_decode(q_rope, q_nope, up, entries, Slots(lengths, window, sliding), sinks, launch)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flash_attention_prefill_equals_jnp(tiny, calib, monkeypatch):
    """A chunk without a cache on the flash-attention kernel (keys twice the values' width) equals the jnp
    path, with right padding, float32: within 1e-5 of the logits' scale (float32 sums in another order err
    relative to the terms summed, not to a small logit they sum to)."""
    from gptoss_mla_jax import flash_attention as fa

    monkeypatch.setitem(fa.LAUNCH, "forward", fa.Blocks(queries=32, keys=16))
    mla_config, mla_params, _ = _rorope(tiny, calib, 12, 1)
    tokens = jnp.asarray(TOKENS)
    run = lambda impl: (
        forward(
            mla_params, tokens, None, mla_config, jnp.array([19, 11]), ForwardOptions(attention=impl)
        ).logits
    )
    want = run("jnp")
    np.testing.assert_allclose(run("flash"), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_cache_bytes_formula(tiny):
    config, _ = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mixed = dataclasses.replace(config, mla=MlaConfig("rorope", (1, 2), (12, 5), rope_components=(1, 2)))
    assert [values_per_token(mixed, i) for i in range(4)] == [2 * G * d, 12 + d, 5 + 2 * d, 2 * G * d]
    assert_cache_matches_formula(mixed)
    rows = accounting(mixed, 1, 40, jnp.bfloat16)["rows"]
    assert rows["full MLA rorope r=12, 1 rope components/pair"]["values_per_token"] == 12 + d
    folded = dataclasses.replace(mixed, mla=dataclasses.replace(mixed.mla, rope_fold=2))
    assert [values_per_token(folded, i) for i in (1, 2)] == [12 + d // 2, 5 + d]
    assert_cache_matches_formula(folded)


def test_config_round_trip_and_errors(tiny):
    config, _ = tiny
    G, d = config.num_key_value_heads, config.head_dim
    mla = MlaConfig("rorope", (1, 3), (12, 8), rope_components=(1, 4), rope_fold=2)
    mixed = dataclasses.replace(config, mla=mla)
    hf = mixed.to_hf()
    assert hf["mla"]["rope_components"] == [1, 4] and hf["mla"]["rope_fold"] == 2
    assert "rope_pairs" not in hf["mla"]
    assert GptOssConfig.from_hf(hf) == mixed
    assert mixed.mla_target_width(3) == 2 * G * d - 4 * d // 2
    with pytest.raises(ValueError, match="rope_fold 3: rorope only, and a divisor of the 4 frequency pairs"):
        dataclasses.replace(config, mla=MlaConfig("rorope", (1,), (4,), rope_components=(1,), rope_fold=3))
    with pytest.raises(ValueError, match="rope_fold 2: rorope only"):
        dataclasses.replace(config, mla=MlaConfig("decompressed", (1,), (4,), rope_fold=2))
    assert mixed.mla_target_width(1) == 2 * G * d - d // 2
    with pytest.raises(ValueError, match=r"rope_components of layer 1: 3 is outside 1\.\.2"):
        dataclasses.replace(config, mla=MlaConfig("rorope", (1,), (4,), rope_components=(3,)))
    with pytest.raises(ValueError, match="one entry per converted layer"):
        dataclasses.replace(config, mla=MlaConfig("rorope", (1, 3), (4, 4), rope_components=(1,)))
    with pytest.raises(ValueError, match=r"latent dim 17 of layer 1 is outside 1\.\.16"):
        dataclasses.replace(config, mla=MlaConfig("rorope", (1,), (17,), rope_components=(2,)))
    with pytest.raises(ValueError, match=r"--rope-components 0 must be in 1\.\.2"):
        convert(tiny[1], config, 8, "rorope", rope_components=0)
