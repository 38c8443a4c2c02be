"""Meshes and the one table that maps parameters to mesh axes.

`--mesh DxM`: D-way data parallel with parameters (and optimizer state) sharded FSDP-style along
"data", M-way tensor / expert parallel along "model". A rule names, per dimension of a parameter, the
mesh axis it is split over; a dimension that the axis size does not divide stays replicated.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from weights.safetensors_io import put

DATA, MODEL = "data", "model"
# (parameter path regex, axis per dimension), first match wins; paths are "/"-joined keys.
RULES: list[tuple[str, tuple]] = [
    (r"mlp/experts/(gate_up_proj|down_proj)$", (MODEL, DATA, None)),  # [E, in, out]: experts over model
    (r"mlp/experts/.*_(blocks|scales)$", (MODEL, None)),
    (r"mlp/experts/.*_bias$", (MODEL, None)),
    (r"mlp/router/kernel$", (DATA, None)),
    (r"self_attn/(q_proj|k_proj|v_proj|k_rope)/kernel$", (DATA, MODEL)),  # heads over model
    (r"self_attn/o_proj/kernel$", (MODEL, DATA)),
    (r"self_attn/kv_a/kernel$", (DATA, None)),
    (r"self_attn/kv_b/kernel$", (None, MODEL)),
    (r"^embed_tokens$", (MODEL, DATA)),
    (r"^lm_head$", (DATA, MODEL)),
]


def make_mesh(spec: str) -> jax.sharding.Mesh:
    """A (data, model) mesh from "DxM" over the first D * M devices (all of them across processes)."""
    try:
        d, m = (int(n) for n in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh {spec!r}: expected DxM, e.g. 8x1") from None
    if (
        d < 1
        or m < 1
        or d * m > jax.device_count()
        or (jax.process_count() > 1 and d * m != jax.device_count())
    ):
        raise ValueError(f"--mesh {spec}: {d}x{m} = {d * m} devices, but {jax.device_count()} are visible")
    if d * m == jax.device_count():
        # Auto axes: GSPMD propagates shardings (Explicit axes would demand them on every gather).
        return jax.make_mesh((d, m), (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return jax.sharding.Mesh(np.asarray(jax.devices()[: d * m]).reshape(d, m), (DATA, MODEL))


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def spec_for(name: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    for pattern, axes in RULES:
        if re.search(pattern, name):
            axes = [
                a if a and i < len(shape) and shape[i] % mesh.shape[a] == 0 else None
                for i, a in enumerate(axes)
            ]
            return PartitionSpec(*axes[: len(shape)])
    return PartitionSpec()


def place(x, sharding: NamedSharding):
    """`x` placed with `sharding` (see `weights.safetensors_io.put`), left as is when already there."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    return put(x, sharding)


def shard_params(params, mesh: jax.sharding.Mesh):
    """Place every parameter on the mesh by the rules table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: place(x, NamedSharding(mesh, spec_for(path_name(path), x.shape, mesh))), params
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA, None))


def rows_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The residual stream [B, T, D] split by batch over "data" (`forward`'s `activation_sharding`)."""
    return NamedSharding(mesh, PartitionSpec(DATA, None, None))
