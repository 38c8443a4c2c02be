"""transformers model of gpt-oss whose converted layers use Multi-head Latent Attention (gptoss-mla-jax).

Only the attention of the converted layers is new; everything else is transformers' gpt-oss. The cache is
transformers' own `DynamicCache`; for a converted layer its two slots hold the latent instead of keys and
values (docs/design.md, "MLA: the math"):

    keys slot:   the latent c = h W_a          [batch, 1, seq, r]
    values slot: partial: RoPE'd keys          [batch, G, seq, 2n]
                 rorope: RoPE'd mixed keys     [batch, 1, seq, m * head_dim / F]
                 decompressed: nothing         [batch, 1, seq, 0]

so a converted layer caches r (+ G * 2n or m * head_dim / F) values per token instead of 2 * G * head_dim.
Keys and values are rebuilt from the cached latent at every step (`decompressed`: up-projection, then RoPE
at the keys' own positions; `partial`: the no-RoPE key dims and values from the latent, the kept RoPE dims
from the cache; `rorope`: the kept mixed components from the cache and the others from the latent, mixed
back per kv head by `rope_mix`, each head's key 2 * head_dim wide: RoPE'd part, then unrotated part;
FreqFold, F > 1: each group of F pairs turns at its first pair's frequency).
"""

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssAttention,
    GptOssForCausalLM,
    GptOssRotaryEmbedding,
    _apply_rotary_emb,
    eager_attention_forward,
)

from .configuration_gpt_oss_mla import GptOssMlaConfig


def rope_dims(pairs: list[list[int]], head_dim: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per kv head, the head dims that keep RoPE (the pairs' first halves, then their second halves) and
    the dims that lose it (ascending)."""
    keep = [[*row, *(p + head_dim // 2 for p in row)] for row in pairs]
    nope = [[i for i in range(head_dim) if i not in row] for row in keep]
    return keep, nope


class GptOssMlaAttention(GptOssAttention):
    """Attention of a converted layer: `kv_a_proj` (no bias) makes the cached latent, `kv_b_proj`
    up-projects it to [no-RoPE key dims, values] of every kv head (partial) or to [keys, values]
    (decompressed); `k_rope_proj` (partial) makes the kept RoPE key dims straight from the input."""

    def __init__(self, config: GptOssMlaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.k_proj, self.v_proj
        mla = config.mla
        index = mla["layers"].index(layer_idx)
        G, d = config.num_key_value_heads, self.head_dim
        self.num_kv_heads = G
        self.latent_dim = mla["latent_dims"][index]
        self.partial = mla["rope_mode"] == "partial"
        self.rorope = mla["rope_mode"] == "rorope"
        if self.rorope:
            self.components, F = mla["rope_components"][index], mla.get("rope_fold", 1)
            self.fold = F
            self.k_width = G * d - self.components * d // F  # the latent's mixed components
            width = self.k_width + G * d
            self.mscale2 = GptOssRotaryEmbedding(config).attention_scaling ** 2
            self.k_rope_proj = nn.Linear(config.hidden_size, self.components * d // F, bias=True)
            # [group of pairs, component, kv head, pair in the group]
            self.rope_mix = nn.Parameter(torch.empty(d // (2 * F), G * F, G, F))
        elif self.partial:
            # Index lists, not buffers: the model is built on the meta device and these hold no weights.
            self.pairs = mla["rope_pairs"][index]
            self.keep, self.nope = rope_dims(self.pairs, d)
            width = G * len(self.nope[0]) + G * d
            # No-RoPE dims score as RoPE at angle 0: the query carries YaRN's mscale squared on them.
            self.mscale2 = GptOssRotaryEmbedding(config).attention_scaling ** 2
            self.k_rope_proj = nn.Linear(config.hidden_size, G * len(self.keep[0]), bias=True)
        else:
            width = 2 * G * d
            self.rotary_emb = GptOssRotaryEmbedding(config)  # keys get RoPE after decompression
        self.kv_a_proj = nn.Linear(config.hidden_size, self.latent_dim, bias=False)
        self.kv_b_proj = nn.Linear(self.latent_dim, width, bias=True)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        G, d = self.num_kv_heads, self.head_dim
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # transformers < 5.24
        q = self.q_proj(hidden_states).view(B, T, -1, d).transpose(1, 2)  # [B, H, T, d]
        cos, sin = position_embeddings  # [B, T, d/2], YaRN's mscale included
        q_roped = _apply_rotary_emb(q, cos[:, None], sin[:, None])
        latent = self.kv_a_proj(hidden_states)[:, None]  # [B, 1, T, r]
        if self.partial:
            k_rope = self.k_rope_proj(hidden_states).view(B, T, G, -1)
            pairs = torch.tensor(self.pairs, device=cos.device)
            pair_cos, pair_sin = cos[:, :, pairs], sin[:, :, pairs]  # each head's own pairs
            second = (_apply_rotary_emb(k_rope, pair_cos, pair_sin)).transpose(1, 2)  # [B, G, T, 2n]
        elif self.rorope:
            F = self.fold
            k_rope = self.k_rope_proj(hidden_states).view(B, T, self.components, d // F)
            second = _apply_rotary_emb(k_rope, cos[:, :, None, ::F], sin[:, :, None, ::F]).reshape(
                B, 1, T, -1
            )
        else:
            second = latent.new_zeros(B, 1, T, 0)
        if cache is not None:
            latent, second = cache.update(latent, second, self.layer_idx)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0])  # [B, S, width]
        if self.rorope:
            m, F, u = self.components, self.fold, self.rope_mix.to(kv.dtype)
            Q = d // (2 * F)
            # Components [.., coordinate, group] back to each kv head's dims [coordinate, group, pair].
            mixed_back = lambda x, j: torch.einsum(
                "bsjcq,qjgi->bgscqi", x.reshape(B, S, -1, 2, Q), u[:, j]
            ).reshape(B, G, S, d)
            v = kv[..., self.k_width :].view(B, S, G, d).transpose(1, 2)
            kept = mixed_back(second.reshape(B, S, m, d // F), slice(None, m))
            k = torch.cat(
                [kept, mixed_back(kv[..., : self.k_width], slice(m, None))], dim=-1
            )  # [B, G, S, 2d]
            group_cos, group_sin = (t[..., ::F].repeat_interleave(F, dim=-1)[:, None] for t in (cos, sin))
            q_folded = _apply_rotary_emb(q, group_cos, group_sin)
            q = torch.cat([q_folded, q * self.mscale2], dim=-1)  # scaling stays head_dim^-0.5
        elif self.partial:
            n_nope = len(self.nope[0])
            k_nope = kv[..., : G * n_nope].view(B, S, G, n_nope).transpose(1, 2)
            v = kv[..., G * n_nope :].view(B, S, G, d).transpose(1, 2)
            k = torch.cat([second, k_nope], dim=-1)
            # Query dims in the keys' per-head order: kept RoPE dims, then the others.
            H_per_G = q.shape[1] // G
            qg, qg_roped = q.view(B, G, H_per_G, T, d), q_roped.view(B, G, H_per_G, T, d)
            index = lambda dims: torch.tensor(dims, device=q.device)[None, :, None, None, :].expand(
                B, G, H_per_G, T, -1
            )
            q = torch.cat(
                [qg_roped.gather(-1, index(self.keep)), qg.gather(-1, index(self.nope)) * self.mscale2],
                dim=-1,
            ).view(B, -1, T, d)
        else:
            k, v = kv.view(B, S, 2, G, d).unbind(2)
            # Cached keys sit at consecutive positions ending with this chunk's last query.
            key_positions = position_ids_of_keys(kwargs.get("position_ids"), cos, S, T)
            k_cos, k_sin = self.rotary_emb(hidden_states, key_positions)
            k = _apply_rotary_emb(k.transpose(1, 2), k_cos[:, None], k_sin[:, None])
            v = v.transpose(1, 2)
            q = q_roped
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            s_aux=self.sinks,
            **kwargs,
        )
        return self.o_proj(out.reshape(B, T, -1).contiguous()), weights


def position_ids_of_keys(position_ids, cos, S: int, T: int) -> torch.Tensor:
    """Positions of the S keys a chunk of T queries attends to: consecutive, ending at the last query's."""
    if position_ids is None:
        raise ValueError("gpt_oss_mla decompressed layers need position_ids to place RoPE on cached keys")
    last = position_ids[:, -1:].to(cos.device)
    return last - (S - 1) + torch.arange(S, device=cos.device)[None]


class GptOssMlaForCausalLM(GptOssForCausalLM):
    config_class = GptOssMlaConfig

    def __init__(self, config: GptOssMlaConfig):
        super().__init__(config)
        for i in config.mla["layers"]:
            self.model.layers[i].self_attn = GptOssMlaAttention(config, i)
        self.post_init()


__all__ = ["GptOssMlaForCausalLM"]
