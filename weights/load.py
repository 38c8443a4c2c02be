"""One entry point for every place that takes a model: an HF folder or an Orbax checkpoint, detected."""

from __future__ import annotations

import os
from typing import Any

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import ExpertFormat, GptOss
from weights.orbax_io import is_orbax_checkpoint, read_meta, restore_checkpoint, tokenizer_dir
from weights.safetensors_io import INDEX, SINGLE, Placement, load_hf


def load_model(
    path: str,
    dtype=None,
    experts: ExpertFormat = "dense",
    placement: Placement | None = None,
    progress: bool = True,
) -> tuple[GptOssConfig, dict[str, Any], str | None]:
    """(config, params, tokenizer folder or None) from `path`, whichever kind of checkpoint it is.

    `dtype` and `experts` apply to HF folders; an Orbax checkpoint restores exactly what it saved.
    """
    if is_orbax_checkpoint(path):
        config, params, _ = restore_checkpoint(path, placement=placement)
        return config, params, tokenizer_dir(path)
    if os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX)) or os.path.isfile(os.path.join(path, SINGLE))
    ):
        config, params = load_hf(path, dtype, experts, placement, progress)
        return config, params, path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    raise FileNotFoundError(
        f"{path}: neither a transformers checkpoint folder (config.json + {SINGLE} or {INDEX}) nor an "
        "Orbax checkpoint (<step>/params)"
    )


def from_pretrained(
    path: str,
    dtype=None,
    experts: ExpertFormat = "dense",
    placement: Placement | None = None,
    progress: bool = True,
) -> GptOss:
    """The NNX model (`GptOss`) of an HF folder or Orbax checkpoint (`load_model`'s arguments)."""
    config, params, _ = load_model(path, dtype, experts, placement, progress)
    return GptOss(config, params)


def load_config(path: str) -> GptOssConfig:
    """The config of an HF folder or Orbax checkpoint, without reading any weights."""
    if is_orbax_checkpoint(path):
        return GptOssConfig.from_hf(read_meta(path)["config"])
    return GptOssConfig.from_hf(path)
