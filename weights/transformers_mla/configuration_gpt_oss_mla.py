"""transformers configuration of gpt-oss with Multi-head Latent Attention layers (gptoss-mla-jax export).

Everything of gpt-oss, plus an `mla` section: {"rope_mode": "decompressed" | "partial" | "rorope", "layers":
[i, ...], "latent_dims": [r_i, ...], "rope_pairs": per converted layer, per kv head, the RoPE pairs kept
(partial), "rope_components": per converted layer, the mixed components kept per pair (rorope)}.
"""

from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig


class GptOssMlaConfig(GptOssConfig):
    model_type = "gpt_oss_mla"

    def __init__(self, mla: dict | None = None, **kwargs):
        self.mla = mla
        super().__init__(**kwargs)
