"""train.distill at small sizes (a two-layer teacher: one sliding layer, one full): learning, mesh
equivalence, exact resume, trainable sets, loss terms, FLOP counting, observability, refusals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_mla_jax.execution import ForwardOptions
from support.corpora import pack
from train.flops import distill_step_flops, forward_flops, peak_flops
from train.loop import DistillOptions, make_optimizer, run
from train.loss import distill_loss
from train.student import TRAIN_SETS, DistillError, split_student
from weights.safetensors_io import load_hf
from weights.to_mla import convert


@pytest.fixture(scope="module")
def pair(tiny2_hf):
    config, teacher = load_hf(tiny2_hf[1], progress=False)
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (4, 32))
    student_config, student, _ = convert(teacher, config, 8, "decompressed", init="pca", calib_tokens=calib)
    sequences = pack(np.random.default_rng(1).integers(0, config.vocab_size, 64 * 17), 17)
    return config, teacher, student_config, student, sequences


def _run(pair, out, **kw):
    config, teacher, student_config, student, sequences = pair
    return run(
        teacher, config, student, student_config, sequences, str(out), DistillOptions(progress=False, **kw)
    )[0]


def test_kl_goes_down(pair, tmp_path):
    history = _run(pair, tmp_path, steps=30, batch=8, lr=3e-3, warmup=3, mesh="1x1")
    first, last = np.mean([h["kl"] for h in history[:3]]), np.mean([h["kl"] for h in history[-3:]])
    assert last < 0.85 * first, (first, last)  # measured: 0.052 -> 0.036
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "kl", "grad_norm", "tokens_per_s", "lr"} <= set(rows[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["loss"] == history[-1]["loss"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


# "all": the experts' gradients cross the per-row MoE, on the mesh with both axes (the pure data axis is
# the same code for every trainable set).
@pytest.mark.parametrize("train, meshes", [("mla", ("8x1", "4x2")), ("all", ("4x2",))], ids=["mla", "all"])
def test_meshes_give_the_same_losses(pair, tmp_path, train, meshes):
    assert jax.device_count() == 8
    losses = {}
    for mesh in (*meshes, "1x1"):
        history = _run(pair, tmp_path / mesh, steps=3, batch=8, mesh=mesh, ckpt_every=100, train=train)
        losses[mesh] = np.array([h["loss"] for h in history])
    for mesh in meshes:
        np.testing.assert_allclose(losses[mesh], losses["1x1"], rtol=1e-5)


def test_resume_sees_the_same_batches_and_losses(pair, tmp_path):
    full = _run(pair, tmp_path / "full", steps=6, batch=4, ckpt_every=3)
    _run(pair, tmp_path / "cut", steps=3, batch=4, ckpt_every=3)
    resumed = _run(pair, tmp_path / "cut", steps=6, batch=4, ckpt_every=3, resume=True)
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[3:]]  # bitwise on CPU
    with pytest.raises(DistillError, match=r"already holds checkpoints .* pass --resume"):
        _run(pair, tmp_path / "cut", steps=6, batch=4)


def test_stop_after_then_resume_equals_one_run(pair, tmp_path):
    full = _run(pair, tmp_path / "full", steps=5, batch=4, ckpt_every=100)
    first = _run(pair, tmp_path / "cut", steps=5, batch=4, ckpt_every=100, stop_after=2)
    rest = _run(pair, tmp_path / "cut", steps=5, batch=4, ckpt_every=100, resume=True)
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_trainable_sets(pair):
    _, _, student_config, student, _ = pair
    names = lambda train: {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(split_student(student, train))
    }
    mla, attn, everything = names("mla"), names("mla+attn"), names("all")
    assert mla == {
        f"layers/{i}/self_attn/{w}"
        for i in student_config.mla.layers
        for w in ("kv_a/kernel", "kv_b/kernel", "kv_b/bias")
    }  # decompressed: no k_rope
    assert mla < attn < everything
    assert "layers/0/self_attn/sinks" in attn and "embed_tokens" in everything - attn
    assert all(TRAIN_SETS["mla+attn"](n) for n in attn)


@pytest.mark.parametrize("train", ["mla+attn", "all"])
def test_wider_trainable_sets_learn_and_leave_the_teacher_alone(pair, tmp_path, train):
    config, teacher, student_config, student, sequences = pair
    before = jax.tree.map(np.asarray, teacher)
    # One batch seen over and over: its KL must fall (across random batches it is too noisy to tell).
    history, trained = run(
        teacher,
        config,
        student,
        student_config,
        sequences[:8],
        str(tmp_path),
        DistillOptions(steps=15, batch=8, lr=1e-3, warmup=2, train=train, progress=False),
    )
    assert history[-1]["kl"] < 0.8 * history[0]["kl"], [h["kl"] for h in history]
    sinks = trained["layers"]["1"]["self_attn"]["sinks"]
    assert not np.allclose(sinks, before["layers"][1]["self_attn"]["sinks"])  # it trained
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, teacher))


def test_hidden_loss_matches_attention_outputs(pair, tmp_path):
    config, teacher, _, _, sequences = pair
    # At full latent rank the conversion is exact: every term of the loss is ~0.
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (4, 32))
    full = 2 * config.num_key_value_heads * config.head_dim
    exact_config, exact, _ = convert(teacher, config, full, "decompressed", init="pca", calib_tokens=calib)
    h = run(
        teacher,
        config,
        exact,
        exact_config,
        sequences,
        str(tmp_path / "exact"),
        DistillOptions(steps=1, batch=8, lr=0.0, loss="kl+hidden", progress=False),
    )[0]
    assert h[0]["hidden"] < 1e-9 and h[0]["kl"] < 1e-6  # float32 rounding of the log-softmaxes
    # At low rank it is not, and training on it brings the attention outputs closer.
    low_config, low, _ = convert(teacher, config, 4, "decompressed", init="pca", calib_tokens=calib)
    h = run(
        teacher,
        config,
        low,
        low_config,
        sequences,
        str(tmp_path / "low"),
        DistillOptions(steps=20, batch=8, lr=3e-3, warmup=2, loss="kl+hidden", progress=False),
    )[0]
    assert h[0]["hidden"] > 1e-3 and h[-1]["hidden"] < 0.9 * h[0]["hidden"]
    assert h[0]["loss"] == pytest.approx(h[0]["kl"] + h[0]["hidden"], rel=1e-6)
    with pytest.raises(DistillError, match="--loss 'ce': expected kl"):
        run(
            teacher,
            config,
            low,
            low_config,
            sequences,
            str(tmp_path / "x"),
            DistillOptions(loss="ce", progress=False),
        )


def test_flops_by_hand(pair):
    config = pair[0]
    T, D, V, H, G, d = 16, config.hidden_size, config.vocab_size, 4, 2, 8
    E, k, inter, W = config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, 4
    attn_proj = D * H * d * 2 + D * G * d * 2
    moe = D * E + k * (D * 2 * inter + inter * D)
    matmuls = 2 * T * (config.num_hidden_layers * (attn_proj + moe) + D * V)
    pairs = {"full": T * (T + 1) // 2, "sliding": sum(min(t + 1, W) for t in range(T))}
    L = config.num_hidden_layers
    attn = sum(4 * H * d * pairs["sliding" if config.is_sliding(i) else "full"] for i in range(L))
    assert config.sliding_window == W and config.num_attention_heads == H
    assert forward_flops(config, T) == pytest.approx(matmuls + attn)
    # A student identical to the teacher training nothing costs three forwards.
    student = dataclasses.replace(config)
    assert distill_step_flops(config, student, T, 2, lambda p: False) == pytest.approx(6 * (matmuls + attn))
    assert peak_flops() is None  # CPU: no MFU claimed


def test_mismatched_pair_is_refused(pair, tmp_path):
    config, teacher, student_config, student, sequences = pair
    other = {**teacher, "embed_tokens": teacher["embed_tokens"] + 1}
    with pytest.raises(DistillError, match="differ in embed_tokens"):
        run(other, config, student, student_config, sequences, str(tmp_path), DistillOptions(progress=False))
    experts = teacher["layers"][1]["mlp"]["experts"]
    other_layers = list(teacher["layers"])
    other_layers[1] = {
        **other_layers[1],
        "mlp": {**other_layers[1]["mlp"], "experts": {**experts, "down_proj": experts["down_proj"] * 2}},
    }
    with pytest.raises(DistillError, match="differ in layers/1/mlp/experts/down_proj"):
        run({**teacher, "layers": other_layers}, config, student, student_config, sequences, str(tmp_path))
    with pytest.raises(DistillError, match="has no MLA layers"):
        run(teacher, config, teacher, config, sequences, str(tmp_path), DistillOptions(progress=False))


def test_non_finite_loss_stops_the_run(pair, tmp_path):
    config, teacher, student_config, student, sequences = pair
    i = student_config.mla.layers[0]
    attn = student["layers"][i]["self_attn"]
    broken_attn = {**attn, "kv_b": {**attn["kv_b"], "bias": jnp.full_like(attn["kv_b"]["bias"], jnp.nan)}}
    broken = {
        **student,
        "layers": [
            *student["layers"][:i],
            {**student["layers"][i], "self_attn": broken_attn},
            *student["layers"][i + 1 :],
        ],
    }
    with pytest.raises(DistillError, match="loss is nan at step 1; stopping"):
        run(teacher, config, broken, student_config, sequences, str(tmp_path), DistillOptions(progress=False))


def test_accumulating_run_follows_the_whole_batch_learning_rates():
    # --steps and --warmup count micro-steps; the schedule runs over updates, so 16 micro-steps of
    # accumulation 2 follow the rates of 8 whole-batch steps and end the cosine at lr / 10.
    _, whole = make_optimizer(1e-3, warmup=2, steps=8, grad_accum=1)
    _, accumulated = make_optimizer(1e-3, warmup=4, steps=16, grad_accum=2)
    for update in range(9):
        assert float(accumulated(update)) == float(whole(update))
    assert float(accumulated(8)) == pytest.approx(1e-4)


@pytest.mark.parametrize("mesh_spec", ["8x1", "4x2"])
def test_pinned_forward_splits_the_work_by_rows(mesh_spec):
    # FSDP shards weights along the hidden dimension over "data", the axis the batch is split over. Left
    # alone, the partitioner follows the weights: every device computes every sequence on a slice of the
    # hidden dimension and all-reduces the partial sums (on GPUs in bf16, which moved the loss of a 4x1
    # run by 44%). Pinning the residual stream by rows, with the MoE per device, gives each device 1/8 of
    # the one-device FLOPs and the same logits.
    from eval.experiments.fullsize_checkpoint import SMOKE
    from gptoss_mla_jax.model import ForwardOptions, forward, init_params
    from train.sharding import batch_sharding, make_mesh, shard_params

    config = dataclasses.replace(SMOKE, num_hidden_layers=2, layer_types=())
    params = init_params(config, jax.random.key(0), jnp.float32, experts="mxfp4")
    tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, config.vocab_size)

    def compiled(mesh_spec, pin):
        mesh = make_mesh(mesh_spec)
        options = ForwardOptions(mesh=mesh if pin else None)
        f = jax.jit(lambda p, t: forward(p, t, None, config, options=options)[0])
        args = (shard_params(params, mesh), jax.device_put(tokens, batch_sharding(mesh)))
        cost = f.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"], f(*args)

    one_flops, one_logits = compiled("1x1", False)
    flops, logits = compiled(mesh_spec, True)
    assert flops / one_flops < 0.13, flops / one_flops  # 1/8, up to the replicated bookkeeping
    np.testing.assert_allclose(np.asarray(logits), np.asarray(one_logits), rtol=1e-5, atol=1e-5)


def test_loss_and_gradients_equal_on_both_grouped_paths(pair):
    """One distillation step's loss and gradients (`--train all`: experts included) on the Pallas grouped
    matmul (interpreted) equal the ragged_dot path's, float32."""
    config, teacher, student_config, student, sequences = pair
    trainable = split_student(student, "all")
    tokens = jnp.asarray(sequences[:1, :9])
    loss = lambda trainable, impl: distill_loss(
        trainable, teacher, tokens, config, student_config, 1.0, "kl+ce", jnp.float32,
        ForwardOptions(moe=impl),
    )  # fmt: skip
    step = lambda impl: jax.jit(jax.value_and_grad(lambda t: loss(t, impl), has_aux=True))(trainable)
    (loss_gmm, _), grads_gmm = step("gmm")
    (loss_ragged, _), grads_ragged = step("ragged_dot")
    np.testing.assert_allclose(loss_gmm, loss_ragged, rtol=1e-5)
    expert_grads = 0
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads_gmm), jax.tree.leaves(grads_ragged), strict=True
    ):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
        expert_grads += "experts" in jax.tree_util.keystr(path) and scale > 0
    assert expert_grads  # the experts' weight gradients (tgmm) were compared, not only the attention's
