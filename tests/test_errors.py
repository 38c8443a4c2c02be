"""Bad input gets an error that says what is wrong, never silent garbage."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gptoss_mla_jax import forward, init_cache
from gptoss_mla_jax.cache import CacheDoesNotFit
from gptoss_mla_jax.generation import generate
from tests.compile_log import compiled, compiled_at_allocation, raising_when_run
from weights.safetensors_io import CheckpointError, load_hf


def test_token_ids_outside_vocab(tiny):
    config, params = tiny
    with pytest.raises(
        ValueError, match=r"token id 97 at index \(0, 2\) is outside the vocabulary \[0, 97\)"
    ):
        forward(params, jnp.array([[1, 2, 97]]), None, config)
    with pytest.raises(ValueError, match="token id -1"):
        generate(params, config, [[1, -1]], 3)
    # Under jit the ids are not visible to Python: the sequence holding a bad id gets NaN logits instead
    # of a silently clamped embedding row; the other sequences of the batch are unaffected.
    logits = jax.jit(forward, static_argnums=3)(
        params, jnp.array([[1, 2, 500], [1, 2, 3]]), None, config
    ).logits
    assert np.isnan(np.asarray(logits[0, 2])).all() and np.isfinite(np.asarray(logits[1])).all()


def test_prompt_longer_than_context(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match="exceeds the model context of 256 tokens"):
        generate(params, config, [[1] * 250], 10)
    with pytest.raises(ValueError, match="max_len 300 exceeds"):
        init_cache(config, 1, 300)
    with pytest.raises(ValueError, match="20 tokens do not fit a cache of 16 positions"):
        forward(params, jnp.zeros((1, 20), jnp.int32), init_cache(config, 1, 16), config)


def test_cache_larger_than_the_device_is_refused_before_it_is_allocated(tiny, monkeypatch):
    """generate checks the cache and what its compiled steps allocate beside it against the device's free
    memory first and says what fits and which setting gives JAX more of a GPU (the CPU reports no limit: the
    check is patched in here, the steps' allocations too)."""
    from gptoss_mla_jax import cache as cache_lib
    from gptoss_mla_jax import generation

    config, params = tiny
    need = cache_lib.total_bytes(config, 2, 48, jnp.float32)  # two prompts of 7 tokens + 40, in 16s: 48
    fits = max(n for n in range(1, 48) if cache_lib.total_bytes(config, 2, n, jnp.float32) <= need // 2)
    monkeypatch.setattr(generation, "allocated_bytes", lambda compiled: 0)
    monkeypatch.setattr(cache_lib, "free_device_bytes", lambda: need // 2)
    with pytest.raises(ValueError, match=rf"2 sequences x 48 tokens \(float32\) needs {need / 1e3:.2f} KB "
                       rf".* at most {fits} tokens .*XLA_PYTHON_CLIENT_MEM_FRACTION"):  # fmt: skip
        generate(params, config, [[1] * 7, [2] * 7], 40)
    allocated = 5000
    monkeypatch.setattr(generation, "allocated_bytes", lambda compiled: allocated)
    monkeypatch.setattr(cache_lib, "free_device_bytes", lambda: need + allocated - 1)
    with pytest.raises(
        ValueError, match=r"free, 5.00 KB of it for what its steps allocate beside it: at most"
    ):
        generate(params, config, [[1] * 7, [2] * 7], 40)
    monkeypatch.setattr(cache_lib, "free_device_bytes", lambda: need + allocated)
    assert len(generate(params, config, [[1] * 7, [2] * 7], 40)[0]) == 40  # room for exactly both
    monkeypatch.setattr(cache_lib, "free_device_bytes", lambda: allocated - 1000)
    with pytest.raises(ValueError, match=r"allocate 5.00 KB beside the cache and the device has 4.00 KB "
                       r"free, before any KV cache"):  # fmt: skip
        generate(params, config, [[1] * 7, [2] * 7], 40)


def test_generate_drops_the_wide_layout_its_steps_leave_no_room_for(tiny, monkeypatch):
    """Where the experts' wide-batch layout fits beside the cache but the steps compiled with it leave no
    room for the cache, generate compiles them without it and runs (the layout's calls stood in for here:
    the CPU takes no wide-batch kernel)."""
    from gptoss_mla_jax import cache as cache_lib
    from gptoss_mla_jax import generation

    config, params = tiny
    calls, compiled = [], []
    monkeypatch.setattr(generation, "wants_wide_layout", lambda *args: True)
    monkeypatch.setattr(generation, "wide_experts_bytes", lambda params: 0)
    monkeypatch.setattr(
        generation, "with_wide_experts", lambda params, config: calls.append("with") or params
    )
    monkeypatch.setattr(generation, "without_wide_experts", lambda params: calls.append("without") or params)
    # the steps compiled with the layout (the first two) take all the room; without it, none
    monkeypatch.setattr(
        generation,
        "allocated_bytes",
        lambda step: compiled.append(step) or (10**9 if len(compiled) <= 2 else 0),
    )
    monkeypatch.setattr(cache_lib, "free_device_bytes", lambda: 10**8)
    assert len(generate(params, config, [[1] * 7], 20)[0]) == 20
    assert calls == ["with", "without"] and len(compiled) == 4


OUT_OF_MEMORY = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.76GiB"


@pytest.mark.parametrize("error", [OUT_OF_MEMORY, "INTERNAL: x"])
def test_generate_says_a_step_ran_out_of_memory_beside_the_cache(tiny, monkeypatch, error):
    """A decode loop that runs out of device memory past its plan (which the cache was checked against)
    raises CacheDoesNotFit saying what to change, XLA's first line kept; other runtime errors pass as XLA
    raised them."""
    from gptoss_mla_jax import generation

    config, params = tiny
    failing = raising_when_run(generation.decode_steps, jax.errors.JaxRuntimeError(error))
    monkeypatch.setattr(generation, "decode_steps", failing)
    if error == OUT_OF_MEMORY:
        said = (
            r"2 sequences x 48 tokens ran out of device memory beside the KV cache, .*\(RESOURCE_EXHAUSTED: "
        )
        with pytest.raises(CacheDoesNotFit, match=said + r".* 2.76GiB\).*XLA_PYTHON_CLIENT_MEM_FRACTION"):
            generate(params, config, [[1] * 7, [2] * 7], 40)
    else:
        with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: x"):
            generate(params, config, [[1] * 7, [2] * 7], 40)


@pytest.mark.parametrize("committed", [False, True])
def test_generate_compiles_its_steps_once_before_the_cache(tiny, caplog, monkeypatch, committed):
    """Prefill and the decode loop are compiled from the cache's shapes before it is allocated, their
    allocations read off the plan (the CPU's too), and run as compiled: each compiles once over a generation
    of two loop calls, the params placed on the device (as a checkpoint restores them; every output then
    is too) or not."""
    from gptoss_mla_jax import generation
    from gptoss_mla_jax.generation import GREEDY, allocated_bytes, decode_steps

    config, params = tiny
    if committed:
        params = jax.device_put(params, jax.devices()[0])
    steps = ("jit(prefill)", "jit(decode_steps)")
    with compiled_at_allocation(caplog, monkeypatch, generation) as at_allocation:
        tokens = generate(params, config, [[1] * 7, [2] * 5], 70)  # 1 + 64 + 5 tokens: the loop twice
    assert len(tokens[0]) == 70
    assert [compiled(caplog).count(step) for step in steps] == [1, 1]
    shapes, arrays = at_allocation  # the cache's shapes (to compile from), then its arrays
    assert not any(step in shapes for step in steps) and all(step in arrays for step in steps)
    cache = jax.eval_shape(lambda: init_cache(config, 1, 16, jnp.float32))
    row = lambda dtype: jax.ShapeDtypeStruct((1,), dtype)
    plan = decode_steps.lower(
        params, cache, row(jnp.int32), jax.random.key(0), row(jnp.bool_), jnp.int32(1), jnp.int32(-1), config,
        GREEDY,
    ).compile()  # fmt: skip
    memory = plan.memory_analysis()
    assert memory.temp_size_in_bytes > 0
    # the loop writes the cache in place: its outputs beside the cache are the tokens and flags alone
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert memory.alias_size_in_bytes == cache_bytes
    assert 0 < allocated_bytes(plan) - memory.temp_size_in_bytes < cache_bytes


def test_cache_overflow_under_jit_is_nan(tiny):
    config, params = tiny
    step = jax.jit(forward, static_argnums=3)
    cache = init_cache(config, 1, 16, jnp.float32)
    cache = step(params, jnp.zeros((1, 16), jnp.int32), cache, config).cache
    logits = step(params, jnp.zeros((1, 1), jnp.int32), cache, config).logits
    assert np.isnan(np.asarray(logits)).all()


def test_cache_of_wrong_shape(tiny):
    config, params = tiny
    tokens = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"cache\['lengths'\] has shape \(3,\), expected \(2,\)"):
        forward(params, tokens, init_cache(config, 3, 16), config)
    cache = init_cache(config, 2, 16)
    cache["layers"][0]["k"] = cache["layers"][0]["k"][:, :2]
    with pytest.raises(
        ValueError, match=r"cache\['layers'\]\[0\]\['k'\] has shape \(2, 2, 2, 8\), expected \(2, 4, 2, 8\)"
    ):
        forward(params, tokens, cache, config)
    with pytest.raises(ValueError, match="cache has 3 layers"):
        forward(params, tokens, {"lengths": jnp.zeros(2, jnp.int32), "layers": cache["layers"][:3]}, config)


def test_params_that_do_not_match_the_config(tiny):
    config, params = tiny
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][1]["self_attn"]["k_proj"]["kernel"] = jnp.zeros((32, 8))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "params['layers'][1]['self_attn']['k_proj']['kernel'] has shape (32, 8), config expects (32, 16)"
        ),
    ):
        forward(bad, jnp.zeros((1, 2), jnp.int32), None, config)
    with pytest.raises(ValueError, match=r"params have 3 layers, config says 4"):
        forward({**params, "layers": params["layers"][:3]}, jnp.zeros((1, 2), jnp.int32), None, config)


def _copy(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[1], folder)
    return folder


def test_checkpoint_config_mismatch(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape (16, 32), "
            "config.json implies (8, 32)"
        ),
    ):
        load_hf(str(folder), progress=False)
    cfg.update(num_key_value_heads=2, num_hidden_layers=2, layer_types=cfg["layer_types"][:2])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not account for.*num_hidden_layers=2"):
        load_hf(str(folder), progress=False)


def test_checkpoint_missing_tensor_or_file(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.router.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=re.escape("missing from the checkpoint: ['model.layers.2.mlp.router.bias']")
    ):
        load_hf(str(folder), progress=False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=re.escape("neither model.safetensors.index.json nor model.safetensors")
    ):
        load_hf(str(folder), progress=False)
