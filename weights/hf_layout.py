"""Where each parameter of our pytree lives in a transformers gpt-oss checkpoint.

transformers' `nn.Linear` stores `[out, in]`; we store `[in, out]` (`x @ kernel`), so linear weights are
transposed on the way in and out. The dequantized expert tensors are already input-dimension first;
MXFP4 blocks and scales keep the checkpoint's own [E, out, in/32, ...] layout.
"""

from __future__ import annotations

import dataclasses

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import ExpertFormat, expert_shapes, param_shapes


@dataclasses.dataclass(frozen=True)
class HfTensor:
    name: str  # tensor name in the safetensors files
    path: tuple  # key path into our params pytree
    transpose: bool  # stored [out, in] in the file

    def file_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The parameter's shape as the file stores it."""
        return tuple(param_shape[::-1] if self.transpose else param_shape)


# MLA projections of a converted layer: params key -> module name in the safetensors files.
MLA_PROJECTIONS = {"kv_a": "kv_a_proj", "kv_b": "kv_b_proj", "k_rope": "k_rope_proj"}


def hf_tensors(config: GptOssConfig, experts: ExpertFormat = "dense") -> list[HfTensor]:
    """Every tensor of a checkpoint with experts stored `dense` or packed in `mxfp4`, in file order."""
    out = [HfTensor("model.embed_tokens.weight", ("embed_tokens",), False)]
    out.append(HfTensor("model.norm.weight", ("norm",), False))
    if not config.tie_word_embeddings:
        out.append(HfTensor("lm_head.weight", ("lm_head",), True))
    for i in range(config.num_hidden_layers):
        pre, layer = f"model.layers.{i}.", ("layers", i)
        out += [
            HfTensor(pre + "input_layernorm.weight", (*layer, "input_layernorm"), False),
            HfTensor(pre + "post_attention_layernorm.weight", (*layer, "post_attention_layernorm"), False),
            HfTensor(pre + "self_attn.sinks", (*layer, "self_attn", "sinks"), False),
        ]
        converted = config.is_mla(i)
        projections = ["q_proj", "o_proj", *(("kv_a", "kv_b") if converted else ("k_proj", "v_proj"))]
        if converted and config.mla.partial_rope:
            projections.append("k_rope")
        if converted and config.mla.rope_mode == "rorope":
            out.append(HfTensor(pre + "self_attn.rope_mix", (*layer, "self_attn", "rope_mix"), False))
        for proj in projections:
            hf_name = MLA_PROJECTIONS.get(proj, proj)
            out.append(
                HfTensor(f"{pre}self_attn.{hf_name}.weight", (*layer, "self_attn", proj, "kernel"), True)
            )
            if proj != "kv_a":  # the latent's down-projection has no bias
                out.append(
                    HfTensor(f"{pre}self_attn.{hf_name}.bias", (*layer, "self_attn", proj, "bias"), False)
                )
        out.append(HfTensor(pre + "mlp.router.weight", (*layer, "mlp", "router", "kernel"), True))
        out.append(HfTensor(pre + "mlp.router.bias", (*layer, "mlp", "router", "bias"), False))
        for name in expert_shapes(config, experts):
            out.append(HfTensor(f"{pre}mlp.experts.{name}", (*layer, "mlp", "experts", name), False))
    return out


def lookup(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def file_shapes(config: GptOssConfig, experts: ExpertFormat = "dense") -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint layout -> its shape in the file."""
    shapes = param_shapes(config, experts)
    return {t.name: t.file_shape(lookup(shapes, t.path)) for t in hf_tensors(config, experts)}
