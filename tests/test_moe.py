import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_mla_jax.moe import layout_align, moe_dense, moe_sparse, route, routed_in_kernel, swiglu
from gptoss_mla_jax.mxfp4 import quantize
from weights.safetensors_io import load_hf

from .conftest import make_hf_model


@pytest.mark.parametrize("grouped", ["ragged_dot", "gmm"])
def test_sparse_equals_dense_and_transformers(tiny_hf, grouped):
    model, folder = tiny_hf
    config, params = load_hf(folder, progress=False)
    x = np.random.default_rng(0).standard_normal((3, 7, config.hidden_size)).astype(np.float32) * 2
    for layer in range(config.num_hidden_layers):
        p = params["layers"][layer]["mlp"]
        sparse = np.asarray(moe_sparse(p, jnp.asarray(x), config, grouped=grouped))
        dense = np.asarray(moe_dense(p, jnp.asarray(x), config))
        # The paths sum in different orders: they agree to a few float32 ulps of the largest output.
        np.testing.assert_allclose(
            sparse, dense, atol=4 * np.finfo(np.float32).eps * np.abs(dense).max(), rtol=0
        )
        with torch.no_grad():
            want = model.model.layers[layer].mlp(torch.from_numpy(x))[0].numpy()
        # Outputs reach ~40 here; float32 sums of that size carry ~1e-5 of rounding.
        np.testing.assert_allclose(sparse, want, atol=1e-5, rtol=1e-5)


def test_clamps_are_exercised(tiny_hf):
    # The parity inputs must reach the SwiGLU limit, or the clamps would go untested.
    _, folder = tiny_hf
    config, params = load_hf(folder, progress=False)
    e = params["layers"][0]["mlp"]["experts"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, config.hidden_size)), jnp.float32)
    gate_up = jnp.einsum("nd,edf->nef", x, e["gate_up_proj"])
    assert (gate_up[..., 0::2] > config.swiglu_limit).any() and (
        gate_up[..., 1::2] < -config.swiglu_limit
    ).any()


def test_router_topk_softmax(tiny_hf):
    _, folder = tiny_hf
    config, params = load_hf(folder, progress=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((10, config.hidden_size)), jnp.float32)
    weights, idx = route(params["layers"][1]["mlp"], x, config)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    logits = x @ params["layers"][1]["mlp"]["router"]["kernel"] + params["layers"][1]["mlp"]["router"]["bias"]
    np.testing.assert_array_equal(
        np.asarray(idx), np.argsort(-np.asarray(logits), -1)[:, : config.num_experts_per_tok]
    )


def test_sparse_path_only_touches_selected_experts(tiny_hf):
    """Gradients of the sparse path reach only the experts the router chose."""
    _, folder = tiny_hf
    config, params = load_hf(folder, progress=False)
    p = params["layers"][0]["mlp"]
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, config.hidden_size)), jnp.float32)
    grads = jax.grad(lambda e: moe_sparse({**p, "experts": e}, x, config).sum())(p["experts"])
    _, idx = route(p, x.reshape(1, -1), config)
    touched = np.flatnonzero(np.abs(np.asarray(grads["down_proj"])).sum((1, 2)))
    np.testing.assert_array_equal(touched, np.sort(np.asarray(idx[0])))


def _scatters(jaxpr):
    """Every scatter-family equation of a jaxpr, nested jaxprs (custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("scatter"):
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's, or a Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _scatters(inner)


@pytest.mark.parametrize("tokens", [8, 256])  # the aligned layout and the sorted one
def test_training_gradient_scatters_only_unique_rows(tiny_hf, tokens):
    """A scatter-add with repeated indices is what XLA's deterministic mode (a teacher retrained bit for bit)
    sorts element by element: the grouped matmul's path (the GPU's) must move activation rows only by
    permutations (unique indices) and sum the biases' groups without scattering."""
    _, folder = tiny_hf
    config, params = load_hf(folder, progress=False)
    p = params["layers"][0]["mlp"]
    x = np.random.default_rng(4).standard_normal((1, tokens, config.hidden_size))
    x = jnp.asarray(x, jnp.float32)
    loss = lambda p, x: moe_sparse(p, x, config, grouped="gmm").sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(p, x).jaxpr
    # Float scatters into rows of activations or into per-expert rows (the router's top-k scatters into
    # [tokens, experts]: a few values per token, cheap to sort).
    rows = lambda shape: shape[-1] >= config.hidden_size or shape[0] == config.num_local_experts
    wide = [
        e for e in _scatters(jaxpr) if jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)
        and rows(e.invars[0].aval.shape)
    ]  # fmt: skip
    assert wide, "the grouped path's row permutations should appear as scatters"
    assert all(e.params["unique_indices"] for e in wide), [
        str(e) for e in wide if not e.params["unique_indices"]
    ]


def test_swiglu_formula():
    from gptoss_mla_jax.generation import DEMO_CONFIG as config

    gate = np.array([-9.0, 0.5, 9.0], np.float32)
    up = np.array([-9.0, 0.25, 9.0], np.float32)
    gate_up = np.stack([gate, up], -1).reshape(-1)  # interleaved: gate at even, up at odd
    got = np.asarray(swiglu(jnp.asarray(gate_up), config))
    g = np.minimum(gate, 7.0)
    u = np.clip(up, -7.0, 7.0)
    np.testing.assert_allclose(got, (u + 1) * g / (1 + np.exp(-1.702 * g)), rtol=1e-6)


def test_decode_gathers_only_the_selected_experts(tmp_path):
    """Fewer token-expert pairs than experts (decode): the gather path, dense or MXFP4-packed, equals the
    reference and transformers, and no ragged_dot over all experts is traced."""
    model = make_hf_model(tmp_path, num_local_experts=8, intermediate_size=32)  # MXFP4: dims of 32
    config, params = load_hf(str(tmp_path), progress=False)
    p = params["layers"][1]["mlp"]
    x = np.random.default_rng(4).standard_normal((3, 1, config.hidden_size)).astype(np.float32) * 2
    assert 3 * config.num_experts_per_tok < config.num_local_experts
    jaxpr = str(jax.make_jaxpr(lambda x: moe_sparse(p, x, config))(x))
    assert "ragged_dot" not in jaxpr and "ragged_dot" in str(
        jax.make_jaxpr(lambda x: moe_sparse(p, x, config))(np.zeros((8, 1, config.hidden_size), np.float32))
    )
    gathered = np.asarray(moe_sparse(p, jnp.asarray(x), config))
    with torch.no_grad():
        want = model.model.layers[1].mlp(torch.from_numpy(x))[0].numpy()
    # Outputs reach ~85 here: each path sums in its own order, so agreement is a few float32 ulps of that.
    assert np.abs(want).max() > 50
    ulps = 4 * np.finfo(np.float32).eps * np.abs(want).max()
    np.testing.assert_allclose(gathered, np.asarray(moe_dense(p, jnp.asarray(x), config)), atol=ulps, rtol=0)
    np.testing.assert_allclose(gathered, want, atol=ulps, rtol=0)

    packed = {k: v for k, v in p["experts"].items() if k.endswith("_bias")}
    for name in ("gate_up_proj", "down_proj"):  # [E, in, out] -> the file's [E, out, in] packed
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = map(
            jnp.asarray, quantize(np.asarray(p["experts"][name]).transpose(0, 2, 1))
        )
    q = {**p, "experts": packed}
    reference = np.asarray(moe_dense(q, jnp.asarray(x), config))
    np.testing.assert_allclose(
        np.asarray(moe_sparse(q, jnp.asarray(x), config)), reference, atol=ulps, rtol=0
    )
    # The grouped matmul (interpreted here) multiplies the packed experts where they lie.
    on_kernel = np.asarray(moe_sparse(q, jnp.asarray(x), config, kernels=True))
    np.testing.assert_allclose(on_kernel, reference, atol=ulps, rtol=0)


@pytest.mark.parametrize(
    "tokens, routing, experts, layout",
    [
        (1, "learned", 4, "routing kernel"),  # batch 1: k groups of one row, each aligned to its own row tile
        (5, "one expert for all", 4, "routing kernel"),  # every token picks expert 0: most experts empty
        (6, "learned", 4, "routing kernel"),  # 12 pairs over 4 experts: aligned to row tiles of 16
        (20, "learned", 4, "routing kernel"),  # 40 pairs over 4 experts: aligned to row tiles of 32
        (40, "learned", 4, "routing kernel"),  # 80 pairs over 4 experts: aligned to row tiles of 64
        (72, "learned", 16, "aligned in jnp"),  # more tokens than the routing kernel: 32-row tiles
        (72, "learned", 64, "aligned in jnp"),  # likewise in 16-row tiles
        (80, "learned", 4, "sorted"),  # 160 pairs over 4 experts: past the alignment, tiles shared by experts
    ],
)
def test_decode_on_the_grouped_kernel_equals_the_reference(tmp_path, tokens, routing, experts, layout):
    """A decode step's MoE on the kernels (`kernels`: the grouped matmul at every batch size, interpreted
    here, the aligned layouts' rows gathered from the tokens, padding rows included), MXFP4 experts: equal to
    moe_dense in float32 whatever the routing."""
    make_hf_model(tmp_path, num_local_experts=experts, intermediate_size=32)
    config, params = load_hf(str(tmp_path), progress=False)
    p = params["layers"][0]["mlp"]
    if routing == "one expert for all":
        p = {**p, "router": {**p["router"], "bias": p["router"]["bias"].at[0].set(1e4)}}
    packed = {k: v for k, v in p["experts"].items() if k.endswith("_bias")}
    for name in ("gate_up_proj", "down_proj"):
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = map(
            jnp.asarray, quantize(np.asarray(p["experts"][name]).transpose(0, 2, 1))
        )
    q = {**p, "experts": packed}
    x = jnp.asarray(np.random.default_rng(5).standard_normal((tokens, 1, config.hidden_size)), jnp.float32)
    _, idx = route(q, x.reshape(tokens, -1), config)
    if routing == "one expert for all":
        assert (np.asarray(idx) == 0).any(axis=1).all()
    want = np.asarray(moe_dense(q, x, config))
    got = np.asarray(moe_sparse(q, x, config, kernels=True))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    kernel = "routing kernel" if routed_in_kernel(tokens, config) else "aligned in jnp"
    assert layout == ("sorted" if layout_align(tokens, config) is None else kernel)


def test_decode_step_on_the_kernels_equals_jnp():
    """A model with MXFP4 experts: one cached decode step with `decode_kernels` (the attention kernels and
    the grouped matmul, interpreted) gives the jnp step's logits, float32; so do both with the experts'
    scale rows padded as `generate` gives them to the kernels (`with_aligned_scales`, which the params
    check accepts, and no other width)."""
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.model import ForwardOptions, check_params, forward, init_params, with_aligned_scales

    params = init_params(DEMO_CONFIG, jax.random.key(0), jnp.float32, experts="mxfp4")
    aligned = with_aligned_scales(params)
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, DEMO_CONFIG.vocab_size)
    run = jax.jit(forward, static_argnames=("config", "options"))  # one program each, not op by op
    cache = init_cache(DEMO_CONFIG, 2, 32, jnp.float32)
    _, cache, _ = run(params, tokens[:, :20], cache, config=DEMO_CONFIG)
    step = lambda p, kernels: run(
        p, tokens[:, 20:], cache, config=DEMO_CONFIG, options=ForwardOptions(decode_kernels=kernels)
    )[0]
    want = step(params, False)
    for got in (step(params, True), step(aligned, True), step(aligned, False)):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
    experts = aligned["layers"][1]["mlp"]["experts"]
    assert experts["down_proj_scales"].shape[-1] % 16 == 0
    check_params(aligned, DEMO_CONFIG)
    bad = {**experts, "down_proj_scales": experts["down_proj_scales"][..., :-1]}
    layers = [
        *aligned["layers"][:1],
        {**aligned["layers"][1], "mlp": {**aligned["layers"][1]["mlp"], "experts": bad}},
    ]
    with pytest.raises(ValueError, match=r"down_proj_scales'\] has shape"):
        check_params({**aligned, "layers": layers + aligned["layers"][2:]}, DEMO_CONFIG)


def test_aligned_slots_place_each_pair_once_in_its_experts_tiles():
    """The decode layout without sorting: every pair gets its own row; an expert's pairs fill consecutive
    rows from a multiple of the tile, in token order; each expert's padded size covers them."""
    from gptoss_mla_jax.moe import _aligned_slots

    expert = jnp.asarray([3, 0, 3, 3, 1, 0, 3, 5], jnp.int32)  # expert 2 and 4 chosen by none
    slot, padded = map(np.asarray, _aligned_slots(expert, 6, 4))
    np.testing.assert_array_equal(padded, [4, 4, 0, 4, 0, 4])
    np.testing.assert_array_equal(slot, [8, 0, 9, 10, 4, 1, 11, 12])


def test_layout_rows_bound_every_layout_in_whole_tiles():
    """`routing.layout_rows` is a multiple of the tile and holds every layout of n tokens' k pairs (random
    choices, and one pair per expert, which fills it exactly)."""
    from gptoss_mla_jax.moe import _aligned_slots
    from gptoss_mla_jax.routing import layout_rows

    rng = np.random.default_rng(0)
    for n, k, E, align in [(1, 4, 32, 16), (8, 4, 32, 16), (64, 4, 32, 16), (256, 4, 32, 64), (7, 2, 4, 32)]:
        height = layout_rows(n, k, E, align)
        assert height % align == 0
        choices = [rng.permutation(E)[:k] for _ in range(n)]
        m, P = min(n * k, E), n * k  # worst case: every chosen expert but one holds a single pair
        worst = np.concatenate([np.arange(m - 1), np.full(P - m + 1, m - 1)])
        for expert in (np.concatenate(choices), np.arange(m), worst):
            expert = jnp.asarray(expert, jnp.int32)
            slot, padded = _aligned_slots(expert, E, align)
            assert int(padded.sum()) <= height and int(slot.max()) < height
    assert int(padded.sum()) == height  # one pair for each of the 4 experts: 4 whole tiles


def test_layout_align_follows_the_pairs_per_expert():
    """gpt-oss-20b's decode batches (32 experts, 4 a token): tiles of 16 rows up to batch 64 (the routing
    kernel's), then at least twice an expert's average pairs, and the sorted layout past 64-row tiles."""
    from gptoss_mla_jax.config import GPT_OSS_20B
    from gptoss_mla_jax.moe import layout_align, routed_in_kernel

    aligns = {n: layout_align(n, GPT_OSS_20B) for n in (1, 8, 64, 65, 128, 129, 256, 257, 4096)}
    assert aligns == {1: 16, 8: 16, 64: 16, 65: 32, 128: 32, 129: 64, 256: 64, 257: None, 4096: None}
    assert routed_in_kernel(64, GPT_OSS_20B) and not routed_in_kernel(65, GPT_OSS_20B)
