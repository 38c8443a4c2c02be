"""An exported MLA checkpoint runs in transformers (trust_remote_code=True) exactly like it runs here."""

import numpy as np
import pytest
import torch
import transformers

from gptoss_mla_jax.generation import generate
from gptoss_mla_jax.model import forward
from train.distill import main as distill_main
from weights.export import main as export_main
from weights.orbax_io import restore_checkpoint, save_checkpoint
from weights.safetensors_io import load_hf
from weights.to_mla import convert

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [2, 71, 14]]
NEW_TOKENS = 9  # prompt + new tokens pass the sliding window (4) and the ring wraps


@pytest.fixture(scope="module", params=["decompressed", "partial", "rorope", "rorope-fold2"])
def exported(request, tiny_hf, tmp_path_factory):
    """(our MLA config, our params, the transformers model loaded from the exported folder)."""
    root = tmp_path_factory.mktemp(f"mla_{request.param}")
    config, teacher = load_hf(tiny_hf[1], progress=False)
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (4, 32))
    mode, _, fold = request.param.partition("-fold")
    kept = {"rope_pairs": int(mode == "partial"), "rope_components": int(mode == "rorope")}
    mla_config, params, _ = convert(
        teacher,
        config,
        6,
        mode,
        layers=(0, 1, 3),
        init="pca",
        calib_tokens=calib,
        rope_fold=int(fold or 1),
        **kept,
    )
    save_checkpoint(str(root / "ckpt"), params, mla_config)
    assert export_main(["--ckpt", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "hf"), trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return mla_config, params, model


def test_loads_as_the_mla_model(exported):
    config, _, model = exported
    assert type(model).__name__ == "GptOssMlaForCausalLM"
    assert model.config.model_type == "gpt_oss_mla"
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn, "k_proj") and attn.kv_a_proj.weight.shape == (6, config.hidden_size)
    assert hasattr(model.model.layers[2].self_attn, "k_proj")  # layer 2 stays GQA


def test_logits_equal_ours(exported):
    config, params, model = exported
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 12))
    ours = np.asarray(forward(params, tokens, None, config)[0])
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_ours(exported):
    config, params, model = exported
    ours = generate(params, config, PROMPTS, NEW_TOKENS)
    for prompt, expected in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.as_tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                min_new_tokens=NEW_TOKENS,
            )
        assert out[0, len(prompt) :].tolist() == expected


def test_cache_holds_only_the_latent(exported):
    config, _, model = exported
    mla = config.mla
    batch, seq = 2, 3
    with torch.no_grad():
        cache = model(torch.zeros((batch, seq), dtype=torch.long), use_cache=True).cache
    G, d = config.num_key_value_heads, config.head_dim
    for i, layer in enumerate(cache.layers):
        held = [layer.keys, layer.values]
        if mla.index(i) is None:
            assert [t.shape for t in held] == [(batch, G, seq, d)] * 2
            continue
        pairs = mla.num_rope_pairs(i)
        r, rope = mla.latent_dims[mla.index(i)], mla.rope_values(i, d, G)
        expected = [(batch, 1, seq, r), (batch, G, seq, 2 * pairs) if pairs else (batch, 1, seq, rope)]
        assert [t.shape for t in held] == expected
        nbytes = sum(t.numel() * t.element_size() for t in held)
        assert nbytes == batch * seq * (r + rope) * 4 < batch * seq * 2 * G * d * 4


def test_cached_decode_logits_equal_ours(exported):
    """Token by token through the latent cache (past the sliding window) gives our full-sequence logits."""
    config, params, model = exported
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, 11))
    ours = np.asarray(forward(params, tokens, None, config)[0])
    with torch.no_grad():
        out = model(torch.as_tensor(tokens[:, :3]), use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(3, tokens.shape[1]):
            out = model(torch.as_tensor(tokens[:, t : t + 1]), cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    np.testing.assert_allclose(torch.cat(steps, dim=1).numpy(), ours, rtol=1e-4, atol=1e-4)


def test_converted_distilled_exported_model_runs_in_transformers(tiny_hf, tmp_path):
    """The whole pipeline: weights.to_mla's conversion, train.distill, weights.export, transformers."""
    config, teacher = load_hf(tiny_hf[1], progress=False)
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (4, 32))
    mla_config, converted, _ = convert(teacher, config, 6, "decompressed", init="pca", calib_tokens=calib)
    save_checkpoint(str(tmp_path / "student"), converted, mla_config)
    np.save(
        tmp_path / "ids.npy", np.random.default_rng(1).integers(0, config.vocab_size, 2048).astype(np.int32)
    )
    run = tmp_path / "run"
    flags = [
        "--teacher",
        tiny_hf[1],
        "--student",
        str(tmp_path / "student"),
        "--data",
        str(tmp_path / "ids.npy"),
    ]
    flags += [
        "--out",
        str(run),
        "--seq-len",
        "16",
        "--batch",
        "4",
        "--steps",
        "5",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
    ]
    # --keep-healed: this checks that the trained weights travel (keeping the better student is tested in
    # test_distill_cli); on random data five steps may well not beat the conversion.
    assert distill_main([*flags, "--dtype", "fp32", "--no-progress", "--keep-healed"]) == 0
    healed_config, healed, meta = restore_checkpoint(str(run / "student"))
    assert healed_config == mla_config and meta["step"] == 5
    kv_a = lambda p: np.asarray(p["layers"][1]["self_attn"]["kv_a"]["kernel"])
    assert not np.allclose(kv_a(healed), kv_a(converted))  # trained
    np.testing.assert_array_equal(np.asarray(healed["embed_tokens"]), np.asarray(converted["embed_tokens"]))

    assert export_main(["--ckpt", str(run / "student"), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, 10))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(
        theirs, np.asarray(forward(healed, tokens, None, healed_config)[0]), rtol=1e-4, atol=1e-4
    )
