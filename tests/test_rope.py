import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gptoss_mla_jax.config import GPT_OSS_20B, GptOssConfig
from gptoss_mla_jax.rope import apply_rope, cos_sin, inv_freq

from .test_config import PUBLISHED_20B


def test_gpt_oss_20b_spot_values():
    f = inv_freq(GPT_OSS_20B)
    assert f.dtype == np.float32 and f.shape == (32,)
    for i, want in {0: 1.0, 1: 0.6890443, 8: 5.081327e-2, 17: 1.293187e-4, 31: 3.023511e-7}.items():
        np.testing.assert_allclose(f[i], want, rtol=1e-6)
    np.testing.assert_allclose(GPT_OSS_20B.yarn_attention_scale(), 0.1 * np.log(32) + 1, rtol=1e-12)
    np.testing.assert_allclose(GPT_OSS_20B.yarn_attention_scale(), 1.3466, atol=1e-4)


@pytest.mark.parametrize("truncate", [False, True, None])
def test_inv_freq_matches_transformers(truncate):
    rope = dict(PUBLISHED_20B["rope_scaling"])
    if truncate is None:
        del rope["truncate"]
    else:
        rope["truncate"] = truncate
    ours = GptOssConfig.from_hf(dict(PUBLISHED_20B, rope_scaling=rope))
    hf = transformers.GptOssConfig(**{k: v for k, v in ours.to_hf().items() if k != "model_type"})
    want, scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    # torch's float32 pow may differ from the correctly rounded value by 1 ulp (1.2e-7 relative).
    np.testing.assert_allclose(inv_freq(ours), want.numpy(), rtol=2.4e-7, atol=0)
    assert ours.yarn_attention_scale() == scale


def test_truncate_changes_the_frequencies():
    # Rounding the correction bounds (8.09 -> 8, 17.40 -> 18) is the bug vLLM and SGLang shipped.
    exact = inv_freq(GPT_OSS_20B)
    rope = dict(PUBLISHED_20B["rope_scaling"], truncate=True)
    rounded = inv_freq(GptOssConfig.from_hf(dict(PUBLISHED_20B, rope_scaling=rope)))
    assert not np.allclose(exact, rounded, rtol=1e-3)
    np.testing.assert_array_equal(exact[:8], rounded[:8])  # pure extrapolation below the low bound


def test_apply_rope_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import _apply_rotary_emb

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [100, 2000, 4095, 50000, 131071]], np.int32)
    cos, sin = cos_sin(jnp.asarray(positions), GPT_OSS_20B)
    ours = apply_rope(jnp.asarray(x), cos, sin)
    hf_cos = torch.from_numpy(np.array(cos))[:, :, None, :]
    hf_sin = torch.from_numpy(np.array(sin))[:, :, None, :]
    want = _apply_rotary_emb(torch.from_numpy(x), hf_cos, hf_sin).numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-6)
    # A rotation scaled by mscale: every pair's norm grows by exactly mscale.
    pair_norm = lambda a: np.hypot(a[..., :32], a[..., 32:])
    np.testing.assert_allclose(
        pair_norm(np.asarray(ours)), pair_norm(x) * GPT_OSS_20B.yarn_attention_scale(), rtol=1e-5
    )
