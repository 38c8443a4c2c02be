"""The command-line entry points, on tiny models."""

import os

from gptoss_mla_jax.generate import main as generate_main
from train.embedded import embedded_teacher_dir
from train.pretrain import train_tokenizer
from weights import convert

from .conftest import make_hf_model


def test_generate_demo_without_download(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no embedded teacher trained yet
    generate_main(["--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert "no download needed" in out and "python -m train.distill" in out
    assert "greedy decode with the KV cache equals full recomputation: True" in out


def test_generate_shows_text_from_the_cached_embedded_teacher(capsys, monkeypatch, tmp_path):
    """Once `train.distill` has cached its teacher (a model with its tokenizer, the training log written
    last), the default run generates from it and prints text."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = embedded_teacher_dir()
    os.makedirs(folder)
    make_hf_model(folder, vocab_size=300)
    train_tokenizer("stdlib", 300, max_chars=200_000).save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "train_log.json"), "w") as f:
        f.write("{}")
    generate_main(["--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "the embedded teacher" in out
    assert "'import os\\nimport sys\\n' -> '" in out and "'class ' -> '" in out
    assert "equals full recomputation: True" in out


def test_generate_from_hf_folder_and_orbax(tiny_hf, tmp_path, capsys):
    folder = tiny_hf[1]
    ckpt = str(tmp_path / "ckpt")
    assert convert.main(["--hf", folder, "--out", ckpt]) == 0
    outputs = []
    for model in (folder, ckpt):
        generate_main(
            ["--model", model, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "5"]
        )
        out = capsys.readouterr().out
        assert "equals full recomputation: True" in out
        outputs.append([line for line in out.splitlines() if line.startswith("prompt")])
    assert outputs[0] == outputs[1]  # the same model, whichever way it was stored
