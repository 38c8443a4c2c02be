"""Healing never leaves a student worse than its conversion: at the end of a run the converted (initial)
and the healed student are scored on the run's held-out tokens, and the one with the lower perplexity is
the run's output student (RUN_DIR/student). A near-lossless conversion can only lose from training on a
finite budget, so there the conversion is kept. `--keep-healed` keeps the healed student regardless.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax

from gptoss_mla_jax.config import GptOssConfig
from train.checkpoints import save_student
from train.student import Params, overlay


def keep_better(converted_ppl: float, healed_ppl: float, keep_healed: bool = False) -> str:
    """Which student a run outputs, "healed" or "converted", from their held-out perplexities.

    The healed one unless it is strictly worse (a tie costs nothing and the healed one is what the run
    was asked for) or not finite while the conversion is."""
    if keep_healed or not math.isfinite(converted_ppl):
        return "healed"
    return "healed" if healed_ppl <= converted_ppl else "converted"


def decide(converted: dict, healed: dict, keep_healed: bool = False) -> dict:
    """summary.json's record of the choice from the two students' `perplexity` results: which one was
    kept, both perplexities and, where a teacher was scored alongside, both KL(teacher || student)."""
    record = {
        "kept": keep_better(converted["ppl"], healed["ppl"], keep_healed),
        "keep_healed": keep_healed,
        "converted_ppl": converted["ppl"],
        "healed_ppl": healed["ppl"],
    }
    for name, result in (("converted", converted), ("healed", healed)):
        if "kl" in result:
            record[f"{name}_kl"] = result["kl"]
    return record


def message(record: dict) -> str | None:
    """The line printed when the conversion is kept (None when the healed student is)."""
    if record["kept"] != "converted":
        return None
    return (
        f"kept the converted student: held-out PPL {record['converted_ppl']:.4f} converted vs "
        f"{record['healed_ppl']:.4f} healed (--keep-healed keeps the healed one)"
    )


def healed_student(student: Params, trained: dict) -> Params:
    """The healed student as RUN_DIR/student holds it: the trained leaves put back into the student, each
    in the dtype the student held it in (so it is scored exactly as it is saved)."""
    return jax.tree.map(lambda new, old: new.astype(old.dtype), overlay(student, trained), student)


def save_kept(
    directory: str,
    student: Params,
    config: GptOssConfig,
    trained: dict,
    step: int,
    tokenizer: str | None,
    kept: str,
    previous: str | None,
) -> None:
    """RUN_DIR/student: the kept student at `step`. Collective.

    `previous` is what summary.json said was kept before this invocation (None where it says nothing: a
    folder saved then holds the healed student). `save_student` leaves a folder that already holds this
    step alone, so a finished run resumed with the other choice (`--keep-healed` added or dropped)
    replaces it here."""
    from weights.orbax_io import is_orbax_checkpoint

    # Process 0 alone decides and removes; every process waits for it before the collective save.
    if jax.process_index() == 0 and (previous or "healed") != kept and is_orbax_checkpoint(directory):
        shutil.rmtree(directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kept student folder ready")
    save_student(directory, student, config, trained if kept == "healed" else None, step, tokenizer)


def previous_choice(run_dir: str) -> str | None:
    """What summary.json says an earlier invocation kept (None without a record)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("kept")
