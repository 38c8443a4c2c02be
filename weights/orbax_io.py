"""Orbax checkpoints of a model: params (any expert format, sharded or not) plus a JSON record of what
the checkpoint is (the HF config, expert format, where it came from) and a copy of the tokenizer files.

    CKPT/<step>/params   the params pytree (Orbax StandardSave)
    CKPT/<step>/meta     {"config": config.json dict, "experts": "dense"|"mxfp4", "source": ...}
    CKPT/tokenizer/      tokenizer files copied from the source folder, if it had any
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import check_checkpoint_layout, check_params, expert_format
from weights.safetensors_io import TOKENIZER_FILES, Placement

TOKENIZER_DIR = "tokenizer"


def is_orbax_checkpoint(path: str) -> bool:
    """An Orbax checkpoint folder of ours: integer step folders holding `params` and `meta`."""
    if not os.path.isdir(path):
        return False
    return any(
        name.isdigit() and os.path.isdir(os.path.join(path, name, "params")) for name in os.listdir(path)
    )


def save_checkpoint(
    directory: str,
    params: dict[str, Any],
    config: GptOssConfig,
    step: int = 0,
    source: str | None = None,
    max_to_keep: int | None = None,
) -> None:
    """Save `params` at `step` (Orbax writes into a temporary folder and renames it when complete)."""
    check_params(params, config)
    check_checkpoint_layout(params)
    directory = os.path.abspath(directory)
    meta = {"config": config.to_hf(), "experts": expert_format(params), "source": source}
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        manager.save(
            step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        )
        manager.wait_until_finished()
    if source and os.path.isdir(source) and jax.process_index() == 0:
        copy_tokenizer(source, directory)


def copy_tokenizer(source: str, directory: str) -> None:
    """Copy the tokenizer files found in `source` into `directory`/tokenizer."""
    files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if files:
        os.makedirs(os.path.join(directory, TOKENIZER_DIR), exist_ok=True)
        for name in files:
            shutil.copy2(os.path.join(source, name), os.path.join(directory, TOKENIZER_DIR, name))


def tokenizer_dir(directory: str) -> str | None:
    path = os.path.join(directory, TOKENIZER_DIR)
    return path if os.path.isdir(path) else None


def _manager_and_step(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    """An open manager of our checkpoint at `directory` and the step to read (latest by default)."""
    if not is_orbax_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not an Orbax checkpoint of this project (no <step>/params)")
    # Handlers named up front: without them item_metadata() is None and a restore falls back to the
    # shardings recorded at save time (devices another process may not have).
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
        manager.close()
        raise FileNotFoundError(f"{directory}: no step {step} (have {sorted(manager.all_steps())})")
    return manager, step


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
    """The JSON record of a checkpoint step (latest by default), without reading the params."""
    manager, step = _manager_and_step(os.path.abspath(directory), step)
    with manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return dict(meta, step=step)


def restore_checkpoint(
    directory: str, step: int | None = None, placement: Placement | None = None
) -> tuple[GptOssConfig, dict[str, Any], dict[str, Any]]:
    """(config, params, meta) from the latest (or given) step, each array placed by `placement`."""
    manager, step = _manager_and_step(os.path.abspath(directory), step)
    with manager:
        tree = manager.item_metadata(step)["params"]
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise FileNotFoundError(f"{directory}: step {step} has no readable params metadata")
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's

        def abstract(path, leaf):
            sharding = placement(tuple(_key(k) for k in path), tuple(leaf.shape)) if placement else None
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding or default)

        target = jax.tree_util.tree_map_with_path(abstract, tree)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
    meta = dict(restored["meta"], step=step)
    config = GptOssConfig.from_hf(meta["config"])
    check_params(restored["params"], config)
    return config, restored["params"], meta


def _key(k) -> Any:
    return getattr(k, "key", getattr(k, "idx", k))
