import json

import pytest
import transformers

from gptoss_mla_jax.config import GPT_OSS_20B, GPT_OSS_120B, ConfigError, GptOssConfig

# config.json of openai/gpt-oss-20b as published (transformers 4.55 layout: rope_scaling + rope_theta).
PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}


def test_published_config_round_trips_exactly():
    config = GptOssConfig.from_hf(PUBLISHED_20B)
    assert json.dumps(config.to_hf(), sort_keys=True) == json.dumps(PUBLISHED_20B, sort_keys=True)
    assert config.rope.rope_type == "yarn" and config.rope.truncate is False and config.rope.theta == 150000
    assert config.layer_types[0] == "sliding_attention" and config.layer_types[1] == "full_attention"
    # Everything that defines the computation agrees with the preset.
    assert config.to_hf()["num_local_experts"] == GPT_OSS_20B.num_local_experts
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
        assert getattr(config, field) == getattr(GPT_OSS_20B, field)


def test_save_pretrained_config_round_trips_exactly(tiny_hf):
    _, folder = tiny_hf
    with open(f"{folder}/config.json") as f:
        written = json.load(f)
    config = GptOssConfig.from_hf(folder)
    assert config.to_hf() == written
    assert json.dumps(config.to_hf(), sort_keys=True) == json.dumps(written, sort_keys=True)
    assert config.rope_key == "rope_parameters" and config.rope.theta == 150000.0


@pytest.mark.parametrize("preset", [GPT_OSS_20B, GPT_OSS_120B])
def test_presets_match_transformers(preset):
    hf = transformers.GptOssConfig(**{k: v for k, v in preset.to_hf().items() if k != "model_type"})
    ours = GptOssConfig.from_hf(hf.to_dict())
    assert ours.num_hidden_layers == preset.num_hidden_layers
    assert ours.layer_types == preset.layer_types
    assert ours.rope == preset.rope
    assert GptOssConfig.from_hf(preset.to_hf()) == preset


def test_truncate_defaults_to_true_when_absent():
    hf = dict(
        PUBLISHED_20B,
        rope_scaling={k: v for k, v in PUBLISHED_20B["rope_scaling"].items() if k != "truncate"},
    )
    config = GptOssConfig.from_hf(hf)
    assert config.rope.truncate is None and config.rope.yarn_truncate is True
    assert "truncate" not in config.to_hf()["rope_scaling"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": dict(PUBLISHED_20B["rope_scaling"], mscale=1.0)}, "mscale"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"layer_types": ["chunked_attention"] * 24}, "layer_types"),
        ({"attention_bias": False}, "attention_bias"),
        ({"num_experts_per_tok": 40}, "num_experts_per_tok"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        GptOssConfig.from_hf(dict(PUBLISHED_20B, **change))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GptOssConfig.from_hf(tmp_path)


def test_20b_attention_teacher_has_the_real_attention():
    """The study teacher preset `20b-attention` keeps every attention setting of gpt-oss-20b (the part MLA
    converts) and shrinks only depth, MoE and vocabulary."""
    from train.pretrain import ATTENTION_20B_CONFIG as small

    attention = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window")
    attention += ("max_position_embeddings", "rope", "rms_norm_eps")
    assert {f: getattr(small, f) for f in attention} == {f: getattr(GPT_OSS_20B, f) for f in attention}
    assert small.rope.rope_type == "yarn" and small.rope.factor == 32.0
    assert small.layer_types == ("sliding_attention", "full_attention") * 2
    assert small.num_hidden_layers == 4 and small.num_local_experts == 8 and small.vocab_size == 4096
