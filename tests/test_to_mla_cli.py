"""`python -m weights.to_mla` end to end on a tiny model: checkpoint, report, plot, export, bad input."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from gptoss_mla_jax import forward_jit
from gptoss_mla_jax.generation import generate
from support.corpora import corpus_files, iter_texts
from weights import export
from weights.load import load_model
from weights.to_mla import main as to_mla


@pytest.fixture(scope="module")
def source(tiny_hf, tmp_path_factory):
    """The tiny model with a word-level tokenizer (97 ids, its vocabulary) trained on stdlib text."""
    folder = tmp_path_factory.mktemp("src") / "model"
    shutil.copytree(tiny_hf[1], folder)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [t for t, _ in zip(iter_texts("stdlib", "train"), range(30), strict=False)]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=97, special_tokens=["[UNK]"]))
    assert tok.get_vocab_size() == 97
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_corpus_splits_are_disjoint_and_stable():
    splits = {s: set(corpus_files("stdlib", s)) for s in ("train", "validation", "test")}
    assert (
        all(splits.values())
        and not (splits["train"] & splits["test"])
        and not (splits["validation"] & splits["test"])
    )
    assert corpus_files("stdlib", "test") == corpus_files("stdlib", "test")


@pytest.mark.parametrize("mode", ["decompressed", "partial", "rorope"])
def test_convert_save_decode_export(source, tmp_path, mode):
    out = tmp_path / "mla"
    args = [
        "--model",
        source,
        "--out",
        str(out),
        "--latent-dim",
        "12",
        "--rope-mode",
        mode,
        "--rope-pairs",
        "2",
        "--rope-components",
        "1",
    ]
    assert to_mla([*args, "--calib-tokens", "256", "--calib-seq-len", "64"]) == 0
    report = json.loads((out / "mla_report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == [1, 3]  # the full-attention layers by default
    for row in report["layers"]:
        assert 0 < row["energy_retained"] < 1 and 0 < row["k_rel_error"] < 1 and 0 < row["v_rel_error"] < 1
        assert (len(row.get("rope_pairs", [])) == 2) == (mode == "partial")
        assert (row.get("rope_components") == 1) == (mode == "rorope")
    assert (out / "mla_energy.png").stat().st_size > 1000

    config, params, tokenizer = load_model(str(out))
    assert config.mla.rope_mode == mode and config.mla.layers == (1, 3) and tokenizer
    # Decode == full forward at every position (float32) through generate's cached path.
    prompts = [[5, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    for prompt, new in zip(prompts, generate(params, config, prompts, 10), strict=True):
        logits = np.asarray(forward_jit(params, jnp.asarray([prompt + new[:-1]]), None, config)[0][0])
        np.testing.assert_array_equal(logits.argmax(-1)[len(prompt) - 1 :], new)

    # Export as safetensors with the MLA settings in config.json; loading it back is exact.
    exported = tmp_path / "exported"
    assert export.main(["--ckpt", str(out), "--out", str(exported)]) == 0
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["model_type"] == "gpt_oss_mla" and hf_config["mla"]["layers"] == [1, 3]
    config2, params2, _ = load_model(str(exported))
    assert config2 == config
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 13)))
    np.testing.assert_array_equal(
        np.asarray(forward_jit(params2, tokens, None, config2)[0]),
        np.asarray(forward_jit(params, tokens, None, config)[0]),
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--latent-dim", "33"], "latent dim 33 of layer 1 is outside 1..24"),
        (["--rope-pairs", "5"], "--rope-pairs 5 must be in 1..4"),
        (["--rope-mode", "rorope", "--rope-components", "3"], "--rope-components 3 must be in 1..2"),
        (["--rope-mode", "rorope", "--rope-fold", "3"], "--rope-fold 3 must divide the 4 frequency pairs"),
        (["--layers", "1,7"], "layer(s) [7] do not exist"),
        (["--calib-tokens", "0"], "calibration data is empty"),
        (["--calib", "/nonexistent/corpus"], "neither 'stdlib' nor an existing file"),
    ],
)
def test_bad_input_names_the_flag_and_writes_nothing(source, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    # The calibration of test_convert_save_decode_export (the programs it compiled are reused); the flags
    # under test come last and override it.
    calib = ["--calib-tokens", "256", "--calib-seq-len", "64"]
    assert to_mla(["--model", source, "--out", str(out), "--rope-mode", "partial", *calib, *flags]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_already_mla_source_is_refused(source, tmp_path, capsys):
    first = tmp_path / "first"
    flags = ["--rope-mode", "decompressed", "--init", "svd", "--latent-dim", "8"]
    assert to_mla(["--model", source, "--out", str(first), *flags]) == 0
    assert to_mla(["--model", str(first), "--out", str(tmp_path / "second"), *flags]) == 1
    assert "already MLA" in capsys.readouterr().err
