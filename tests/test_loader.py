import json

import jax
import numpy as np

from weights.safetensors_io import load_hf, tensor_files

from .conftest import make_hf_model


def test_sharded_equals_single_file(tiny_hf, tmp_path):
    model, single = tiny_hf
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    # One layer's tensors straddle two shards.
    layer0 = {f for name, f in index["weight_map"].items() if name.startswith("model.layers.0.")}
    assert len(layer0) >= 2 or any(
        len({f for n, f in index["weight_map"].items() if n.startswith(f"model.layers.{i}.")}) >= 2
        for i in range(4)
    )
    assert set(tensor_files(str(sharded))) == set(tensor_files(single))
    c1, p1 = load_hf(single, progress=False)
    c2, p2 = load_hf(str(sharded), progress=False)
    assert c1 == c2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)


def test_layout_and_dtype(tmp_path):
    model = make_hf_model(tmp_path, seed=3)
    _, params = load_hf(str(tmp_path), dtype=np.float32, progress=False)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(
        np.asarray(params["layers"][2]["self_attn"]["q_proj"]["kernel"]),
        sd["model.layers.2.self_attn.q_proj.weight"].T,
    )
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(params["layers"][3]["mlp"]["experts"]["down_proj"]),
        sd["model.layers.3.mlp.experts.down_proj"],
    )
    _, bf16 = load_hf(str(tmp_path), dtype="bfloat16", progress=False)
    assert {x.dtype.name for x in jax.tree.leaves(bf16)} == {"bfloat16"}
