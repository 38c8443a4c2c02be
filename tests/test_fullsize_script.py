"""The full-size checkpoint script, run at a small size: the layout it writes is the published one and
both loaders read it to the same dequantized values."""

import json

import pytest

from eval import fullsize_checkpoint as script
from weights.hf_layout import hf_tensors


def test_written_layout_loads_in_both(tmp_path, monkeypatch):
    info = script.write_checkpoint(str(tmp_path), script.SMOKE)
    assert info["tensors"] == 459 == len(hf_tensors(script.SMOKE, "mxfp4")) and info["shards"] == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files_of_layer = {
        i: {f for n, f in index["weight_map"].items() if n.startswith(f"model.layers.{i}.")}
        for i in range(24)
    }
    assert any(len(files) == 2 for files in files_of_layer.values())  # a layer straddles two shards
    ours = script.load_ours(str(tmp_path), "dense")
    pytest.importorskip("accelerate")
    # transformers on CPU: same code path as the GPU run except the device map.
    import torch
    import transformers

    model = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    state = model.state_dict()
    for name, digest in ours["sha256"].items():
        assert script._sha(state[name].view(torch.int16).numpy()) == digest, name
