"""eval.diagnose: statistics checked against values the weights make known, and the command end to end."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

from eval.diagnose import diagnose, main
from weights.orbax_io import save_checkpoint
from weights.to_mla import convert

WINDOWS = np.random.default_rng(0).integers(0, 97, (4, 16)).astype(np.int32)


def test_statistics_equal_hand_computed_values(tiny):
    config, params = tiny
    params = copy.deepcopy(params)
    assert not config.is_sliding(1)
    full = params["layers"][1]["self_attn"]
    # Layer 1: zero queries give every visible key score 0, and sinks of 0 make the sink one more such
    # logit: a query at position t (t + 1 keys) puts 1 / (t + 2) on the first token and on the sink.
    full["q_proj"]["kernel"] = jnp.zeros_like(full["q_proj"]["kernel"])
    full["q_proj"]["bias"] = jnp.zeros_like(full["q_proj"]["bias"])
    full["sinks"] = jnp.zeros_like(full["sinks"])
    # Layer 0, head 0: a sink logit that dominates everything.
    params["layers"][0]["self_attn"]["sinks"] = params["layers"][0]["self_attn"]["sinks"].at[0].set(60.0)
    # Layer 2: a router that always picks experts 1 and 3.
    router = params["layers"][2]["mlp"]["router"]
    bias = jnp.asarray([0.0, 5.0, 0.0, 4.0])
    router["kernel"], router["bias"] = jnp.zeros_like(router["kernel"]), bias
    # Layer 3, kv head 0: keys of rank one.
    k_proj = params["layers"][3]["self_attn"]["k_proj"]
    d = config.head_dim
    u, v = np.random.default_rng(1).standard_normal((2, config.hidden_size, 1))
    k_proj["kernel"] = k_proj["kernel"].at[:, :d].set(jnp.asarray(u @ v[:d].T))
    k_proj["bias"] = k_proj["bias"].at[:d].set(0.0)

    result = diagnose(params, config, WINDOWS, 2, params, config)
    layers, T = result["layers"], WINDOWS.shape[1]
    t = np.arange(T)
    np.testing.assert_allclose(layers[1]["first_token_mass"], np.mean(1 / (t[1:] + 2)), rtol=1e-5)
    np.testing.assert_allclose(layers[1]["sink_mass"], np.mean(1 / (t + 2)), rtol=1e-5)
    assert layers[0]["sink_mass"][0] > 1 - 1e-6 and max(layers[0]["sink_mass"][1:]) < 0.99
    np.testing.assert_allclose(layers[2]["expert_load"], [0, 0.5, 0, 0.5], atol=1e-7)
    p = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(layers[2]["routing_entropy"], -(p * np.log(p)).sum(), rtol=1e-5)
    np.testing.assert_allclose(layers[3]["k_effective_rank"][0], 1.0, atol=1e-3)
    assert layers[3]["k_effective_rank"][1] > 2
    # Compared with itself: no drift, no changed routing, no KL.
    for layer in layers:
        assert layer["top_k_changed"] == 0 and layer["drift_rel_l2"] < 1e-6
        np.testing.assert_allclose(layer["drift_cosine"], 1.0, atol=1e-6)
    assert result["token_kl"]["max"] < 1e-6


@pytest.mark.parametrize("mode", ["decompressed", "partial", "rorope"])
def test_mla_reconstruction_errors_vanish_only_where_nothing_is_compressed(tiny, mode):
    config, params = tiny
    G, d = config.num_key_value_heads, config.head_dim
    calib = np.random.default_rng(7).integers(0, config.vocab_size, (4, 32))
    # partial / rorope: every pair (every mixed component) kept with RoPE, V alone in the latent
    full_rank = 2 * G * d if mode == "decompressed" else G * d
    kept = {"rope_pairs": d // 2 if mode == "partial" else 0, "rope_components": G if mode == "rorope" else 0}
    errors = {}
    for rank in (full_rank, full_rank // 4):
        mla_config, mla_params, _ = convert(
            params, config, rank, mode, layers=(1, 3), init="pca", calib_tokens=calib, **kept
        )
        result = diagnose(mla_params, mla_config, WINDOWS, 2, params, config)
        assert result["layer_types"] == ["sliding", "full mla", "sliding", "full mla"]
        errors[rank] = [result["layers"][i][key] for i in (1, 3) for key in ("k_rel_error", "v_rel_error")]
        assert "k_rel_error" not in result["layers"][0]
    assert max(errors[full_rank]) < 1e-5
    k_low, v_low = errors[full_rank // 4][0::2], errors[full_rank // 4][1::2]
    assert min(v_low) > 1e-3
    if mode != "decompressed":  # every RoPE key kept: the keys come from k_rope alone, exact at any rank
        assert max(k_low) < 1e-5
    else:
        assert min(k_low) > 1e-3


def test_command_writes_table_json_and_plots(tiny, tiny_hf, tmp_path, capsys):
    config, params = tiny
    calib = np.random.default_rng(7).integers(0, config.vocab_size, (4, 32))
    mla_config, mla_params, _ = convert(params, config, 8, "decompressed", init="pca", calib_tokens=calib)
    save_checkpoint(str(tmp_path / "student"), mla_params, mla_config)
    np.save(tmp_path / "ids.npy", np.random.default_rng(2).integers(0, 97, 256).astype(np.int32))
    out = tmp_path / "diag"
    flags = [
        "--model",
        str(tmp_path / "student"),
        "--compare",
        tiny_hf[1],
        "--data",
        str(tmp_path / "ids.npy"),
    ]
    assert main([*flags, "--tokens", "128", "--seq-len", "32", "--batch", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-token KL(teacher || model)" in printed and "topk chg" in printed
    result = json.loads((out / "diagnose.json").read_text())
    assert result["tokens"] == 128 and len(result["layers"]) == config.num_hidden_layers
    assert result["token_kl"]["mean"] > 0
    for name in ("sink_mass", "first_token_mass", "q_norm", "k_norm", "expert_load", "drift"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert main(["--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "ids.npy")]) == 1
