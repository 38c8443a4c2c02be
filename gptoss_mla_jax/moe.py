"""The mixture of experts: a top-k router and clamped-SwiGLU experts.

Router: `logits = x W_r + b_r`, keep the top-k, softmax over those k only. Expert e:
`gu = x W1[e] + b1[e]`, gate = gu[..., 0::2], up = gu[..., 1::2] (interleaved), gate clamped above and up
on both sides at `swiglu_limit`, `glu = gate * sigmoid(alpha * gate)`, `y = ((up + 1) * glu) W2[e] + b2[e]`.

Expert weights come dense (`gate_up_proj` [E, D, 2I], `down_proj` [E, I, D]) or packed in MXFP4 as the
checkpoint stores them (`*_blocks` / `*_scales`, [E, out, in / 32, ...]), in which case they are
dequantized inside the computation (4x less memory to hold; see `gptoss_mla_jax.mxfp4`).

Two paths that must agree: `moe_dense` runs every expert on every token (the readable reference), and
`moe_sparse` (the default) sorts token-expert pairs by expert and runs only the selected experts with
the Pallas grouped matmul of `gmm` on the GPU (`jax.lax.ragged_dot` elsewhere, which XLA on CUDA lowers
densely over all experts), so its FLOPs scale with k, not with the number of experts; at decode (fewer
token-expert pairs than experts) it gathers the selected experts' weights instead, so a step reads only
those from memory; a decode step on the kernels (`kernels`) takes the grouped matmul (where the wide-batch
kernel below does not), each selected expert's packed weights read and decoded once, and routes decode
batches in one Pallas
program (`routing.decode_routing`: router, top-k, softmax and the grouped layout): `expert_rows`, whose
rows the model's decode step sums with its residual add in one kernel (`add_norm`) and `moe_sparse` in jnp.
Batches of 16 tokens and more (`wide_batch`: decode batches and prefill) whose experts carry the Mosaic
GPU kernel's layout (`WIDE`, made by `model.with_wide_experts`) take that kernel instead (`gmm_mosaic`:
32- or 64-row tiles by the batch, the products transposed; `WIDE_CHUNK` tokens at a time), forward only
(a gradient through it raises).
Experts may hold that layout alone (`with_wide_experts(..., replace=True)`: their bytes held once); every
token count then takes the kernel, and the paths that read the checkpoint's layout refuse them
(`checkpoint_experts`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax import gmm_mosaic, routing
from gptoss_mla_jax.add_norm import ExpertRows, moe_delta
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.flash_decode import runs_compiled
from gptoss_mla_jax.gmm import Glu, Mxfp4, count_at_or_below, gmm, grouped_product
from gptoss_mla_jax.mxfp4 import dequantize, dequantize_experts

Params = dict[str, Any]
WIDE = "wide"  # an MLP's experts' entry of `gmm_mosaic.WideExperts`, made by `model.with_wide_experts`
# The token-expert pairs an expert gets on average from which n tokens take the wide-batch kernel where
# their experts carry its layout: 2 (16 tokens at gpt-oss's top 4 of 32), where the layer measured faster on
# it than on the grouped matmul, at every batch from 16 to 4,096 (docs/decode.md; at 8 they tie, at 1 the
# grouped matmul takes 0.6x its time).
WIDE_MIN_PAIRS = 2
# Tokens the wide-batch kernel takes at a time: its layout's all-pairs comparisons (`_jnp_layout`) grow
# with the square of the tokens (355 us of 2.87 ms at 4,096 tokens a layer; 2,048 took 1.18 ms).
WIDE_CHUNK = 2048
# How grouped token-expert pairs are multiplied: "auto" takes the Pallas kernel on a GPU that can lower it
# and ragged_dot elsewhere; "gmm" the kernel everywhere (interpreted, slowly, off the GPU).
Grouped = Literal["auto", "gmm", "ragged_dot"]


def route(
    p: Params, x: Float[Array, "N D"], config: GptOssConfig
) -> tuple[Float[Array, "N k"], Int[Array, "N k"]]:
    """Top-k expert indices per token and their weights (softmax over the k chosen logits)."""
    logits = x @ p["router"]["kernel"] + p["router"]["bias"]
    top_logits, top_idx = jax.lax.top_k(logits, config.num_experts_per_tok)
    return jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1), top_idx


def glu(config: GptOssConfig) -> Glu:
    return Glu(config.swiglu_alpha, config.swiglu_limit)


def swiglu(gate_up: Float[Array, "... F2"], config: GptOssConfig) -> Float[Array, "... F"]:
    return glu(config)(gate_up)


def checkpoint_experts(experts: Params) -> Params:
    """`experts` as the checkpoint lays them out, for a path that reads that layout; a ValueError for experts
    that hold only the wide-batch kernel's (`model.with_wide_experts(..., replace=True)`)."""
    if "gate_up_proj" not in experts and "gate_up_proj_blocks" not in experts:
        raise ValueError(
            "the experts hold only the wide-batch kernel's layout (model.with_wide_experts(..., "
            "replace=True)), which only its forward reads (bf16 activations, a CUDA GPU or the interpreter); "
            "this path needs the checkpoint's: keep it (replace=False) or load the weights again"
        )
    return experts


def expert_matrices(experts: Params, dtype) -> tuple[Float[Array, "E D F2"], Float[Array, "E F D"]]:
    """(gate_up [E, D, 2I], down [E, I, D]) as dense matrices, dequantizing MXFP4-packed experts."""
    if "gate_up_proj" in checkpoint_experts(experts):
        return experts["gate_up_proj"], experts["down_proj"]
    dense = lambda name: dequantize_experts(experts[f"{name}_blocks"], experts[f"{name}_scales"], dtype)
    return dense("gate_up_proj"), dense("down_proj")


def moe_dense(
    p: Params,
    x: Float[Array, "B T D"],
    config: GptOssConfig,
    routing: tuple[Float[Array, "N k"], Int[Array, "N k"]] | None = None,
) -> Float[Array, "B T D"]:
    """Reference: every expert on every token, combined with the (mostly zero) routing weights; `routing`
    (weights, experts per token, as `route` gives them) in place of the router's own, e.g. to compare
    another precision's experts on the same routing."""
    flat = x.reshape(-1, x.shape[-1])
    weights, idx = route(p, flat, config) if routing is None else routing
    e = p["experts"]
    w_gate_up, w_down = expert_matrices(e, x.dtype)
    combine = jnp.zeros((flat.shape[0], config.num_local_experts), jnp.float32)
    combine = combine.at[jnp.arange(flat.shape[0])[:, None], idx].set(weights)
    h = swiglu(jnp.einsum("nd,edf->nef", flat, w_gate_up) + e["gate_up_proj_bias"], config)
    y = jnp.einsum("nef,efd->ned", h, w_down) + e["down_proj_bias"]
    out = jnp.einsum("ne,ned->nd", combine.astype(y.dtype), y, preferred_element_type=jnp.float32)
    return out.astype(x.dtype).reshape(x.shape)


def moe_sparse(
    p: Params,
    x: Float[Array, "B T D"],
    config: GptOssConfig,
    kernels: bool = False,
    grouped: Grouped = "auto",
) -> Float[Array, "B T D"]:
    """Only the selected experts. `kernels` (a decode step on the Pallas kernels), or experts carrying the
    wide-batch kernel's layout with `grouped` "auto": `expert_rows` (the wide-batch kernel where
    `takes_wide`, else the pairs grouped by expert on the grouped matmul; interpreted off the GPU).
    Otherwise few token-expert pairs (decode: fewer than there are experts) gather their experts' weights,
    so a step reads k experts per token, not all of them, and more pairs are grouped by expert and
    multiplied as `grouped` says."""
    flat = x.reshape(-1, x.shape[-1])
    n, k = flat.shape[0], config.num_experts_per_tok
    if kernels or (grouped == "auto" and takes_wide(p, n, config, x.dtype)):
        # `expert_rows` (a decode step's MoE on the kernels, or n tokens on the wide-batch kernel), summed
        # in jnp rather than in `add_norm`'s kernel
        return moe_delta(expert_rows(p, x, config), n, x.dtype).reshape(x.shape)
    weights, idx = route(p, flat, config)
    if n * k < config.num_local_experts:
        y = _selected_experts(p["experts"], flat, idx, config)
    else:
        kernel = grouped == "gmm" or (grouped == "auto" and runs_compiled())
        y = _grouped_experts(p["experts"], flat, idx, config, kernel)
    out = jnp.einsum("nk,nkd->nd", weights.astype(y.dtype), y, preferred_element_type=jnp.float32)
    return out.astype(x.dtype).reshape(x.shape)


def expert_rows(
    p: Params,
    x: Float[Array, "B T D"],
    config: GptOssConfig,
    router_partials: Float[Array, "S N E"] | None = None,
) -> ExpertRows:
    """The MoE of a decode step on the kernels, or of n tokens on the wide-batch kernel (`takes_wide`:
    prefill too), up to its weighted sum (`moe_sparse(..., kernels=True)` is `add_norm.moe_delta` of this):
    the down product's rows, its contraction splits' partial sums not yet added, and each token's slots and
    routing weights, for `add_norm.add_norm` to finish with the residual add and the next norm in one
    kernel. `router_partials`: the router's product x W already taken, as
    partial sums (`add_norm.add_norm_routed`; for n tokens that `routed_in_kernel`). The aligned layout's
    rows are gathered from the tokens by XLA (one small kernel): loaded by the gate_up product's kernel
    instead, row by row, they measured slower (docs/decode.md). One token's rows are all its row, which the
    kernel reads once (`grouped_product(..., broadcast=)`): no gather."""
    flat = x.reshape(-1, x.shape[-1])
    n, k, E = flat.shape[0], config.num_experts_per_tok, config.num_local_experts
    if takes_wide(p, n, config, flat.dtype):
        return _forward_only(p, flat, config)
    align = layout_align(n, config)
    if align is None:  # past decode batches: the pairs sorted by expert
        weights, idx = route(p, flat, config)
        y = _grouped_experts(p["experts"], flat, idx, config, kernel=True)
        return ExpertRows(y.reshape(1, n * k, -1), jnp.arange(n * k, dtype=jnp.int32).reshape(n, k), weights)
    height = routing.layout_rows(n, k, E, align)
    if routed_in_kernel(n, config):
        # The routing's tiles as the kernel stores them: a Pallas consumer would read copies cut from them.
        router, interpret = p["router"], not runs_compiled()
        if router_partials is None:
            routed = routing.decode_routing(
                flat, router["kernel"], router["bias"], k, align, interpret, tiles=True
            )
        else:
            routed = routing.routing_of_logits(
                router_partials, router["bias"], k, align, flat.dtype, interpret, tiles=True
            )
        slot, padded, weights, row_token = routed.slot, routed.padded, routed.weights, routed.row_token
    else:  # more tokens than the routing kernel holds: the same layout in jnp
        slot, padded, weights, row_token = _jnp_layout(p, flat, config, align, height)
    # A padding row (-1) reads token 0's row (its products are never read); no index reads past the tokens.
    rows = flat if n == 1 else flat[jnp.clip(row_token[:height], 0, n - 1)]
    one_token = height if n == 1 else None
    product = _expert_products(p["experts"], rows, padded, config, align, partials=True, broadcast=one_token)
    return ExpertRows(product, slot, weights)


def _jnp_layout(
    p: Params, flat: Float[Array, "N D"], config: GptOssConfig, align: int, height: int
) -> tuple[Int[Array, "N k"], Int[Array, " E"], Float[Array, "N k"], Int[Array, " H"]]:
    """n tokens' routing and their pairs' layout aligned to `align` rows in jnp (what the routing kernel
    computes for up to `routing.MAX_TOKENS`): each token's slots, the padded group sizes, the routing
    weights and each of the layout's `height` rows' token (-1: padding)."""
    n, k, E = flat.shape[0], config.num_experts_per_tok, config.num_local_experts
    weights, idx = route(p, flat, config)
    slot, padded = _aligned_slots(idx.reshape(-1), E, align)
    # Each row's token by comparing every row with every pair (one fused reduction), not by a scatter
    # into a buffer of -1, which XLA would copy for each layer of a device loop.
    token = jnp.arange(n * k, dtype=jnp.int32) // k
    hit = slot[None, :] == jnp.arange(height, dtype=slot.dtype)[:, None]
    row_token = jnp.sum(jnp.where(hit, token[None, :] + 1, 0), axis=1, dtype=jnp.int32) - 1
    return slot.reshape(n, k), padded, weights, row_token


def wide_batch(n: int, config: GptOssConfig) -> bool:
    """Whether n tokens take the wide-batch kernel where their experts carry its layout beside the
    checkpoint's."""
    return n * config.num_experts_per_tok >= WIDE_MIN_PAIRS * config.num_local_experts


def wide_alone(experts: Params) -> bool:
    """Whether one layer's experts hold only the wide-batch kernel's layout (`model.with_wide_experts`'
    `replace`)."""
    return WIDE in experts and "gate_up_proj_blocks" not in experts


def takes_wide(p: Params, n: int, config: GptOssConfig, dtype) -> bool:
    """Whether n tokens' MoE runs on the wide-batch kernel: its experts carrying the kernel's layout, and
    either a wide batch (bf16 activations) or that layout alone (which needs bf16). It routes in jnp, so a
    decode step does not take the router's product in the residual add's kernel for it (`model`)."""
    experts = p["experts"]
    if WIDE not in experts:
        return False
    if not wide_alone(experts):
        return wide_batch(n, config) and dtype == jnp.bfloat16
    if dtype != jnp.bfloat16:
        raise ValueError(
            f"the experts hold only the wide-batch kernel's layout, which multiplies bf16 activations; got "
            f"{jnp.dtype(dtype).name} (a model in bf16, or the checkpoint's layout kept: "
            "model.with_wide_experts(..., replace=False))"
        )
    return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _forward_only(p: Params, flat: Float[Array, "N D"], config: GptOssConfig) -> ExpertRows:
    """`_wide_rows_chunked`, whose gradient raises a ValueError that says why (the Mosaic GPU kernel has
    none; without this, JAX fails on its transpose with a bare assertion)."""
    return _wide_rows_chunked(p, flat, config)


def _forward_only_fwd(p, flat, config):
    return _wide_rows_chunked(p, flat, config), None


def _forward_only_bwd(config, residuals, cotangents):
    raise ValueError(
        "the wide-batch MXFP4 kernel runs forward only: differentiate params without its layout "
        "(model.without_wide_experts, or the checkpoint's experts loaded again)"
    )


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


def _wide_rows_chunked(p: Params, flat: Float[Array, "N D"], config: GptOssConfig) -> ExpertRows:
    """`_wide_rows` of up to `WIDE_CHUNK` tokens at a time (whole chunks in one loop, then the rest), their
    rows one after the other and each token's slots into them."""
    n, k, wide = flat.shape[0], config.num_experts_per_tok, p["experts"][WIDE]
    if n <= WIDE_CHUNK:
        return _wide_rows(p, flat, wide, config)
    chunks = n // WIDE_CHUNK
    whole = flat[: chunks * WIDE_CHUNK].reshape(chunks, WIDE_CHUNK, -1)
    mapped = jax.lax.map(lambda rows: _wide_rows(p, rows, wide, config), whole)  # rows [C, 1, H, D]
    offsets = mapped.rows.shape[2] * jnp.arange(chunks, dtype=mapped.slot.dtype)[:, None, None]
    parts = [
        ExpertRows(
            mapped.rows.reshape(1, -1, flat.shape[1]),
            (mapped.slot + offsets).reshape(-1, k),
            mapped.weights.reshape(-1, k),
        )
    ]
    if n > chunks * WIDE_CHUNK:
        parts.append(_wide_rows(p, flat[chunks * WIDE_CHUNK :], wide, config))
    starts = np.cumsum([0] + [part.rows.shape[1] for part in parts[:-1]])
    return ExpertRows(
        jnp.concatenate([part.rows for part in parts], axis=1),
        jnp.concatenate([part.slot + int(start) for part, start in zip(parts, starts, strict=True)]),
        jnp.concatenate([part.weights for part in parts]),
    )


def _wide_rows(
    p: Params, flat: Float[Array, "N D"], wide: gmm_mosaic.WideExperts, config: GptOssConfig
) -> ExpertRows:
    """`expert_rows` on the wide-batch kernel (`gmm_mosaic`): the layout aligned to the launches' row tiles
    (by the batch's pairs an expert: `gmm_mosaic.at_pairs`) and gathered by XLA (one kernel), gate_up with its
    SwiGLU, whose output (transposed) is down's input as it is, and down's output as rows (transposed back for
    the weighted sum unless its launch writes rows)."""
    n, k, E = flat.shape[0], config.num_experts_per_tok, config.num_local_experts
    interpret = not runs_compiled()
    launch = {name: gmm_mosaic.at_pairs(at, n * k / E) for name, at in gmm_mosaic.LAUNCH.items()}
    tile = launch["gate_up"].rows
    if launch["down"].rows != tile:
        raise ValueError(f"wide-batch launches {launch}: both products must take the layout's tiles alike")
    height = routing.layout_rows(n, k, E, tile)
    slot, padded, weights, row_token = _jnp_layout(p, flat, config, tile, height)
    rows = flat[jnp.clip(row_token, 0, n - 1)]  # a padding row reads token 0's row
    tiles_end = jnp.cumsum(padded // tile)
    tile_expert = count_at_or_below(tiles_end, jnp.arange(height // tile, dtype=jnp.int32))  # G: past them
    hidden = gmm_mosaic.product_t(
        rows, tile_expert, wide.gate_up, wide.gate_up_bias, glu=glu(config), launch=launch["gate_up"],
        interpret=interpret,
    )  # fmt: skip
    out = gmm_mosaic.product_t(
        hidden, tile_expert, wide.down, wide.down_bias, transposed=True, launch=launch["down"],
        interpret=interpret,
    )  # fmt: skip
    if not launch["down"].rows_out:
        # transposed by a kernel of its own: read transposed by the weighted sum's gather, it cost more
        out = jax.lax.optimization_barrier(out.T)
    return ExpertRows(out[None], slot, weights)


def routed_in_kernel(n: int, config: GptOssConfig) -> bool:
    """Whether n tokens' routing and aligned layout come from the routing kernel."""
    return n <= routing.MAX_TOKENS and layout_align(n, config) is not None


def _selected_experts(
    experts: Params, flat: Float[Array, "N D"], idx: Int[Array, "N k"], config: GptOssConfig
) -> Float[Array, "N k D"]:
    """Each token through each of its k experts, reading only those experts' weights. MXFP4-packed ones
    are gathered packed and dequantized in the file's [out, in] orientation, which the matmuls read
    directly (rows contiguous along the contraction)."""
    if "gate_up_proj" in checkpoint_experts(experts):  # dense, [E, in, out]
        w_gate_up, w_down, spec = experts["gate_up_proj"][idx], experts["down_proj"][idx], "nki,nkio->nko"
    else:
        packed = lambda name: dequantize(
            experts[f"{name}_blocks"][idx], experts[f"{name}_scales"][idx], flat.dtype
        )
        w_gate_up, w_down, spec = packed("gate_up_proj"), packed("down_proj"), "nki,nkoi->nko"
    x = jnp.broadcast_to(flat[:, None], (*idx.shape, flat.shape[-1]))
    gate_up = jnp.einsum(spec, x, w_gate_up) + experts["gate_up_proj_bias"][idx]
    return jnp.einsum(spec, swiglu(gate_up, config), w_down) + experts["down_proj_bias"][idx]


# At decode batches the kernel path lays each expert's pairs out from a multiple of a row tile, the grouped
# matmul's row tile there (`layout_align`): no tile then mixes experts, so each selected expert's weights
# are read and decoded once per step rather than once for every expert in each tile. The tile is at least
# twice the pairs an expert gets on average, so that few experts spill into a second, mostly empty tile,
# which decodes their weights again (32-row tiles at batch 256, about 32 pairs an expert, took twice the
# time of batch 64's 16-row ones); past MAX_ALIGN rows (prefill) the pairs are sorted instead.
ALIGN = 16
MAX_ALIGN = 64


def layout_align(n: int, config: GptOssConfig) -> int | None:
    """The row tile that n tokens' pairs are aligned to: the smallest power of two from ALIGN that is at
    least twice the pairs an expert gets on average, or None past MAX_ALIGN (the sorted layout)."""
    mean = -(-n * config.num_experts_per_tok // config.num_local_experts)
    align = max(ALIGN, 1 << (2 * mean - 1).bit_length())
    return align if align <= MAX_ALIGN else None


def _aligned_slots(
    expert: Int[Array, " P"], experts: int, align: int
) -> tuple[Int[Array, " P"], Int[Array, " E"]]:
    """Where each token-expert pair (in token order) goes when every one of the `experts` experts' pairs
    start at a multiple of `align` rows, in token order within an expert, and the padded group sizes
    (`routing.decode_routing` computes the same in its kernel). The group sizes and a pair's rank among its
    expert's pairs are counted by comparing all pairs (a decode batch's few hundred), not by bincount's
    scatter or a sort: XLA fuses the comparisons with the slots' arithmetic."""
    sizes = jnp.sum(expert[:, None] == jnp.arange(experts), axis=0, dtype=jnp.int32)
    padded = -(-sizes // align) * align
    start = jnp.cumsum(padded) - padded
    P = expert.shape[0]
    earlier = jnp.arange(P)[None, :] < jnp.arange(P)[:, None]
    rank = jnp.sum((expert[None, :] == expert[:, None]) & earlier, axis=1, dtype=jnp.int32)
    return start[expert] + rank, padded


def _aligned_experts(
    e: Params,
    rows: Float[Array, "M D"],
    slot: Int[Array, " P"],
    padded: Int[Array, " E"],
    config: GptOssConfig,
    align: int,
) -> Float[Array, "P D"]:
    """The pairs (token-major: pair p is token p // k) through their experts on the grouped matmul, laid
    out at `slot` (`rows`, `_aligned_rows`) with each expert's group of `padded` rows starting at a multiple
    of `align`."""
    y = _expert_products(e, rows, padded, config, align).at[slot].get(unique_indices=True)
    # The rows back in token order as a buffer of their own: fused into the weighted sum that follows, the
    # gather kept XLA from fusing that sum with the residual add and the next norm (a kernel more per
    # layer).
    return jax.lax.optimization_barrier(y)


def _aligned_rows(
    flat: Float[Array, "N D"], slot: Int[Array, " P"], experts: int, k: int, align: int
) -> Float[Array, "M D"]:
    """Each of the token rows' k pairs placed at its slot of the layout aligned to `align` rows over
    `experts` experts (rows of padding zero)."""
    height = routing.layout_rows(flat.shape[0], k, experts, align)  # the most rows the layout can need
    # Every pair has a slot of its own: unique indices, so the gradient needs no scatter-add of repeats.
    rows = jnp.zeros((height, flat.shape[1]), flat.dtype)
    return rows.at[slot].set(jnp.repeat(flat, k, axis=0), unique_indices=True)


def _grouped_experts(
    e: Params, flat: Float[Array, "N D"], idx: Int[Array, "N k"], config: GptOssConfig, kernel: bool
) -> Float[Array, "N k D"]:
    """Token-expert pairs grouped by expert, each expert's rows multiplied at once: with the Pallas grouped
    matmul (`kernel`; MXFP4 experts used packed, biases added in the kernel; at decode batches each
    expert's rows aligned to the row tile, placed without sorting) or ragged_dot."""
    n, k = idx.shape
    expert, E = idx.reshape(-1), config.num_local_experts
    align = layout_align(n, config)
    if kernel and align is not None:
        slot, padded = _aligned_slots(expert, E, align)
        rows = _aligned_rows(flat, slot, E, k, align)
        return _aligned_experts(e, rows, slot, padded, config, align).reshape(n, k, -1)
    group_sizes = jnp.bincount(expert, length=E).astype(jnp.int32)
    order = jnp.argsort(expert, stable=True)
    # Pairs permuted, not tokens gathered k times: the gradient of a gather with repeated indices is a
    # scatter-add, which XLA's deterministic mode (reproducible training) sorts element by element; a
    # permutation's gather and scatter have unique indices and need no sorting.
    rows = jnp.repeat(flat, k, axis=0).at[order].get(unique_indices=True)
    if kernel:
        y = _expert_products(e, rows, group_sizes, config, None)
    else:
        sorted_expert = expert[order]
        w_gate_up, w_down = expert_matrices(e, flat.dtype)
        gate_up = jax.lax.ragged_dot(rows, w_gate_up, group_sizes) + e["gate_up_proj_bias"][sorted_expert]
        y = jax.lax.ragged_dot(swiglu(gate_up, config), w_down, group_sizes)
        y = y + e["down_proj_bias"][sorted_expert]
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(n, k, -1)  # back in token order


def _expert_products(
    e: Params, rows: Float[Array, "M D"], group_sizes: Int[Array, " E"], config: GptOssConfig,
    tile, partials: bool = False, broadcast: int | None = None,
) -> Float[Array, "M D"] | Float[Array, "S M D"]:  # fmt: skip
    """Both expert projections of rows grouped by expert, on the grouped matmul (`tile`: its row tile,
    for groups starting at multiples of it: the decode layout, where the SwiGLU runs in the gate_up
    product's kernel, a kernel less per layer; elsewhere after it, as its gradient would recompute the
    product). `partials` (forward only: the decode step's): the down product's contraction splits' sums
    not yet added (`gmm.grouped_product`); `broadcast`: rows is one token's row standing for that many
    rows of the layout (there, every row is its row)."""
    e = checkpoint_experts(e)
    weights = lambda name: e[name] if name in e else Mxfp4(e[f"{name}_blocks"], e[f"{name}_scales"])
    gate_up, bias = weights("gate_up_proj"), e["gate_up_proj_bias"]
    if tile is None:
        hidden = swiglu(gmm(rows, gate_up, group_sizes, bias), config)
    elif partials:
        hidden = grouped_product(
            rows, gate_up, group_sizes, bias, rows=tile, glu=glu(config), broadcast=broadcast
        )
    else:
        hidden = gmm(rows, gate_up, group_sizes, bias, rows=tile, glu=glu(config))
    down, down_bias = weights("down_proj"), e["down_proj_bias"]
    if partials:
        return grouped_product(hidden, down, group_sizes, down_bias, rows=tile, partials=True)
    return gmm(hidden, down, group_sizes, down_bias, rows=tile)
