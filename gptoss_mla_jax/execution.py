"""How `forward` computes: the implementation choices (`ForwardOptions`) and the per-device wrapper that
the kernels which sort or tile their rows run in under a mesh (`by_rows`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

from gptoss_mla_jax.sharding import AXIS_RULES, AxisRules, residual_sharding

# "sparse": the selected experts only, grouped pairs on the Pallas grouped matmul on a GPU and ragged_dot
# elsewhere; "gmm" / "ragged_dot": that grouped path everywhere; "dense": every expert on every token.
MoeImpl = Literal["sparse", "gmm", "ragged_dot", "dense"]
# "auto": the Pallas flash-attention kernel (flash_attention.py) for chunks without a cache on a GPU, jnp
# otherwise; "flash": the kernel for every chunk without a cache (interpreted, slowly, off the GPU); "jnp":
# never the kernel.
AttentionImpl = Literal["auto", "flash", "jnp"]


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How `forward` computes (hashable: one static argument under `jax.jit`).

    `moe`: the MoE path (`MoeImpl`). `attention`: the attention path of chunks without a cache
    (`AttentionImpl`). `mla_absorb`: partial MLA's attention path (None: absorbed for single-token steps).
    `decode_kernels`: single-token steps attend with the Pallas flash-decoding kernels (flash_decode.py)
    and run their experts on the grouped matmul (gmm.py, MXFP4 used packed) instead of jnp (interpreted,
    slowly, off the GPU). `remat`: recompute each layer's activations in the backward pass.
    `collect_attention`: also return every layer's attention output (what it adds to the residual
    stream), for distillation losses that match layers. `mesh`: the mesh the weights are sharded over; the
    model then pins the residual stream [B, T, D] where `rules` put it (`sharding.RESIDUAL_AXES`: rows
    split over "data") after the embedding and after every layer, and runs the sparse MoE and the
    flash-attention kernel on each device's own rows. With weights FSDP-sharded along the hidden dimension
    over the batch's axis, the partitioner would otherwise follow the weights, gather the batch onto every
    device and split the hidden dimension instead."""

    moe: MoeImpl = "sparse"
    attention: AttentionImpl = "auto"
    mla_absorb: bool | None = None
    decode_kernels: bool = False
    remat: bool = False
    collect_attention: bool = False
    mesh: jax.sharding.Mesh | None = None
    rules: AxisRules = AXIS_RULES

    @property
    def activation_sharding(self) -> jax.sharding.NamedSharding | None:
        """The residual stream's sharding on `mesh` by `rules` (None without a mesh)."""
        return residual_sharding(self.mesh, self.rules)


def by_rows(fn, sharding: jax.sharding.NamedSharding | None, shared: int = 1):
    """`fn(*args)` on each device's own rows (split over the mesh axes that `sharding` splits the batch
    over) of every argument after the first `shared`, which each device gets whole; `fn` itself when
    there is no sharding. The sparse MoE needs it (it sorts all its tokens by expert, and left to the
    partitioner that sort gathers every device's tokens), and so do the Pallas kernels, which the
    partitioner cannot split."""
    if sharding is None:
        return fn
    batch = sharding.spec[0]
    axes = {batch} if isinstance(batch, str) else set(batch or ())
    rows = jax.sharding.PartitionSpec(batch)

    def call(*args):
        specs = (jax.sharding.PartitionSpec(),) * shared + (rows,) * (len(args) - shared)
        # check_vma off: a Pallas call's outputs carry no varying-axes type (JAX 0.11 refuses them
        # otherwise); nothing inside communicates, and the whole arguments' cotangents are summed over the
        # mesh either way.
        return jax.shard_map(
            fn, mesh=sharding.mesh, in_specs=specs, out_specs=rows, axis_names=axes, check_vma=False
        )(*args)

    return call
