"""Which student parameters train, and the student as a pytree that shares the teacher's frozen arrays.

One model, two attentions: teacher and student share every frozen weight (one copy in memory); only the
`--train` set (default: the converted layers' MLA projections `kv_a`, `kv_b`, `k_rope`, and rorope's
`rope_mix`) is trained and gets optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_mla_jax.config import GptOssConfig
from train.sharding import path_name

Params = dict[str, Any]

# Which student parameters train ("/"-joined parameter paths). The MLA projections always do: they are new.
TRAIN_SETS: dict[str, Callable[[str], bool]] = {
    "mla": lambda path: re.search(r"self_attn/(kv_a|kv_b|k_rope|rope_mix)(/|$)", path) is not None,
    "mla+attn": lambda path: "/self_attn/" in path,
    "all": lambda path: True,
}
SHARED_ATTENTION = ("q_proj", "o_proj", "sinks")  # kept by the conversion, shared with the teacher


class DistillError(ValueError):
    """A run that must not start (or continue): mismatched models, a non-finite loss, a bad flag."""


def scalar(x) -> float:
    """A replicated scalar as a Python number (also when its devices span several processes)."""
    return np.asarray(x.addressable_shards[0].data).item()


def select(tree, keep: Callable[[str], bool], path: str = ""):
    """The leaves of `tree` whose path satisfies `keep`, as nested dicts (list indices become string
    keys, so Orbax can name them); None when nothing is kept."""
    if not isinstance(tree, (dict, list)):
        return tree if keep(path) else None
    items = tree.items() if isinstance(tree, dict) else ((str(i), v) for i, v in enumerate(tree))
    out = {}
    for key, value in items:
        sub = select(value, keep, f"{path}/{key}" if path else key)
        if sub is not None:
            out[key] = sub
    return out or None


def overlay(tree, sub):
    """`tree` with the leaves of `sub` (a `select` result) put in, adding the keys `tree` lacks."""
    if sub is None:
        return tree
    if isinstance(tree, list):
        return [overlay(value, sub.get(str(i))) for i, value in enumerate(tree)]
    if isinstance(tree, dict):
        kept = {k: overlay(v, sub.get(k)) for k, v in tree.items()}
        return {**kept, **{k: v for k, v in sub.items() if k not in tree}}
    return sub


def split_student(student: Params, train: str = "mla") -> dict:
    """The trainable part of the student (`TRAIN_SETS[train]`) as float32 copies (the train step donates
    them)."""
    if train not in TRAIN_SETS:
        raise DistillError(f"--train {train!r}: expected one of {', '.join(TRAIN_SETS)}")
    trainable = select(student, TRAIN_SETS[train])
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainable):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise DistillError(
                f"--train {train}: {path_name(path)} is {leaf.dtype}; packed MXFP4 experts cannot train "
                "(load them dequantized)"
            )
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)


def check_pair(teacher: Params, teacher_config: GptOssConfig, student: Params, student_config: GptOssConfig):
    """Refuse a student that is not a conversion of this teacher: same config apart from the MLA section,
    and bitwise the same weights wherever the conversion keeps them."""
    if student_config.mla is None:
        raise DistillError("--student has no MLA layers (convert it with python -m weights.to_mla first)")
    if teacher_config.mla is not None:
        raise DistillError("--teacher is itself an MLA model; distill from the original GQA model")
    if dataclasses.replace(student_config, mla=None).to_hf() != teacher_config.to_hf():
        raise DistillError(
            "--teacher and --student configs differ beyond the MLA settings (vocabulary, sizes...)"
        )
    is_new = TRAIN_SETS["mla"]
    teacher_leaves = {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(teacher)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(student):
        name = path_name(path)
        if is_new(name):
            continue
        if name not in teacher_leaves:
            raise DistillError(f"--student has {name}, which --teacher lacks: not a conversion of it")
        if leaf.shape != teacher_leaves[name].shape or not scalar(
            jnp.array_equal(leaf, teacher_leaves[name])
        ):
            raise DistillError(
                f"--teacher and --student differ in {name}: the student is not a conversion of this teacher"
            )


def assemble_student(teacher: Params, trainable: dict, student_config: GptOssConfig, dtype) -> Params:
    """The student as a pytree whose frozen leaves ARE the teacher's arrays (shared, not copied)."""
    layers = [
        {**layer, "self_attn": {name: layer["self_attn"][name] for name in SHARED_ATTENTION}}
        if student_config.mla.index(i) is not None
        else layer
        for i, layer in enumerate(teacher["layers"])
    ]
    return overlay({**teacher, "layers": layers}, jax.tree.map(lambda x: x.astype(dtype), trainable))
