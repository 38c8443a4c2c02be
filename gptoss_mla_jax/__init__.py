"""gpt-oss in JAX / Flax NNX, with grouped-query attention convertible to Multi-head Latent Attention.

Generation is `gptoss_mla_jax.generation.generate` (not re-exported here: the name would clash with the
`gptoss_mla_jax.generate` command-line module once that is imported)."""

from gptoss_mla_jax.cache import init_cache
from gptoss_mla_jax.config import GPT_OSS_20B, GPT_OSS_120B, GptOssConfig
from gptoss_mla_jax.model import ForwardOptions, ForwardOutput, GptOss, forward, forward_jit, init_params

__all__ = [
    "GPT_OSS_20B",
    "GPT_OSS_120B",
    "ForwardOptions",
    "ForwardOutput",
    "GptOss",
    "GptOssConfig",
    "forward",
    "forward_jit",
    "init_cache",
    "init_params",
]
