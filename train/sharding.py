"""Meshes, and the parameters' placement on them by the one rules object (`gptoss_mla_jax.sharding`).

`--mesh DxM`: D-way data parallel with parameters (and optimizer state) sharded FSDP-style along
"data", M-way tensor / expert parallel along "model". Every parameter declares the logical axis of each of
its dimensions in the model's schema (`gptoss_mla_jax.model.PARAM_AXES`); `AxisRules` says which mesh axis
each logical axis is split over. A dimension that the mesh axis size does not divide stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_mla_jax.model import logical_axes, path_keys
from gptoss_mla_jax.sharding import AXIS_RULES, DATA, MODEL, AxisRules
from weights.safetensors_io import put


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
    return "/".join(path_keys(path))


def spec_for(path: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: AxisRules = AXIS_RULES):
    """The PartitionSpec of the parameter at `path` (keys or jax key-path entries) with this shape."""
    axes = [rules.mesh_axis(a) for a in logical_axes(path, len(shape))]
    return PartitionSpec(*(a if a and shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)))


def param_sharding(path: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> NamedSharding:
    """Where the parameter at `path` goes on `mesh` (a loader's placement hook, with the mesh bound)."""
    return NamedSharding(mesh, spec_for(path, shape, mesh))


def place(x, sharding: NamedSharding):
    """`x` placed with `sharding` (see `weights.safetensors_io.put`), left as is when already there."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    return put(x, sharding)


def shard_params(params, mesh: jax.sharding.Mesh):
    """Place every parameter on the mesh by its logical axes and the rules."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: place(x, param_sharding(path, x.shape, mesh)), params
    )


def batch_sharding(mesh: jax.sharding.Mesh, rules: AxisRules = AXIS_RULES) -> NamedSharding:
    """Token batches [B, T], rows split as the rules split the batch."""
    return NamedSharding(mesh, rules.spec(("batch", None)))
