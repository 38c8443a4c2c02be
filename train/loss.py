"""The distillation loss: KL(teacher || student) on logits at temperature T (times T^2), optionally plus
cross-entropy on the data and the relative squared error of every converted layer's attention output."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_mla_jax.model import ForwardOptions, forward
from train.student import DistillError, assemble_student

DEFAULT_OPTIONS = ForwardOptions()

LOSS_TERMS = ("kl", "ce", "hidden")


def parse_loss(loss: str) -> frozenset[str]:
    terms = frozenset(loss.split("+"))
    if "kl" not in terms or not terms <= set(LOSS_TERMS):
        raise DistillError(f"--loss {loss!r}: expected kl, optionally +ce and/or +hidden (e.g. kl+hidden)")
    return terms


def distill_loss(
    trainable, teacher, tokens, teacher_config, student_config, temperature, terms, dtype,
    options: ForwardOptions = DEFAULT_OPTIONS,
):  # fmt: skip
    """KL(teacher || student) at temperature T (times T^2), plus the cross-entropy on the data and the
    relative squared error of the converted layers' attention outputs when `terms` asks for them.
    `options`: how both forwards compute (MoE path, remat, the mesh; see `model.forward`)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    options = dataclasses.replace(options, collect_attention="hidden" in terms)
    t_out = forward(teacher, inputs, None, teacher_config, options=options)
    student = assemble_student(teacher, trainable, student_config, dtype)
    s_out = forward(student, inputs, None, student_config, options=options)
    t_logits, s_logits = jax.lax.stop_gradient(t_out.logits), s_out.logits
    t_logp = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)) * temperature**2
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s_logits, axis=-1), targets[..., None], axis=-1))
    aux = {"kl": kl, "ce": ce}
    total = kl + (ce if "ce" in terms else 0.0)
    if options.collect_attention:
        errors = [
            jnp.sum(jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)))
            / jnp.sum(jnp.square(jax.lax.stop_gradient(t).astype(jnp.float32)))
            for t, s in zip(
                (t_out.attention[i] for i in student_config.mla.layers),
                (s_out.attention[i] for i in student_config.mla.layers),
                strict=True,
            )
        ]
        aux["hidden"] = jnp.mean(jnp.stack(errors))
        total = total + aux["hidden"]
    return total, aux
