"""Read a transformers gpt-oss checkpoint folder (config.json + one or more safetensors files).

Handles a single `model.safetensors` and sharded folders with `model.safetensors.index.json`, in the plain
(dequantized) layout that `save_pretrained` writes. Tensors are read one at a time from memory-mapped
files. Every mismatch is reported with the file, the tensor and the shapes involved.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open
from tqdm.auto import tqdm

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import is_shape, param_shapes
from weights.hf_layout import hf_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold what its config.json promises."""


def tensor_files(folder: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file (full path) that holds it."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise CheckpointError(f"{index} names {os.path.basename(file)}, which is not in {folder}")
        return files
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        with safe_open(single, "np") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{folder}: neither {INDEX} nor {SINGLE} found")


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_hf(folder: str, dtype=None, progress: bool = True) -> tuple[GptOssConfig, dict[str, Any]]:
    """(config, params) from a transformers checkpoint folder; `dtype` casts (default: keep the file's)."""
    config = GptOssConfig.from_hf(folder)
    files = tensor_files(folder)
    wanted = hf_tensors(config)
    missing = [t.name for t in wanted if t.name not in files]
    if missing:
        raise CheckpointError(f"{folder}: tensor(s) missing from the checkpoint: {missing[:5]}")
    unexpected = sorted(set(files) - {t.name for t in wanted})
    if any(n.endswith(("_blocks", "_scales")) for n in unexpected):
        raise CheckpointError(
            f"{folder}: MXFP4-quantized expert tensors ({unexpected[0]}, ...) are not readable by this "
            "loader; save the model dequantized"
        )
    if unexpected:
        raise CheckpointError(
            f"{folder}: tensor(s) the config does not account for: {unexpected[:5]} "
            f"(config.json: num_hidden_layers={config.num_hidden_layers})"
        )

    shapes = param_shapes(config)
    # A fresh nested dict/list skeleton (one dict per layer) that the loop fills in.
    params = jax.tree.map(lambda _: None, shapes, is_leaf=is_shape)
    handles: dict[str, Any] = {}
    try:
        for t in tqdm(
            wanted, desc=f"loading {os.path.basename(os.path.normpath(folder))}", disable=not progress
        ):
            file = files[t.name]
            if file not in handles:
                handles[file] = safe_open(file, "np").__enter__()
            array = handles[file].get_tensor(t.name)
            if t.transpose:
                array = array.T
            expected = _lookup(shapes, t.path)
            if array.shape != expected:
                raise CheckpointError(
                    f"{os.path.basename(file)}: tensor {t.name} has shape {_file_shape(array.shape, t)}, "
                    f"config.json implies {_file_shape(expected, t)}"
                )
            _set(params, t.path, jnp.asarray(array, dtype=dtype or array.dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return config, params


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _file_shape(shape: tuple, t) -> tuple:
    """A shape as the file stores it (linear weights are [out, in] there)."""
    return tuple(shape[::-1] if t.transpose else shape)
