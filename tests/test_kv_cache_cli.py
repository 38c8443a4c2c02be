"""`python -m eval.kv_cache`: the table, the formula against real caches, the default settings' reduction."""

import json

import jax.numpy as jnp

from eval.kv_cache import main, with_mla
from gptoss_mla_jax.cache import accounting, init_cache, nbytes
from gptoss_mla_jax.config import GPT_OSS_20B
from weights.to_mla import DEFAULT_LATENT_DIM, DEFAULT_LAYERS, DEFAULT_ROPE_MODE, DEFAULT_ROPE_PAIRS


def test_default_settings_reach_75_percent_on_gpt_oss_20b(capsys):
    assert main(["--preset", "gpt-oss-20b", "--context", "32768", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reduction"] >= 0.75
    # By hand: 12 sliding layers x 128 slots x 1024 values + 12 full layers x 32768 x 192 latent values.
    assert result["total_bytes"] == 2 * (12 * 128 * 1024 + 12 * 32768 * 192)
    assert result["original_bytes"] == 2 * (12 * 128 * 1024 + 12 * 32768 * 1024)
    assert main(["--preset", "gpt-oss-20b"]) == 0
    table = capsys.readouterr().out
    assert "full MLA decompressed r=192" in table and "reduction vs the original: 80.9%" in table
    assert main(["--preset", "gpt-oss-20b", "--rope-mode", "partial", "--latent-dim", "160", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == result["total_bytes"]  # 160 + 8 * 2 * 2
    rorope = ["--rope-mode", "rorope", "--rope-components", "1", "--latent-dim", "128", "--json"]
    assert main(["--preset", "gpt-oss-20b", *rorope]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == result["total_bytes"]  # 128 + 64
    folded = ["--rope-mode", "rorope", "--rope-components", "1", "--rope-fold", "2", "--latent-dim", "160"]
    assert main(["--preset", "gpt-oss-20b", *folded, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == result["total_bytes"]  # 160 + 32


def test_formula_equals_the_real_cache_pytree():
    small = with_mla(GPT_OSS_20B, DEFAULT_LATENT_DIM, DEFAULT_ROPE_MODE, DEFAULT_ROPE_PAIRS, DEFAULT_LAYERS)
    for config in (GPT_OSS_20B, small):
        cache = init_cache(config, batch=2, max_len=512, dtype=jnp.bfloat16)
        result = accounting(config, batch=2, context=512, dtype=jnp.bfloat16)
        assert nbytes(cache) == result["total_bytes"] + cache["lengths"].nbytes


def test_model_path(tiny_hf, capsys):
    assert main(["--model", tiny_hf[1], "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "sliding GQA" in out and "full GQA" in out and "reduction vs the original: 0.0%" in out
