"""Logical axes and the one rules object that maps them to a mesh's axes.

Every parameter declares the logical axis of each of its dimensions (`model.PARAM_AXES`); the activations
that need pinning declare theirs here (`RESIDUAL_AXES`). `AxisRules` says which mesh axis each logical
axis is split over, so a mesh's layout is decided in one place for weights and activations alike.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
RESIDUAL_AXES = ("batch", None, None)  # the residual stream [B, T, D]: each device its own rows


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """The mesh axis each logical axis is split over (None: replicated)."""

    batch: str | None = DATA  # activations: data parallel
    vocab: str | None = MODEL
    embed: str | None = DATA  # FSDP: every weight split along the hidden size over "data"
    heads: str | None = MODEL  # attention heads over "model"
    experts: str | None = MODEL  # expert parallel over "model"
    expert_in: str | None = DATA

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else getattr(self, logical)

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        return PartitionSpec(*(self.mesh_axis(a) for a in axes))


AXIS_RULES = AxisRules()


def residual_sharding(mesh: jax.sharding.Mesh | None, rules: AxisRules = AXIS_RULES) -> NamedSharding | None:
    """Where the residual stream lives on `mesh` (None without one)."""
    return None if mesh is None else NamedSharding(mesh, rules.spec(RESIDUAL_AXES))
