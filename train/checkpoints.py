"""Checkpoints of a distillation run (trainable weights, optimizer state, grain iterator state) and the
healed student as a model checkpoint."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from gptoss_mla_jax.config import GptOssConfig
from train.student import Params, overlay


class Checkpoints:
    """Orbax CheckpointManager over (trainable, optimizer state, data iterator state), keeping the last K.
    Collective on several processes: every process calls save / restore."""

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, trainable, opt_state, data_state: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
            ),
        )
        self.manager.wait_until_finished()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, trainable, opt_state):
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract(trainable)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["trainable"], out["opt_state"], out["data"]


def save_student(
    directory: str, student: Params, config: GptOssConfig, trained: dict, step: int, tokenizer: str | None
) -> None:
    """The healed student as a model checkpoint (`weights.export` and `eval.ppl` read it): the trained
    leaves put back into the student, each in the dtype the student held it in. Collective."""
    from weights.orbax_io import is_orbax_checkpoint, read_meta, save_checkpoint

    if is_orbax_checkpoint(directory) and read_meta(directory)["step"] == step:
        return  # a resumed run that had already finished
    healed = jax.tree.map(lambda new, old: new.astype(old.dtype), overlay(student, trained), student)
    save_checkpoint(directory, healed, config, step=step, source=tokenizer, max_to_keep=1)
