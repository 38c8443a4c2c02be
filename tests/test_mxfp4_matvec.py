"""The Pallas MXFP4 matvec (interpret mode, CPU) equals dequantize-then-multiply, float32, and lowers to
Triton for CUDA at gpt-oss-20b's expert shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax.mxfp4 import dequantize
from gptoss_mla_jax.mxfp4_matvec import mxfp4_matvec


@pytest.mark.parametrize(
    "experts, n_out, groups, chosen",
    [
        (4, 128, 5, [2, 0, 2]),  # 5 groups = 4 + 1 wide slices, an expert chosen twice
        (3, 40, 2, [1]),  # 40 output rows: tiles of 8
    ],
)
def test_matvec_equals_dequantized_product(experts, n_out, groups, chosen):
    rng = np.random.default_rng(0)
    blocks = jnp.asarray(rng.integers(0, 256, (experts, n_out, groups, 16), dtype=np.uint8))
    # Scales from 2^-10 to 2^8 around gpt-oss's, every code (both signs) in the random bytes.
    scales = jnp.asarray(rng.integers(117, 136, (experts, n_out, groups), dtype=np.uint8))
    bias = jnp.asarray(rng.standard_normal((experts, n_out)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((len(chosen), groups * 32)).astype(np.float32))
    ids = jnp.asarray(chosen, jnp.int32)
    got = mxfp4_matvec(x, ids, blocks, scales, bias, interpret=True)
    weights = dequantize(blocks, scales, jnp.float32)[ids]  # [P, out, in], exact
    want = jnp.einsum("pi,poi->po", x, weights, precision="highest") + bias[ids]
    scale = np.abs(np.asarray(want)).max()
    np.testing.assert_allclose(got, want, atol=1e-6 * scale, rtol=0)


def test_shapes_that_do_not_pack_are_refused():
    blocks, scales = jnp.zeros((2, 16, 3, 16), jnp.uint8), jnp.zeros((2, 16, 3), jnp.uint8)
    with pytest.raises(ValueError, match="do not pack inputs of 64"):
        mxfp4_matvec(jnp.zeros((1, 64)), jnp.zeros(1, jnp.int32), blocks, scales, jnp.zeros((2, 16)))


def test_lowers_for_the_gpu_at_gpt_oss_20b_shapes():
    """Both expert matrices of gpt-oss-20b (gate_up 5760 x 2880, down 2880 x 2880; 90 groups of 32) for
    the 4 (token, expert) pairs of a batch-1 step."""
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    for n_out in (5760, 2880):
        args = (spec(4, 2880), spec(4, dtype=jnp.int32), spec(32, n_out, 90, 16, dtype=jnp.uint8))
        args += (spec(32, n_out, 90, dtype=jnp.uint8), spec(32, n_out))
        lowered = jax.jit(mxfp4_matvec).trace(*args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 1


def test_decode_step_on_the_kernels_equals_jnp():
    """A model with MXFP4 experts: one cached decode step with `decode_kernels` (attention kernels and the
    MXFP4 matvec, interpreted) gives the jnp step's logits, float32."""
    from gptoss_mla_jax.cache import init_cache
    from gptoss_mla_jax.generation import DEMO_CONFIG
    from gptoss_mla_jax.model import ForwardOptions, forward, init_params

    params = init_params(DEMO_CONFIG, jax.random.key(0), jnp.float32, experts="mxfp4")
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, DEMO_CONFIG.vocab_size)
    _, cache, _ = forward(params, tokens[:, :20], init_cache(DEMO_CONFIG, 2, 32, jnp.float32), DEMO_CONFIG)
    step = lambda kernels: forward(
        params, tokens[:, 20:], cache, DEMO_CONFIG, options=ForwardOptions(decode_kernels=kernels)
    )[0]
    want, got = step(False), step(True)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
