"""Checkpoints in and out: MXFP4 experts, sharded folders, Orbax, export back to transformers."""

import copy
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from gptoss_mla_jax import forward
from gptoss_mla_jax.mxfp4 import quantize
from weights import convert, export
from weights.load import load_model
from weights.orbax_io import restore_checkpoint, save_checkpoint
from weights.safetensors_io import CheckpointError, load_hf, save_hf

from .conftest import hf_logits, make_hf_model

MXFP4_ABLE = dict(intermediate_size=32)  # MXFP4 packs 32 values along each expert's input dimension


def _add_tokenizer(folder):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))


def _write_mxfp4_folder(model, folder):
    """The published gpt-oss layout, written independently of our writer: bf16 tensors, experts as
    `*_blocks` / `*_scales`, three shards with an index, quantization_config in config.json."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize(value.float().transpose(1, 2).numpy())  # [E, out, in]
            tensors[name + "_blocks"] = torch.from_numpy(blocks)
            tensors[name + "_scales"] = torch.from_numpy(scales)
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    names = sorted(tensors)
    cut = [
        names.index("model.layers.1.mlp.experts.down_proj_blocks"),
        names.index("model.layers.3.input_layernorm.weight"),
    ]
    shards = [names[: cut[0]], names[cut[0] : cut[1]], names[cut[1] :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in shard}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.embed_tokens"],
    }
    config["dtype"] = "bfloat16"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    _add_tokenizer(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float32 folder, a bfloat16 folder and an MXFP4 folder of the same random model."""
    root = tmp_path_factory.mktemp("ckpts")
    model = make_hf_model(root / "fp32", seed=5, **MXFP4_ABLE)
    _add_tokenizer(root / "fp32")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="60KB")
    _add_tokenizer(root / "bf16")
    _write_mxfp4_folder(model, root / "mxfp4")
    return {"model": model, **{k: str(root / k) for k in ("fp32", "bf16", "mxfp4")}}


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    index = pathlib.Path(folder, "model.safetensors.index.json")
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    for file in files:
        with safe_open(os.path.join(folder, file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return out


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


def test_mxfp4_folder_matches_transformers(folders):
    tokens = np.random.default_rng(0).integers(0, 97, (2, 13))
    hf = transformers.GptOssForCausalLM.from_pretrained(folders["mxfp4"], dtype=torch.float32)
    want = hf_logits(hf.eval(), tokens)
    config, dense = load_hf(folders["mxfp4"], dtype=jnp.float32, progress=False)
    np.testing.assert_allclose(
        np.asarray(forward(dense, jnp.asarray(tokens), None, config)[0]), want, atol=1e-4
    )
    # Held packed, dequantized inside the forward: the same numbers.
    _, packed = load_hf(folders["mxfp4"], dtype=jnp.float32, experts="mxfp4", progress=False)
    assert packed["layers"][0]["mlp"]["experts"]["gate_up_proj_blocks"].dtype == jnp.uint8
    np.testing.assert_allclose(
        np.asarray(forward(packed, jnp.asarray(tokens), None, config)[0]), want, atol=1e-4
    )


@pytest.mark.parametrize(
    ("source", "convert_args", "export_args"),
    [
        ("bf16", [], []),  # bf16 -> bf16
        ("mxfp4", ["--experts", "mxfp4"], ["--experts", "mxfp4"]),  # packed bytes carried verbatim
        ("mxfp4", [], ["--experts", "mxfp4"]),  # dequantized to bf16, then requantized
    ],
)
def test_round_trip_is_bitwise(folders, tmp_path, source, convert_args, export_args):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert convert.main(["--hf", folders[source], "--out", str(ckpt), *convert_args]) == 0
    assert (
        export.main(["--ckpt", str(ckpt), "--out", str(out), "--max-shard-size", "50KB", *export_args]) == 0
    )
    _assert_same_tensors(folders[source], out)
    assert len(os.listdir(out)) > 4 and (out / "model.safetensors.index.json").exists()  # sharded
    source_folder = pathlib.Path(folders[source])
    assert (out / "tokenizer.json").read_text() == (source_folder / "tokenizer.json").read_text()
    written = json.loads((out / "config.json").read_text())
    assert written == json.loads((source_folder / "config.json").read_text())


def test_export_loads_in_transformers_with_our_logits(folders, tmp_path):
    config, params, _ = load_model(folders["fp32"], progress=False)
    for experts in ("dense", "mxfp4"):
        save_hf(params, config, str(tmp_path / experts), experts, max_shard_bytes=30_000, progress=False)
        hf = transformers.GptOssForCausalLM.from_pretrained(tmp_path / experts, dtype=torch.float32).eval()
        _, ours, _ = load_model(str(tmp_path / experts), dtype=jnp.float32, progress=False)
        tokens = np.random.default_rng(1).integers(0, 97, (2, 11))
        got = np.asarray(forward(ours, jnp.asarray(tokens), None, config)[0])
        np.testing.assert_allclose(got, hf_logits(hf, tokens), atol=1e-4)


def test_orbax_restore_onto_a_mesh(folders, tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def placement(path, shape):  # shard the embedding's hidden axis, replicate the rest
        return sharded if path == ("embed_tokens",) else replicated

    config, params = load_hf(folders["bf16"], placement=placement, progress=False)
    assert params["embed_tokens"].sharding == sharded
    assert params["layers"][2]["self_attn"]["q_proj"]["kernel"].sharding == replicated
    save_checkpoint(str(tmp_path / "ck"), params, config, step=7, source=folders["bf16"])
    config2, restored, meta = restore_checkpoint(str(tmp_path / "ck"), placement=placement)
    assert config2 == config and meta["step"] == 7 and meta["experts"] == "dense"
    assert restored["embed_tokens"].sharding == sharded
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, restored)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    _, _, tokenizer = load_model(str(tmp_path / "ck"))
    assert tokenizer and os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))


# ---- bad input: a clear error naming file and tensor, a non-zero exit, nothing left behind ------------


def _broken_copy(folders, tmp_path, source="mxfp4"):
    folder = tmp_path / "broken"
    shutil.copytree(folders[source], folder)
    return folder


def _fails(folder, tmp_path, capsys, match):
    out = tmp_path / "out_ckpt"
    assert convert.main(["--hf", str(folder), "--out", str(out)]) == 1
    assert not out.exists() or not os.listdir(out)  # no partial output
    err = capsys.readouterr().err
    assert match in err, err
    with pytest.raises((CheckpointError, FileNotFoundError)):
        load_hf(str(folder), progress=False)


def test_truncated_shard(folders, tmp_path, capsys):
    folder = _broken_copy(folders, tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _fails(folder, tmp_path, capsys, "model-00001-of-00002.safetensors")


def test_index_names_a_missing_shard(folders, tmp_path, capsys):
    folder = _broken_copy(folders, tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _fails(folder, tmp_path, capsys, "names shard model-00002-of-00002.safetensors, which is not in")


def test_wrong_dtype(folders, tmp_path, capsys):
    folder = _broken_copy(folders, tmp_path)
    file = folder / "model-00000-of-00002.safetensors"
    with safe_open(file, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] = tensors[
        "model.layers.0.mlp.experts.gate_up_proj_scales"
    ].float()
    save_file(tensors, file)
    _fails(
        folder, tmp_path, capsys, "tensor model.layers.0.mlp.experts.gate_up_proj_scales has dtype float32"
    )


def test_unexpected_and_missing_tensor(folders, tmp_path, capsys):
    folder = _broken_copy(folders, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.self_attn.sinks"] = "model-00000-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(folder, tmp_path, capsys, "model.layers.9.self_attn.sinks")
    del index["weight_map"]["model.layers.9.self_attn.sinks"]
    del index["weight_map"]["model.layers.2.self_attn.o_proj.bias"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(folder, tmp_path, capsys, "model.layers.2.self_attn.o_proj.bias")


def test_neither_kind_of_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a transformers checkpoint folder"):
        load_model(str(tmp_path))


def test_export_refuses_to_clobber(folders, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert export.main(["--ckpt", folders["bf16"], "--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
