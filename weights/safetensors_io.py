"""transformers gpt-oss checkpoint folders in and out: config.json + safetensors (single or sharded).

Reading streams: tensors are read one at a time from memory-mapped files, MXFP4 experts are dequantized
on the accelerator (only the packed bytes cross the host), and each tensor is placed straight onto its
target device(s) with its target sharding, so host memory never holds more than one tensor. Writing goes
to a temporary folder that is renamed into place when complete. Every mismatch is reported with the file,
the tensor and what was expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from gptoss_mla_jax import mxfp4
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import (
    ExpertFormat,
    check_checkpoint_layout,
    expert_format,
    is_shape,
    param_shapes,
)
from weights.hf_layout import HfTensor, file_shapes, hf_tensors, lookup

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
LOAD_THREADS = 4
# What openai/gpt-oss-20b's config.json says of its quantization: MXFP4 experts, everything else bf16.
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
# Placement hook: (params key path, shape) -> where the tensor goes (None: the default device).
Placement = Callable[[tuple, tuple[int, ...]], jax.sharding.Sharding | None]


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold what its config.json promises."""


def tensor_files(folder: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file (full path) that holds it."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"{index} names shard {os.path.basename(file)}, which is not in {folder}"
                )
        return files
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        return dict.fromkeys(_open(single), single)
    raise CheckpointError(f"{folder}: neither {INDEX} nor {SINGLE} found")


# safetensors dtype codes -> numpy dtypes (bfloat16 through ml_dtypes, which jax.numpy exposes).
_DTYPES = {
    "BF16": jnp.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BOOL": np.bool_,
}


def _header(file: str) -> tuple[dict, int]:
    """The safetensors JSON header of `file` and the byte offset where its data starts, validated against
    the file size so that truncation is reported here rather than as a crash later."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file}: truncated: its header promises {8 + n + end} bytes, the file has {size}"
        )
    return header, 8 + n


def _open(file: str):
    """Names in a safetensors file (the header is validated)."""
    return _header(file)[0].keys()


class _Reader:
    """Zero-copy, memory-mapped views of safetensors tensors; every read checks dtype kind and shape.

    A view costs no anonymous host memory: its pages are the page cache's and are streamed straight into
    the device transfer."""

    def __init__(self, files: dict[str, str]):
        self.files, self.headers = files, {}

    def read(self, name: str, shape: tuple[int, ...], packed: bool) -> np.ndarray:
        file = self.files[name]
        if file not in self.headers:
            self.headers[file] = _header(file)
        header, data_start = self.headers[file]
        where = f"{os.path.basename(file)}: tensor {name}"
        if name not in header:
            raise CheckpointError(f"{where} is listed in the index but not in the file")
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if packed and dtype != np.uint8:
            raise CheckpointError(f"{where} has dtype {dtype}, MXFP4 blocks and scales are uint8")
        if not packed and dtype.kind != "f" and dtype.name != "bfloat16":
            raise CheckpointError(f"{where} has dtype {dtype}, expected a floating point type")
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"{where} has shape {tuple(info['shape'])}, config.json implies {shape}")
        start, stop = info["data_offsets"]
        if stop - start != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{where}: {stop - start} bytes do not hold {shape} {dtype}")
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + start, shape=shape)


def checkpoint_expert_format(files: dict[str, str]) -> ExpertFormat:
    return "mxfp4" if any(name.endswith("_blocks") for name in files) else "dense"


def _set(tree, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def put(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` (the same full value on every process) placed with `sharding`. On a sharding that spans
    processes each process fills only the shards its devices hold."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_hf(
    folder: str,
    dtype=None,
    experts: ExpertFormat = "dense",
    placement: Placement | None = None,
    progress: bool = True,
) -> tuple[GptOssConfig, dict[str, Any]]:
    """(config, params) from a transformers checkpoint folder.

    `dtype` casts the floating point tensors (default: keep the file's; MXFP4 experts dequantize to
    bfloat16). `experts="mxfp4"` keeps (or makes) the experts packed in MXFP4 instead of dense.
    `placement(path, shape)` gives each parameter's target sharding.
    """
    config = GptOssConfig.from_hf(folder)
    files = tensor_files(folder)
    source = checkpoint_expert_format(files)
    source_names = {t.name for t in hf_tensors(config, source)}
    missing = sorted(source_names - set(files))
    if missing:
        raise CheckpointError(f"{folder}: tensor(s) missing from the checkpoint: {missing[:5]}")
    unexpected = sorted(set(files) - source_names)
    if unexpected:
        raise CheckpointError(
            f"{folder}: tensor(s) the config does not account for: {unexpected[:5]} "
            f"(config.json: num_hidden_layers={config.num_hidden_layers})"
        )
    source_tensors = {t.path: t for t in hf_tensors(config, source)}
    source_shapes = file_shapes(config, source)
    shapes = param_shapes(config, experts)
    params = jax.tree.map(lambda _: None, shapes, is_leaf=is_shape)  # skeleton, one dict per layer

    reader = _Reader(files)

    def read(path: tuple) -> np.ndarray:
        """The tensor behind `path` as the file stores it (a memory-mapped view)."""
        t = source_tensors[path]
        return reader.read(t.name, source_shapes[t.name], packed=path[-1].endswith(("_blocks", "_scales")))

    def to_device(path: tuple) -> jax.Array:
        """Copy to the accelerator first, then transpose and cast there (no host copies)."""
        value = jnp.asarray(read(path))
        if source_tensors[path].transpose:
            value = value.T
        return value if value.dtype == jnp.uint8 or dtype is None else value.astype(dtype)

    def load(path: tuple) -> list[tuple[tuple, jax.Array | np.ndarray]]:
        key = path[-1]
        if path in source_tensors:  # stored as we want it
            return [(path, to_device(path))]
        if source == "mxfp4":  # dense target from a packed source: dequantize on the device
            blocks, scales = (jnp.asarray(read((*path[:-1], f"{key}_{s}"))) for s in ("blocks", "scales"))
            return [(path, mxfp4.dequantize_experts(blocks, scales, jnp.dtype(dtype or jnp.bfloat16)))]
        if key.endswith("_scales"):  # packed target from a dense source: produced with the blocks
            return []
        dense_key = key.rsplit("_", 1)[0]
        dense = np.asarray(read((*path[:-1], dense_key)), np.float32).transpose(0, 2, 1)
        blocks, scales = mxfp4.quantize(dense)
        return [(path, blocks), ((*path[:-1], f"{dense_key}_scales"), scales)]

    def place(path: tuple, value) -> jax.Array:
        sharding = placement(path, tuple(value.shape)) if placement else None
        return jnp.asarray(value) if sharding is None else put(value, sharding)

    targets = [t.path for t in hf_tensors(config, experts)]
    name = os.path.basename(os.path.normpath(folder))
    # A few tensors in flight at once overlap page-cache reads, host-to-device copies and device work.
    with (
        ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool,
        tqdm(total=len(targets), desc=f"loading {name}", unit="tensor", disable=not progress) as bar,
    ):
        # Placed in a fixed order: across processes, placements are collective and must line up.
        for loaded in pool.map(load, targets):
            for path, value in loaded:
                _set(params, path, place(path, value))
            bar.update()
    return config, params


def _shard_plan(tensors: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, nbytes in tensors:
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return [*shards, current] if current else shards


# An MLA checkpoint carries its PyTorch model (config.json's auto_map names it, see config.MLA_AUTO_MAP).
TRANSFORMERS_MLA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transformers_mla")
TRANSFORMERS_MLA_FILES = ("configuration_gpt_oss_mla.py", "modeling_gpt_oss_mla.py")


def save_hf(
    params: dict[str, Any],
    config: GptOssConfig,
    out_dir: str,
    experts: ExpertFormat | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_from: str | None = None,
    dtype=None,
    progress: bool = True,
) -> None:
    """Write a transformers checkpoint folder (config.json, safetensors shards + index, tokenizer files).

    `experts`: "dense" writes `gate_up_proj` / `down_proj`; "mxfp4" writes `*_blocks` / `*_scales`
    (packed params are written verbatim, dense ones quantized); default: as the params hold them.
    `dtype` casts the floating point tensors (default: as held). The folder appears only when complete
    (written beside it, then renamed; an existing folder is replaced only then).
    """
    check_checkpoint_layout(params)
    have = expert_format(params)
    experts = experts or have
    layout = hf_tensors(config, experts)
    hf_config = config.to_hf()
    if experts == "dense":
        hf_config.pop("quantization_config", None)
    else:
        hf_config["quantization_config"] = hf_config.get("quantization_config") or MXFP4_QUANTIZATION_CONFIG

    def tensor(t: HfTensor) -> np.ndarray:
        value = _tensor(t)
        return value.astype(dtype) if dtype is not None and value.dtype != np.uint8 else value

    def _tensor(t: HfTensor) -> np.ndarray:
        key = t.path[-1]
        if have == experts or "experts" not in t.path or key.endswith("_bias"):
            value = np.asarray(lookup(params, t.path))
            return np.ascontiguousarray(value.T if t.transpose else value)
        if experts == "dense":  # packed -> dense
            blocks, scales = (lookup(params, (*t.path[:-1], f"{key}_{s}")) for s in ("blocks", "scales"))
            return np.asarray(mxfp4.dequantize_experts(blocks, scales, jnp.bfloat16))
        dense_key, part = key.rsplit("_", 1)
        dense = np.asarray(lookup(params, (*t.path[:-1], dense_key)), np.float32).transpose(0, 2, 1)
        return mxfp4.quantize(dense)[0 if part == "blocks" else 1]

    target_shapes = param_shapes(config, experts)

    def nbytes(t: HfTensor) -> int:
        if have == experts or "experts" not in t.path or t.path[-1].endswith("_bias"):
            return int(lookup(params, t.path).nbytes)
        return int(np.prod(lookup(target_shapes, t.path))) * (1 if experts == "mxfp4" else 2)

    if dtype is not None:
        dtype = np.dtype(dtype)

    plan = _shard_plan([(t.name, nbytes(t)) for t in layout], max_shard_bytes)
    by_name = {t.name: t for t in layout}
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        weight_map, total = {}, 0
        bar = tqdm(
            total=len(layout),
            desc=f"writing {os.path.basename(out_dir)}",
            unit="tensor",
            disable=not progress,
        )
        for i, names in enumerate(plan):
            file = SINGLE if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            arrays = {}
            for name in names:
                arrays[name] = tensor(by_name[name])
                total += arrays[name].nbytes
                weight_map[name] = file
                bar.update()
            save_file(arrays, os.path.join(tmp, file), metadata={"format": "pt"})
            del arrays
        bar.close()
        if len(plan) > 1:
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if config.mla is not None:  # the PyTorch MLA model, for trust_remote_code=True
            for name in TRANSFORMERS_MLA_FILES:
                shutil.copy2(os.path.join(TRANSFORMERS_MLA_DIR, name), tmp)
        if tokenizer_from:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_from, name)):
                    shutil.copy2(os.path.join(tokenizer_from, name), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old.", dir=parent)
        os.rename(out_dir, os.path.join(old, "replaced"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
