"""gpt-oss: the pure forward function over a plain params pytree, and a thin Flax NNX shell around it.

Params pytree (weights stored input-dimension first, `x @ kernel`):

    {"embed_tokens": [V, D], "norm": [D], "lm_head": [D, V] (absent when tied),
     "layers": [{"input_layernorm": [D], "post_attention_layernorm": [D],
                 "self_attn": {"q_proj": {"kernel": [D, H*d], "bias": [H*d]}, "k_proj": ..., "v_proj": ...,
                               "o_proj": {"kernel": [H*d, D], "bias": [D]}, "sinks": [H]},
                 "mlp": {"router": {"kernel": [D, E], "bias": [E]},
                         "experts": {"gate_up_proj": [E, D, 2I], "gate_up_proj_bias": [E, 2I],
                                     "down_proj": [E, I, D], "down_proj_bias": [E, D]}}}, ...]}

Experts may instead be held packed in MXFP4 exactly as checkpoints store them: `gate_up_proj_blocks`
uint8 [E, 2I, D/32, 16] and `gate_up_proj_scales` uint8 [E, 2I, D/32] in place of `gate_up_proj`, and
likewise for `down_proj` ([E, D, I/32, ...]); see `ExpertFormat`.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from gptoss_mla_jax import cache as kv_cache
from gptoss_mla_jax import gmm_mosaic
from gptoss_mla_jax.add_norm import add_norm, add_norm_routed
from gptoss_mla_jax.attention import Chunk, attention, chunk_at
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.execution import ForwardOptions, by_rows
from gptoss_mla_jax.flash_decode import runs_compiled
from gptoss_mla_jax.mla import (
    DECODE_KEYS,
    UP,
    attention_mla,
    mla_param_shapes,
    with_decode_keys,
    with_up_projections,
)
from gptoss_mla_jax.moe import (
    WIDE,
    checkpoint_experts,
    expert_rows,
    moe_dense,
    moe_sparse,
    routed_in_kernel,
    takes_wide,
    wide_alone,
)
from gptoss_mla_jax.mxfp4 import aligned_groups, pad_scales
from gptoss_mla_jax.norm import rms_norm

Params = dict[str, Any]
ExpertFormat = Literal["dense", "mxfp4"]


def expert_shapes(config: GptOssConfig, experts: ExpertFormat) -> dict[str, tuple[int, ...]]:
    D, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
    biases = {"gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, D)}
    if experts == "dense":
        return {"gate_up_proj": (E, D, 2 * I), "down_proj": (E, I, D), **biases}
    for name, n_in in (("hidden_size", D), ("intermediate_size", I)):
        if n_in % 32:
            raise ValueError(f"MXFP4 experts need {name} to be a multiple of 32, got {n_in}")
    return {
        "gate_up_proj_blocks": (E, 2 * I, D // 32, 16),
        "gate_up_proj_scales": (E, 2 * I, D // 32),
        "down_proj_blocks": (E, D, I // 32, 16),
        "down_proj_scales": (E, D, I // 32),
        **biases,
    }


# The logical axis of each dimension of every parameter, by its name (the last one or two keys of its path;
# `param_shapes` gives the sizes): "vocab", "embed" (the hidden size), "heads" (query or kv heads x head
# dim), "experts", "expert_in" (an expert's input width). A mesh maps them to its axes with one rules object
# (`sharding.AxisRules`). Parameters not named here (norms, sinks, biases) are never split.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "router/kernel": ("embed", None),
    **{f"{name}/kernel": ("embed", "heads") for name in ("q_proj", "k_proj", "v_proj", "k_rope")},
    "o_proj/kernel": ("heads", "embed"),
    "kv_a/kernel": ("embed", None),  # the MLA latent is small: replicated
    "kv_b/kernel": (None, "heads"),
    **{name: ("experts", "expert_in", None) for name in ("gate_up_proj", "down_proj")},
    **{f"{name}_blocks": ("experts", None, None, None) for name in ("gate_up_proj", "down_proj")},
    **{f"{name}_scales": ("experts", None, None) for name in ("gate_up_proj", "down_proj")},
    **{f"{name}_bias": ("experts", None) for name in ("gate_up_proj", "down_proj")},
}


def path_keys(path: tuple) -> list[str]:
    """A parameter's path as strings: its keys, from plain keys or jax key-path entries alike."""
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at `path` (its keys, or jax key-path entries) with `ndim` dims."""
    names = path_keys(path)
    for name in ("/".join(names[-2:]), names[-1]):
        if name in PARAM_AXES:
            return PARAM_AXES[name]
    return (None,) * ndim


def expert_format(params: Params) -> ExpertFormat:
    experts = params["layers"][0]["mlp"]["experts"] if params.get("layers") else {}
    return "mxfp4" if "gate_up_proj_blocks" in experts or WIDE in experts else "dense"


def param_shapes(config: GptOssConfig, experts: ExpertFormat = "dense") -> Params:
    """The shape of every parameter, as a pytree with the same structure as the params."""
    D, V, d = config.hidden_size, config.vocab_size, config.head_dim
    H, G, E = config.num_attention_heads, config.num_key_value_heads, config.num_local_experts
    linear = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}
    layer = {
        "input_layernorm": (D,),
        "post_attention_layernorm": (D,),
        "self_attn": {
            "q_proj": linear(D, H * d),
            "k_proj": linear(D, G * d),
            "v_proj": linear(D, G * d),
            "o_proj": linear(H * d, D),
            "sinks": (H,),
        },
        "mlp": {
            "router": linear(D, E),
            "experts": expert_shapes(config, experts),
        },
    }
    layers = [
        {**layer, "self_attn": mla_param_shapes(config, i)} if config.is_mla(i) else layer
        for i in range(config.num_hidden_layers)
    ]
    shapes = {"embed_tokens": (V, D), "norm": (D,), "layers": layers}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def init_params(
    config: GptOssConfig, key: Array, dtype=jnp.bfloat16, experts: ExpertFormat = "dense"
) -> Params:
    """Random parameters with transformers' initialisation (normal(0, 0.02) weights, zero biases,
    unit norm weights), for demos and tests. MXFP4 experts get random codes with scales 2^-10..2^-6
    (elements of magnitude <= 0.1), as gpt-oss checkpoints store them."""
    shapes = param_shapes(config, experts)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
    keys = jax.random.split(key, len(paths))
    leaves = []
    for (path, shape), k in zip(paths, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("_blocks']"):
            leaves.append(jax.random.bits(k, shape, jnp.uint8))
        elif name.endswith("_scales']"):
            leaves.append(jax.random.randint(k, shape, 117, 122).astype(jnp.uint8))
        elif "layernorm" in name or name == "['norm']":
            leaves.append(jnp.ones(shape, dtype))
        elif "bias" in name and "router" not in name:
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


def check_params(params: Params, config: GptOssConfig) -> None:
    """Raise a ValueError naming the first parameter whose presence or shape disagrees with `config`."""
    expected = param_shapes(config, expert_format(params))
    if len(params.get("layers", [])) != config.num_hidden_layers:
        raise ValueError(
            f"params have {len(params.get('layers', []))} layers, config says {config.num_hidden_layers}"
        )
    want = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=is_shape)[0])
    # `with_wide_experts`' entries are made from the experts checked here (or, where they replace them, from
    # experts of the shapes checked when they were made)
    have = {
        path: leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if WIDE not in {getattr(key, "key", None) for key in path}
    }
    if wide_only(params):
        want = {path: shape for path, shape in want.items() if not _is_packed(path[-1].key)}
    for path, shape in want.items():  # `with_aligned_scales`' padded exponents: accepted as it makes them
        padded = (*shape[:-1], aligned_groups(shape[-1])) if _is_scales(path) else shape
        if path in have and tuple(have[path].shape) == padded:
            want[path] = padded
    _check_shapes(want, have)
    if {getattr(key, "key", None) for path in have for key in path} & {UP, DECODE_KEYS}:
        # `with_up_projections`' and `with_decode_keys`' entries: accepted where and as they make them.
        attn = lambda layer: _without(_without(layer["self_attn"], UP), DECODE_KEYS)
        layers = [{**layer, "self_attn": attn(layer)} for layer in params["layers"]]
        tables = [layer["self_attn"].get(DECODE_KEYS) for layer in params["layers"]]
        table = next((t for t in tables if t is not None), None)

        def derive(p):
            p = with_up_projections(p, config)
            if table is None:
                return p
            return with_decode_keys(p, config, table["cos"].shape[1], table["kernel"].dtype)

        made = jax.eval_shape(derive, {**params, "layers": layers})
        want = {path: tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(made)[0]}
        _check_shapes({path: shape for path, shape in want.items() if path in have}, have)
    extra = sorted(jax.tree_util.keystr(p) for p in have.keys() - want.keys())
    if extra:
        raise ValueError(f"params have entries the config does not use: {extra[:5]}")


def _is_packed(name: str) -> bool:
    """Whether an experts' entry is MXFP4-packed (the bytes or their scales), in the checkpoint's layout."""
    return name.endswith(("_blocks", "_scales"))


def _is_scales(path) -> bool:
    return jax.tree_util.keystr(path).endswith("_scales']")


def with_aligned_scales(params: Params) -> Params:
    """`params` with MXFP4 experts' scale-exponent rows padded to `mxfp4.SCALE_ALIGN` bytes (`pad_scales`),
    once for a loop of decode steps (`generation.generate` on the kernels): the grouped matmul then loads
    them with the asynchronous, pipelined copies it uses for the packed bytes, and the padding's flag lets
    it decode with one multiply per pair of values less (`mxfp4.FOLDABLE_EXPONENT`). Everything that reads
    experts takes either layout; `check_params` accepts this one. Dense experts are returned as they are."""
    if expert_format(params) != "mxfp4":
        return params
    pad = lambda path, leaf: pad_scales(leaf) if _is_scales(path) else leaf
    return _with_experts(params, [jax.tree_util.tree_map_with_path(pad, e) for e in _experts(params)])


def wide_experts_bytes(params: Params) -> int:
    """The bytes `with_wide_experts` adds beside the checkpoint's layout: every layer's MXFP4 experts' packed
    bytes and exponents again, and their biases in float32 (0 for dense experts, which it leaves as they are,
    and for experts that already hold only its layout)."""
    total = 0
    for layer in params["layers"]:
        experts = layer["mlp"]["experts"]
        for name, leaf in experts.items():
            if _is_packed(name):
                total += leaf.size * leaf.dtype.itemsize
            elif name.endswith("_bias") and "gate_up_proj_blocks" in experts:
                total += leaf.size * 4
    return total


def with_wide_experts(
    params: Params,
    config: GptOssConfig,
    decodable: bool | None = None,
    replace: bool = False,
    consume: bool = False,
) -> Params:
    """`params` with each layer's MXFP4 experts also laid out for the wide-batch kernel (`gmm_mosaic.prepare`,
    under `moe.WIDE`), which then runs the MoE of every call of at least 16 tokens (`moe.wide_batch`: decode
    batches and prefill; forward only, bf16 activations). The layout holds the experts' bytes a second time
    (`generation.generate` adds it on the GPU where it fits beside the cache), unless it `replace`s the
    checkpoint's: the bytes held once, every call on the kernel (below 16 tokens slower than the grouped
    matmul: 1.6x its time at one), and what reads the checkpoint's layout refuses the params
    (`moe.checkpoint_experts`: the jnp references, saving). While it is made both layouts are held, unless
    the caller gives up `params` (`consume`, with `replace`): each layer's checkpoint arrays are deleted
    once its layout is made, so at most one layer is held twice. Gradients through the kernel raise (it runs
    forward only). Params it cannot take (dense experts, shapes the kernel refuses, exponents past its
    decoding) are returned as they are, none deleted. Call it outside jit: whether the kernel can decode the
    weights is read from their values, unless `decodable` says (`gmm_mosaic.decodes`)."""
    if consume and not replace:
        raise ValueError(
            "with_wide_experts: consume deletes the checkpoint's layout, so it needs replace=True"
        )
    experts = _experts(params)
    if "gate_up_proj_blocks" not in experts[0]:
        return params
    if decodable is None:  # every layer read before any is deleted
        decodable = all(gmm_mosaic.decodes(e) for e in experts)
    made = []
    for e in experts:
        wide = gmm_mosaic.prepare(e, config.intermediate_size, decodable)
        if wide is None:  # shapes or exponents: alike for every layer, so at the first, before any deletion
            return params
        if consume:
            jax.block_until_ready(wide)
            for name in filter(_is_packed, e):
                e[name].delete()
        made.append({**({n: v for n, v in e.items() if not _is_packed(n)} if replace else e), WIDE: wide})
    return _with_experts(params, made)


def check_checkpoint_layout(params: Params) -> None:
    """A ValueError for params whose experts hold only the wide-batch kernel's layout (`wide_only`), for what
    writes the checkpoint's (saving)."""
    for experts in _experts(params)[:1]:  # every layer's alike
        checkpoint_experts(experts)


def has_wide(params: Params) -> bool:
    """Whether the experts carry the wide-batch kernel's layout (`with_wide_experts`)."""
    experts = _experts(params)
    return bool(experts) and WIDE in experts[0]


def wide_only(params: Params) -> bool:
    """Whether the experts hold only the wide-batch kernel's layout (`with_wide_experts`' `replace`)."""
    experts = _experts(params)
    return bool(experts) and wide_alone(experts[0])


def without_wide_experts(params: Params) -> Params:
    """`params` without `with_wide_experts`' layout: every decode batch on the grouped matmul."""
    if wide_only(params):
        raise ValueError("the experts hold only the wide-batch kernel's layout: there is no other to keep")
    return _with_experts(params, [_without(e, WIDE) for e in _experts(params)])


def _experts(params: Params) -> list[dict]:
    return [layer["mlp"]["experts"] for layer in params["layers"]]


def _with_experts(params: Params, experts: list[dict]) -> Params:
    """`params` with each layer's experts replaced by `experts`' entry for it (everything else shared)."""
    layers = [
        {**layer, "mlp": {**layer["mlp"], "experts": e}}
        for layer, e in zip(params["layers"], experts, strict=True)
    ]
    return {**params, "layers": layers}


def _without(tree: dict, name: str) -> dict:
    return {key: value for key, value in tree.items() if key != name}


def _check_shapes(want: dict, have: dict) -> None:
    for path, shape in want.items():
        name = jax.tree_util.keystr(path)
        if path not in have:
            raise ValueError(f"params{name} is missing (expected shape {shape})")
        if tuple(have[path].shape) != shape:
            raise ValueError(f"params{name} has shape {tuple(have[path].shape)}, config expects {shape}")


def check_tokens(tokens, config: GptOssConfig) -> None:
    """Eager range check of concrete token ids (under `jit` they are tracers; the embedding lookup then
    turns out-of-range ids into NaN, which poisons that sequence's logits instead of silently clamping)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    ids = np.asarray(tokens)
    bad = np.argwhere((ids < 0) | (ids >= config.vocab_size))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"token id {int(ids[where])} at index {where} is outside the vocabulary [0, {config.vocab_size})"
        )


def embed(params: Params, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return jnp.take(params["embed_tokens"], tokens, axis=0, mode="fill", fill_value=jnp.nan)


def unembed(params: Params, x: Float[Array, "B T D"], config: GptOssConfig) -> Float[Array, "B T V"]:
    head = params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(x, head, preferred_element_type=jnp.float32)


class ForwardOutput(NamedTuple):
    """`forward`'s result: float32 logits, the updated cache (None without one), and with
    `collect_attention` every layer's attention output [B, T, D] (else None)."""

    logits: Float[Array, "B T V"]
    cache: kv_cache.Cache | None
    attention: list[Float[Array, "B T D"]] | None = None


def decoder_layer(
    layer: Params,
    x: Float[Array, "B T D"],
    *,
    chunk: Chunk,
    layer_cache: dict[str, Array] | None,
    config: GptOssConfig,
    i: int,
    options: ForwardOptions = ForwardOptions(),
    h: Float[Array, "B T D"] | None = None,
    next_norm: Float[Array, " D"] | None = None,
) -> tuple[Float[Array, "B T D"], dict[str, Array] | None, dict[str, Float[Array, "B T D"]]]:
    """One pre-norm block: (new residual stream, updated layer cache, {"attn_input": the attention's normed
    input, "attn_output": what the attention adds to the residual stream, "moe_input": the MoE's normed
    input}). A decode step on the kernels (`fuses_norms`) passes `h`, the attention's normed input that the
    layer before computed, and `next_norm`, the weight of the norm after this layer (the next layer's
    input norm, or the final norm): each residual add then runs in one kernel with the norm after it
    (`add_norm`; the MoE's weighted sum too), and seen["next_input"] is that norm's output."""
    eps = config.rms_norm_eps
    h = rms_norm(x, layer["input_layernorm"], eps) if h is None else h
    args = (layer["self_attn"], h, chunk, layer_cache, config.is_sliding(i), config)
    single = options.decode_kernels and h.shape[1] == 1
    if config.is_mla(i):
        with jax.named_scope("mla"):
            a, layer_cache = attention_mla(*args, layer=i, options=options)
    else:
        with jax.named_scope("attention"):
            a, layer_cache = attention(*args, options=options)
    if next_norm is not None:
        rows = lambda y: y.reshape(-1, y.shape[-1])
        interpret = not runs_compiled()
        weight = layer["post_attention_layernorm"]
        n = rows(x).shape[0]
        if (
            FUSED_NORMS == "router"
            and routed_in_kernel(n, config)
            and not takes_wide(layer["mlp"], n, config, x.dtype)
        ):
            router = layer["mlp"]["router"]["kernel"]
            *added, partials = add_norm_routed(rows(x), rows(a), weight, router, eps, interpret)
        else:
            added, partials = add_norm(rows(x), rows(a), weight, eps, interpret), None
        x, m = (y.reshape(x.shape) for y in added)
        with jax.named_scope("moe"):
            moe_rows = expert_rows(layer["mlp"], m, config, partials)
            x, h_next = (y.reshape(x.shape) for y in add_norm(rows(x), moe_rows, next_norm, eps, interpret))
        return x, layer_cache, {"attn_input": h, "attn_output": a, "moe_input": m, "next_input": h_next}
    x = x + a
    m = rms_norm(x, layer["post_attention_layernorm"], eps)
    with jax.named_scope("moe"):
        if options.moe == "dense":
            x = x + moe_dense(layer["mlp"], m, config)
        else:
            grouped = "auto" if options.moe == "sparse" else options.moe
            moe = functools.partial(moe_sparse, config=config, kernels=single, grouped=grouped)
            sharding = options.activation_sharding
            x = x + by_rows(moe, sharding)(layer["mlp"], m)
    return x, layer_cache, {"attn_input": h, "attn_output": a, "moe_input": m}


# Decode steps on the kernels end each residual add in one kernel with the norm after it (`add_norm`), the
# one before the MoE also taking the router's product ("router", `add_norm_routed`; "norms": without it);
# "off": XLA's kernels. Read when a step is traced; `eval.bench.decode --fused-norms` times each.
FusedNorms = Literal["router", "norms", "off"]
FUSED_NORMS: FusedNorms = "router"


def fuses_norms(options: ForwardOptions, T: int) -> bool:
    """Whether a step of T tokens per sequence ends each residual add in one kernel with the norm after it
    (`add_norm`): a decode step on the kernels, its MoE the sparse one, on one device's rows (no mesh)."""
    return (
        FUSED_NORMS != "off"
        and options.decode_kernels
        and T == 1
        and options.moe == "sparse"
        and options.mesh is None
    )


def attention_inputs(params: Params, tokens: Int[Array, "B T"], config: GptOssConfig) -> list[Array]:
    """The normed input of every layer's attention on `tokens` (calibration data for the converter)."""
    chunk = chunk_at(*tokens.shape, config)
    x, inputs = embed(params, tokens), []
    for i, layer in enumerate(params["layers"]):
        x, _, seen = decoder_layer(layer, x, chunk=chunk, layer_cache=None, config=config, i=i)
        inputs.append(seen["attn_input"])
    return inputs


def forward(
    params: Params,
    tokens: Int[Array, "B T"],
    cache: kv_cache.Cache | None,
    config: GptOssConfig,
    lengths: Int[Array, " B"] | None = None,
    options: ForwardOptions = ForwardOptions(),
) -> ForwardOutput:
    """Logits (float32) for `tokens`, and the updated cache, as a `ForwardOutput`.

    Without a cache, the T tokens of each sequence sit at positions 0..T-1. With one, they continue each
    sequence after its `cache["lengths"]` cached tokens. `lengths` [B] (default T) says how many of the T
    tokens of each row are real; the rest is right padding, neither attended to nor cached. A sequence
    pushed past the cache's capacity gets NaN logits rather than silently dropping tokens. `options`: the
    implementation choices (`ForwardOptions`).
    """
    check_params(params, config)
    check_tokens(tokens, config)
    B, T = tokens.shape
    if cache is not None:
        kv_cache.check_cache(cache, config, B, T)
    start = cache["lengths"] if cache is not None else None
    n_new = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    chunk = chunk_at(B, T, config, start, n_new)

    sharding = options.activation_sharding
    pin = (lambda x: x) if sharding is None else (lambda x: jax.lax.with_sharding_constraint(x, sharding))
    x = pin(embed(params, tokens))
    new_layers, attention_outputs = [], []
    layers, fused = params["layers"], fuses_norms(options, T)
    h = rms_norm(x, layers[0]["input_layernorm"], config.rms_norm_eps) if fused else None
    for i, layer in enumerate(layers):
        layer_cache = cache["layers"][i] if cache is not None else None
        block = functools.partial(decoder_layer, config=config, i=i, options=options)
        block = jax.checkpoint(block) if options.remat else block
        next_norm = (
            (layers[i + 1]["input_layernorm"] if i + 1 < len(layers) else params["norm"]) if fused else None
        )
        x, layer_cache, seen = block(layer, x, chunk=chunk, layer_cache=layer_cache, h=h, next_norm=next_norm)
        x, h = pin(x), seen.get("next_input")
        new_layers.append(layer_cache)
        attention_outputs.append(seen["attn_output"])
    logits = unembed(params, h if fused else rms_norm(x, params["norm"], config.rms_norm_eps), config)
    new_cache = None
    if cache is not None:
        new_lengths = start + n_new
        overflow = new_lengths > kv_cache.cache_max_len(cache, config)
        logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
        new_cache = {"lengths": new_lengths, "layers": new_layers}
    return ForwardOutput(logits, new_cache, attention_outputs if options.collect_attention else None)


forward_jit = jax.jit(forward, static_argnames=("config", "options"))
forward_jit.__doc__ = "`forward` under `jax.jit` (the config and the options static)."


# ---- NNX shell -----------------------------------------------------------------------------------------


def _to_nnx(tree, path: tuple = ()):
    """nnx.Dict / nnx.List of nnx.Params, each carrying its logical axes as `out_sharding` metadata (not
    applied on creation: the arrays keep whatever placement the loader gave them)."""
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v, (*path, k)) for k, v in tree.items()})
    if isinstance(tree, list | tuple):
        return nnx.List([_to_nnx(v, (*path, i)) for i, v in enumerate(tree)])
    return nnx.Param(tree, out_sharding=logical_axes(path, tree.ndim), eager_sharding=False)


def _to_pure(node):
    if isinstance(node, nnx.Dict | dict):
        return {k: _to_pure(v) for k, v in node.items()}
    if isinstance(node, nnx.List | list):
        return [_to_pure(v) for v in node]
    return node[...]


class GptOss(nnx.Module):
    """Flax NNX module owning the parameters (GQA or MLA layers, as its config says); its math is `forward`.

    Each parameter is an `nnx.Param` in the same nesting as the pure pytree, with its logical axes
    (`PARAM_AXES`) as `out_sharding` metadata, so `nnx.get_partition_spec(nnx.state(model))` gives the
    logical sharding. `nnx.split` / `nnx.merge`, `nnx.jit`, `nnx.grad` and `nnx.Optimizer` work on it;
    `model.pure_params()` is the plain pytree that `forward` and the rest of the functional API take (the
    same arrays, not copies). `weights.load.from_pretrained(path)` builds one from a transformers folder or
    an Orbax checkpoint.
    """

    def __init__(self, config: GptOssConfig, params: Params):
        check_params(params, config)
        self.config = config
        self.weights = _to_nnx(params)

    @classmethod
    def random(cls, config: GptOssConfig, rngs: nnx.Rngs, dtype=jnp.bfloat16) -> GptOss:
        return cls(config, init_params(config, rngs.params(), dtype))

    def pure_params(self) -> Params:
        """The parameters as `forward`'s pytree: a view of the Params' arrays (no copy)."""
        return _to_pure(self.weights)

    def __call__(
        self, tokens, cache=None, lengths=None, options: ForwardOptions = ForwardOptions()
    ) -> ForwardOutput:
        return forward(self.pure_params(), tokens, cache, self.config, lengths, options)
