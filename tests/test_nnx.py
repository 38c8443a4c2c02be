"""The Flax NNX model: its Params carry their logical axes, it runs under nnx.jit, splits and merges, trains
with nnx.Optimizer exactly as optax does on the pure pytree, and loads from transformers folders and Orbax
checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptoss_mla_jax import GptOss, forward
from gptoss_mla_jax.generation import DEMO_CONFIG as DEMO
from weights.load import from_pretrained
from weights.orbax_io import save_checkpoint
from weights.safetensors_io import load_hf

# The demo model with two layers (a sliding and a full one): every layer kind, half the compilation.
DEMO_CONFIG = dataclasses.replace(DEMO, num_hidden_layers=2, layer_types=())
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, DEMO_CONFIG.vocab_size, (2, 9)))


def next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def test_params_carry_logical_axes_and_run_under_nnx_jit():
    model = GptOss.random(DEMO_CONFIG, nnx.Rngs(params=0), jnp.float32)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))["weights"]
    layer = specs["layers"][0]
    assert specs["embed_tokens"].get_value() == P("vocab", "embed")
    assert layer["self_attn"]["q_proj"]["kernel"].get_value() == P("embed", "heads")
    assert layer["mlp"]["experts"]["gate_up_proj"].get_value() == P("experts", "expert_in", None)
    assert specs["norm"].get_value() == P(None)
    logits = nnx.jit(lambda m, t: m(t).logits)(model, TOKENS)
    want = forward(model.pure_params(), TOKENS, None, DEMO_CONFIG).logits
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(TOKENS).logits, model(TOKENS).logits)


def test_nnx_optimizer_step_equals_optax_on_the_pure_pytree():
    model = GptOss.random(DEMO_CONFIG, nnx.Rngs(params=1), jnp.float32)
    tx = optax.sgd(1e-2, momentum=0.9)  # linear in the gradients: Adam would amplify rounding in tiny ones
    params = model.pure_params()
    pure_loss = lambda p: next_token_loss(forward(p, TOKENS, None, DEMO_CONFIG).logits, TOKENS)
    updates, _ = tx.update(jax.grad(pure_loss)(params), tx.init(params), params)
    want = optax.apply_updates(params, updates)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(TOKENS).logits, TOKENS))(model)
        optimizer.update(model, grads)
        return loss

    before = step(model, optimizer)
    np.testing.assert_allclose(before, pure_loss(params), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), model.pure_params(), want
    )
    assert float(step(model, optimizer)) < float(before)


def test_from_pretrained_reads_transformers_folders_and_orbax_checkpoints(tiny2_hf, tmp_path):
    folder = tiny2_hf[1]
    config, params = load_hf(folder, progress=False)
    want = forward(params, TOKENS % config.vocab_size, None, config).logits
    model = from_pretrained(folder, progress=False)
    assert isinstance(model, GptOss) and model.config == config
    np.testing.assert_array_equal(model(TOKENS % config.vocab_size).logits, want)
    save_checkpoint(str(tmp_path / "ck"), params, config)
    restored = from_pretrained(str(tmp_path / "ck"))
    np.testing.assert_array_equal(restored(TOKENS % config.vocab_size).logits, want)
