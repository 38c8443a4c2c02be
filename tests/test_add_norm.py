"""The residual add + RMSNorm kernel (interpreted here) against jnp, the MoE's weighted sum in it, its CUDA
lowering at gpt-oss-20b's width, and a decode step on the kernels running every residual add through it."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax.add_norm import ROUTER_DEPTH, ExpertRows, add_norm, add_norm_reference, add_norm_routed


def case(N: int, D: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (N, D), dtype) * 3
    delta = jax.random.normal(keys[1], (N, D), dtype)
    weight = 1 + jax.random.normal(keys[2], (D,), dtype) * 0.1
    return x, delta, weight


def expert_rows(N: int, D: int, k: int, splits: int, dtype, seed: int = 1) -> ExpertRows:
    """The down product's rows (S split partials in float32, or one in `dtype`) in a layout of more rows
    than pairs, token n's k pairs scattered over it, softmax routing weights."""
    keys = jax.random.split(jax.random.key(seed), 3)
    M = 16 * (N * k // 16 + 2)
    rows = jax.random.normal(keys[0], (splits, M, D), jnp.float32 if splits > 1 else dtype)
    slot = jax.random.permutation(keys[1], M)[: N * k].astype(jnp.int32).reshape(N, k)
    return ExpertRows(rows, slot, jax.nn.softmax(jax.random.normal(keys[2], (N, k)), axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N, D", [(1, 2880), (5, 100), (2, 64)])
@pytest.mark.parametrize("delta", ["array", "experts", "expert splits"])
def test_equals_the_residual_add_and_rms_norm(dtype, N, D, delta):
    """x + delta and its norm: float32 to 1e-6 (sums in another order), bfloat16 bit for bit (every rounding
    where the jnp path rounds); delta an array or the MoE's rows before their weighted sum (one product or
    contraction splits to add first), a width off a power of two (masked in a tensor of 4,096 / 128)."""
    x, d, weight = case(N, D, dtype)
    if delta != "array":
        d = expert_rows(N, D, 4, 2 if delta == "expert splits" else 1, dtype)
    got = add_norm(x, d, weight, 1e-5, interpret=True)
    want = add_norm_reference(x, d, weight, 1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype == dtype
        if dtype == jnp.float32:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * float(jnp.abs(w).max()))
        else:
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N, D, E", [(1, 2880, 32), (3, 600, 20), (2, 64, 8)])
def test_routed_form_adds_the_router_product(dtype, N, D, E):
    """`add_norm_routed`: x + delta and its norm as `add_norm` gives them (bit for bit), and the router's
    product of that norm as float32 partial sums, one per 256 rows of the contraction (gpt-oss-20b's 2,880
    in 12, the last of 64 rows; 600 in 3; 64 in one slice of 64), adding up to h @ router (the rounded h,
    in float64) to 1e-6 of the largest logit; experts off a power of two."""
    x, delta, weight = case(N, D, dtype)
    router = D**-0.5 * jax.random.normal(jax.random.key(3), (D, E), dtype)
    x_new, h, partials = add_norm_routed(x, delta, weight, router, 1e-5, interpret=True)
    for g, w in zip((x_new, h), add_norm(x, delta, weight, 1e-5, interpret=True), strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    assert partials.shape == (-(-D // ROUTER_DEPTH), N, E) and partials.dtype == jnp.float32
    want = np.asarray(h, np.float64) @ np.asarray(router, np.float64)
    np.testing.assert_allclose(partials.sum(0), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_routed_form_refuses_what_it_cannot_take():
    x, delta, weight = case(1, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"router kernel \(32, 8\), x has 64 values a token"):
        add_norm_routed(x, delta, weight, jnp.zeros((32, 8)), 1e-5, interpret=True)
    rows = expert_rows(1, 64, 4, 1, jnp.float32)
    with pytest.raises(ValueError, match="follows the attention's add, not the MoE's"):
        add_norm_routed(x, rows, weight, jnp.zeros((64, 8)), 1e-5, interpret=True)


def test_lowers_for_the_gpu_at_gpt_oss_20b_width():
    """All three forms (plain, with the router's product, the MoE's), bf16 at 2,880 values a token, lower to
    one Triton kernel for CUDA from this CPU-only machine."""
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    N, D, M, k = 1, 2880, 64, 4
    x, weight = spec(N, D), spec(D)
    plain = lambda x, delta, weight: add_norm(x, delta, weight, 1e-5)
    moe = lambda x, rows, slot, routing, weight: add_norm(x, ExpertRows(rows, slot, routing), weight, 1e-5)
    routed = lambda x, delta, weight, router: add_norm_routed(x, delta, weight, router, 1e-5)
    for fn, args in (
        (plain, (x, spec(N, D), weight)),
        (routed, (x, spec(N, D), weight, spec(D, 32))),
        (moe, (x, spec(2, M, D, dtype=jnp.float32), spec(16, k, dtype=jnp.int32), spec(16, k), weight)),
    ):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 1


@pytest.mark.parametrize("fused", ["router", "norms"])
def test_decode_step_adds_through_the_kernel(monkeypatch, fused):
    """A decode step on the kernels (MXFP4 experts, float32) takes both residual adds of every layer
    through the kernel, the MoE's weighted sum in the second and, with `model.FUSED_NORMS` "router", the
    router's product in the first, and gives the jnp step's logits; a prefill does not."""
    from gptoss_mla_jax import model
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG

    calls = []
    plain, routed = model.add_norm, model.add_norm_routed
    spy = lambda x, delta, *a: (
        calls.append("moe" if isinstance(delta, ExpertRows) else "plain") or plain(x, delta, *a)
    )
    monkeypatch.setattr(model, "add_norm", spy)
    monkeypatch.setattr(model, "add_norm_routed", lambda *a: calls.append("routed") or routed(*a))
    monkeypatch.setattr(model, "FUSED_NORMS", fused)
    params = model.init_params(DEMO_CONFIG, jax.random.key(0), jnp.float32, experts="mxfp4")
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, DEMO_CONFIG.vocab_size)

    @functools.partial(jax.jit, static_argnames=("config", "options"))
    def run(params, tokens, cache, config, options=None):  # traced here: the spies see it
        return model.forward(params, tokens, cache, config, options=options or model.ForwardOptions())

    _, cache, _ = run(params, tokens[:, :8], init_cache(DEMO_CONFIG, 2, 16, jnp.float32), DEMO_CONFIG)
    assert calls == []
    step = lambda kernels: run(
        params, tokens[:, 8:], cache, DEMO_CONFIG, options=model.ForwardOptions(decode_kernels=kernels)
    )[0]
    want, got = step(False), step(True)
    first = "routed" if fused == "router" else "plain"
    assert calls == [first, "moe"] * DEMO_CONFIG.num_hidden_layers  # after the attention, after the MoE
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)


def test_gpu_check_runs_on_the_interpreter(tmp_path):
    """eval.experiments.add_norm_check on the CPU interpreter (no device times): both forms within one bf16
    step of XLA's path (which may keep float32 between ops where jnp rounds), and the demo model's decode
    step with the fused adds (with the router's product in the first and without) within a few bf16 steps
    of the step without, choosing the same tokens; the router's product in the add's kernel routes as the
    routing kernel's own."""
    from eval.experiments import add_norm_check

    out = tmp_path / "check.json"
    assert add_norm_check.main(["--batches", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["tokens"], r["form"]) for r in result["kernel"]] == [(2, "plain"), (2, "moe")]
    for row in result["kernel"]:
        assert "kernel" not in row and row["max_abs_error_h"] <= 2**-7 * row["max_abs_h"]
    (router,) = result["router"]
    assert router["same_x_h"] and router["same_experts"] and router["same_slots"]
    assert router["max_abs_weight_difference"] <= 1e-6
    (step,) = result["step"]
    for setting in ("router", "norms"):
        assert step[f"same_top_token_{setting}"]
        assert step[f"max_abs_logit_difference_{setting}"] <= 2**-5 * step["max_abs_logit"]
