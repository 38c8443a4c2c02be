"""The command-line entry points, on tiny models."""

from gptoss_mla_jax.generate import main as generate_main
from weights import convert


def test_generate_demo_without_download(capsys):
    generate_main(["--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert "no download needed" in out
    assert "greedy decode with the KV cache equals full recomputation: True" in out


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
