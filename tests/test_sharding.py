"""Parameter sharding: every parameter's logical axes are declared in the model's schema and the rules map
them to the mesh; the specs on 20b-shaped models (GQA, both MLA modes, dense and MXFP4 experts)."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from gptoss_mla_jax.config import GPT_OSS_20B, MlaConfig
from gptoss_mla_jax.model import PARAM_AXES, is_shape, logical_axes, param_shapes
from train.sharding import AxisRules, make_mesh, path_name, spec_for

L = GPT_OSS_20B.num_hidden_layers
CONFIGS = {
    "gqa": GPT_OSS_20B,
    "decompressed": dataclasses.replace(
        GPT_OSS_20B, mla=MlaConfig("decompressed", tuple(range(L)), (192,) * L)
    ),
    "partial": dataclasses.replace(
        GPT_OSS_20B, mla=MlaConfig("partial", (0, 1), (256, 256), (((0, 1),) * 8,) * 2)
    ),
}


def leaves(config, experts):
    return jax.tree_util.tree_flatten_with_path(param_shapes(config, experts), is_leaf=is_shape)[0]


@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
@pytest.mark.parametrize("model", list(CONFIGS))
def test_every_matrix_declares_its_axes(model, experts):
    """Only vectors (norms, sinks, biases) may go undeclared (replicated); declared axes fit the shape."""
    for path, shape in leaves(CONFIGS[model], experts):
        axes = logical_axes(path, len(shape))
        assert len(axes) == len(shape), path_name(path)
        if len(shape) > 1 and not path_name(path).endswith("_bias"):
            assert any(axes), f"{path_name(path)} {shape} declares no logical axes"
    assert all(
        a is None or a in {f.name for f in dataclasses.fields(AxisRules)}
        for v in PARAM_AXES.values()
        for a in v
    )


def test_specs_on_a_4x2_mesh():
    mesh = make_mesh("4x2")
    specs = {path_name(p): spec_for(p, s, mesh) for p, s in leaves(CONFIGS["partial"], "mxfp4")}
    assert specs["embed_tokens"] == P("model", "data")
    assert specs["lm_head"] == P("data", "model")
    assert specs["layers/0/self_attn/q_proj/kernel"] == P("data", "model")
    assert specs["layers/0/self_attn/kv_b/kernel"] == P(None, "model")
    assert specs["layers/0/self_attn/k_rope/kernel"] == P("data", "model")
    assert specs["layers/2/self_attn/o_proj/kernel"] == P("model", "data")
    assert specs["layers/0/mlp/experts/gate_up_proj_blocks"] == P("model", None, None, None)
    assert specs["layers/0/mlp/router/kernel"] == P("data", None)
    assert specs["layers/0/input_layernorm"] == P(None)
    dense = {path_name(p): spec_for(p, s, mesh) for p, s in leaves(GPT_OSS_20B, "dense")}
    assert dense["layers/0/mlp/experts/down_proj"] == P("model", "data", None)
    # A dimension the mesh axis does not divide stays whole (511 columns over 2 devices).
    assert spec_for(("layers", 0, "self_attn", "k_proj", "kernel"), (2880, 511), mesh) == P("data", None)


def test_rules_decide_the_mesh_axes():
    mesh = make_mesh("4x2")
    path = ("layers", 0, "self_attn", "q_proj", "kernel")
    assert spec_for(path, (2880, 4096), mesh, AxisRules(embed=None)) == P(None, "model")
    assert spec_for(path, (2880, 4096), mesh, AxisRules(heads=None)) == P("data", None)
