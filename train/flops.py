"""Model FLOPs of a distillation step, and the MFU they imply on a known card.

Counted as "model FLOPs" (no rematerialisation, no softmax/norm elementwise work): 2 FLOPs per
multiply-add of every matmul a token goes through (attention projections, the router, its top-k
experts, the LM head) plus the attention's QK^T and PV over the keys each query really sees (causal,
and at most `sliding_window` keys in sliding layers). A distillation step is one teacher forward, one
student forward, and the student's backward: gradients with respect to activations through the whole
student (one more forward's worth) plus gradients with respect to the trainable matrices only
(frozen weights get none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import is_shape, param_shapes

# Dense bf16 tensor-core peak FLOP/s by device kind (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12, "GH200": 989.4e12}


def matmul_weights(config: GptOssConfig) -> dict[str, int]:
    """Multiply-adds per token of each matmul weight ("/"-joined parameter path -> in*out, experts
    scaled by the fraction of them a token uses)."""
    out = {}
    shapes = param_shapes(config)
    used = config.num_experts_per_tok / config.num_local_experts

    def visit(path: str, node) -> None:
        if is_shape(node):
            if path.endswith("kernel") or re.search(r"experts/(gate_up|down)_proj$", path):
                out[path] = math.prod(node) * (used if "experts" in path else 1)
            elif path == "lm_head" or (path == "embed_tokens" and config.tie_word_embeddings):
                out[path] = math.prod(node)
            return
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            visit(f"{path}/{k}" if path else str(k), v)

    visit("", shapes)
    return out


def attention_pairs(config: GptOssConfig, seq_len: int, layer: int) -> int:
    """(query, key) pairs a causal sequence of seq_len tokens computes in one layer."""
    if config.is_sliding(layer):
        w = config.sliding_window
        return sum(min(t + 1, w) for t in range(seq_len))
    return seq_len * (seq_len + 1) // 2


def forward_flops(config: GptOssConfig, seq_len: int) -> float:
    """Model FLOPs of one forward pass over one sequence of `seq_len` tokens."""
    matmuls = 2 * sum(matmul_weights(config).values()) * seq_len
    H, d = config.num_attention_heads, config.head_dim
    attn = sum(2 * 2 * H * d * attention_pairs(config, seq_len, i) for i in range(config.num_hidden_layers))
    return matmuls + attn


def distill_step_flops(
    teacher_config: GptOssConfig,
    student_config: GptOssConfig,
    seq_len: int,
    sequences: int,
    trainable: Callable[[str], bool],
) -> float:
    """Teacher forward + student forward + student backward over `sequences` rows of `seq_len` tokens."""
    student = forward_flops(student_config, seq_len)
    weight_grads = 2 * seq_len * sum(n for p, n in matmul_weights(student_config).items() if trainable(p))
    return sequences * (forward_flops(teacher_config, seq_len) + 2 * student + weight_grads)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The dense bf16 peak of `device` (default: the first one) if its kind is known, else None."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak * (756 / 989.4 if name == "H100" and "PCIe" in kind else 1)
    return None
