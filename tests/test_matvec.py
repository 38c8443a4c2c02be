"""The one-row projection kernel (interpreted here) against float64 products, its CUDA lowering at
gpt-oss-20b's projections, and batch-1 decode steps of every attention kind running their projections
through it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax import attention
from gptoss_mla_jax.matvec import LAUNCH, MOST_SLICES, MatvecLaunch, contraction_slices, matvec

SMALL = MatvecLaunch(depth=16, columns=32, programs=12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "K, widths, launch",
    [
        (100, (70, 33, 5), SMALL),  # contraction off the step, columns off the block, three matrices
        (64, (256,), SMALL),  # whole steps and blocks
        (300, (20,), SMALL),  # one column block: the contraction split into many slices
        (130, (40, 8), LAUNCH),  # the GPU's launch: a single slice, blocks wider than the matrices
    ],
)
def test_partial_sums_add_up_to_the_product(dtype, K, widths, launch):
    """Each matrix's partial sums over the contraction's slices add up to x @ w computed in float64 from
    the same inputs, to 1e-6 of the largest output (float32 sums in another order)."""
    keys = jax.random.split(jax.random.key(K), len(widths) + 1)
    x = jax.random.normal(keys[0], (K,), dtype)
    kernels = tuple(jax.random.normal(k, (K, n), dtype) for k, n in zip(keys[1:], widths, strict=True))
    sums = matvec(x, kernels, interpret=True, launch=launch)
    slices, _ = contraction_slices(K, sum(-(-n // launch.columns) for n in widths), launch)
    for s, w in zip(sums, kernels, strict=True):
        assert s.shape == (slices, w.shape[1]) and s.dtype == jnp.float32
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        np.testing.assert_allclose(s.sum(0), want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("K, blocks", [(2880, 20), (4096, 12), (100, 1), (16, 300)])
def test_contraction_slices_cover_it_in_whole_steps(K, blocks):
    """The slices cover the contraction, none empty, each whole steps of the launch's depth, at most
    MOST_SLICES of them (XLA then adds them inside their consumers), and give about the launch's programs
    (no more than one slice a step)."""
    slices, rows = contraction_slices(K, blocks)
    assert rows % LAUNCH.depth == 0 and (slices - 1) * rows < K <= slices * rows
    steps = -(-K // LAUNCH.depth)
    wanted = min(steps, MOST_SLICES, -(-LAUNCH.programs // blocks))
    assert slices <= wanted and rows == -(-steps // wanted) * LAUNCH.depth


def test_refuses_kernels_that_do_not_take_x():
    with pytest.raises(ValueError, match=r"kernels\[1\] has shape \(32, 4\); x has 64 values: \[64, N\]"):
        matvec(jnp.zeros(64), (jnp.zeros((64, 8)), jnp.zeros((32, 4))), interpret=True)


@pytest.mark.parametrize("K, widths", [(2880, (4096, 512, 512)), (4096, (2880,)), (2880, (4096, 192, 32))])
def test_lowers_for_the_gpu_at_gpt_oss_20b_projections(K, widths):
    """gpt-oss-20b's q / k / v, o_proj and an MLA layer's q / latent / RoPE key projections, bf16, lower to
    one Triton kernel for CUDA from this CPU-only machine."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    fn = lambda x, *kernels: matvec(x, kernels)
    traced = jax.jit(fn).trace(spec(K), *(spec(K, n) for n in widths))
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1


def test_linears_round_as_the_product_does():
    """`linears` on the kernel: the float32 sums rounded to x's dtype before the bias, as XLA's product
    rounds them: float32 to 1e-6, bf16 within one rounding step of the two-row product."""
    keys = jax.random.split(jax.random.key(0), 4)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(keys[0], (1, 1, 48), dtype)
        biased = {"kernel": jax.random.normal(keys[1], (48, 40), dtype)}
        ps = [biased | {"bias": jax.random.normal(keys[2], (40,), dtype)}]
        ps.append({"kernel": jax.random.normal(keys[3], (48, 24), dtype)})
        for got, want in zip(attention.linears(x, ps, True), attention.linears(x, ps), strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype == dtype
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            step = 1e-6 if dtype == jnp.float32 else 2**-7
            np.testing.assert_allclose(got, want, rtol=step, atol=step)


def with_random_biases(params, seed: int = 7):
    """`params` with every projection's bias random (`init_params` makes them zero), so that steps on the
    kernels add them where the jnp path does."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    biased = [
        0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        if jax.tree_util.keystr(path).endswith("['bias']")
        else leaf
        for (path, leaf), k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, biased)


def _mla(config, mode: str):
    from gptoss_mla_jax.config import MlaConfig

    layers = tuple(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    half, G = config.head_dim // 2, config.num_key_value_heads
    options = {
        "decompressed": {},
        "partial": {"rope_pairs": tuple(tuple((0, half - 1) for _ in range(G)) for _ in layers)},
        "rorope": {"rope_components": (1,) * len(layers)},
    }[mode]
    return dataclasses.replace(config, mla=MlaConfig(mode, layers, (48,) * len(layers), **options))


@pytest.mark.parametrize("kind", ["gqa", "decompressed", "partial", "rorope"])
def test_decode_step_at_batch_one_projects_on_the_kernel(monkeypatch, kind):
    """A batch-1 decode step on the kernels (float32, random biases) with `attention.ONE_TOKEN` "matvec" runs
    its projections on `matvec`: q / k / v in one launch and o_proj in another on GQA layers, q with the
    cached projections in one on converted ones, and gives the jnp step's logits; a step of two sequences
    does not."""
    from gptoss_mla_jax import model
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.mla import with_up_projections

    config = DEMO_CONFIG if kind == "gqa" else _mla(DEMO_CONFIG, kind)
    calls = []
    real = attention.matvec
    monkeypatch.setattr(
        attention, "matvec", lambda x, kernels, *a: calls.append(len(kernels)) or real(x, kernels, *a)
    )
    monkeypatch.setattr(attention, "ONE_TOKEN", "matvec")
    params = with_random_biases(model.init_params(config, jax.random.key(0), jnp.float32, experts="mxfp4"))
    if kind != "gqa":
        params = with_up_projections(params, config)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)

    @functools.partial(jax.jit, static_argnames="kernels")
    def step(params, tokens, cache, kernels):  # traced here: the spy sees each call
        options = model.ForwardOptions(decode_kernels=kernels)
        return model.forward(params, tokens, cache, config, options=options)[0]

    for batch in (2, 1):
        prefill = model.forward_jit(
            params, tokens[:batch, :8], init_cache(config, batch, 16, jnp.float32), config
        )
        calls.clear()
        want, got = (step(params, tokens[:batch, 8:], prefill.cache, kernels) for kernels in (False, True))
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
        if batch == 2:
            assert calls == []
    converted = config.mla.layers if config.mla else ()
    per_layer = [
        ([3, 1] if i not in converted else [2 + (kind != "decompressed"), 1])
        for i in range(config.num_hidden_layers)
    ]
    assert calls == [n for layer in per_layer for n in layer]


def test_gpu_check_runs_on_the_interpreter(tmp_path):
    """eval.experiments.matvec_check on the CPU interpreter (no device times) at gpt-oss-20b's o_proj: within
    one bf16 rounding step of XLA's two-row product."""
    import json

    from eval.experiments import matvec_check

    out = tmp_path / "check.json"
    assert matvec_check.main(["--projections", "o_proj", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["projection"] == "o_proj" and "kernel" not in row
    assert row["max_abs_error"] <= 2**-7 * row["max_abs"]
