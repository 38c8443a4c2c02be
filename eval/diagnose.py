"""Is a model's attention and routing healthy, and where does a student drift from its teacher?

    python -m eval.diagnose --model PATH [--compare TEACHER] [--data stdlib|FILE|DIR] [--split test]
        [--tokens 4096] [--seq-len 512] [--batch 4] [--out DIR]

One jitted pass per batch of windows collects, per layer and head:

- attention sinks: the probability mass each head gives its sink, and the mass on the first token (sink
  collapse shows as mass piling up there);
- MoE routing: load per expert (share of token-expert assignments), mean routing entropy (of the softmax
  over all experts, in nats), and with `--compare` the share of tokens whose top-k set differs from the
  teacher's;
- Q/K geometry: mean q and k norms per head, effective rank (exp of the entropy of the normalised singular
  values) of each kv head's keys (before RoPE) and values over the batch's tokens; with `--compare`, for
  MLA layers, the relative reconstruction error of k and v against the teacher's on the same input;
- with `--compare`: per layer the drift of the residual stream (cosine and relative L2 against the
  teacher's) and the per-token KL(teacher || model) of the final logits (mean and percentiles).

Statistics are averaged over batches (effective ranks are per batch of `batch x seq-len` tokens). Output:
a table on stdout, DIR/diagnose.json and PNGs in DIR (sink and first-token mass heatmaps, q/k norms,
expert load, drift).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.attention import chunk_at, key_mask, project_qkv, sink_softmax
from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.mla import cache_entries, demix, keys_values, rope_dims, scoring_queries
from gptoss_mla_jax.model import Params, decoder_layer, embed, unembed
from gptoss_mla_jax.norm import rms_norm
from support.results import write_json


def kv_before_rope(
    p: Params, h: Float[Array, "B T D"], config: GptOssConfig, i: int
) -> tuple[Float[Array, "B T G d"], Float[Array, "B T G d"]]:
    """Keys before RoPE (in the head's own dim order) and values of layer i on its normed input `h`."""
    B, T, _ = h.shape
    G, d = config.num_key_value_heads, config.head_dim
    if not config.is_mla(i):
        k = (h @ p["k_proj"]["kernel"] + p["k_proj"]["bias"]).reshape(B, T, G, d)
        return k, (h @ p["v_proj"]["kernel"] + p["v_proj"]["bias"]).reshape(B, T, G, d)
    c = h @ p["kv_a"]["kernel"]
    kv = c @ p["kv_b"]["kernel"] + p["kv_b"]["bias"]
    if config.mla.rope_mode == "decompressed":
        kv = kv.reshape(B, T, 2, G, d)
        return kv[:, :, 0], kv[:, :, 1]
    if config.mla.rope_mode == "rorope":  # the kept mixed components, then the latent's, mixed back
        per_component = d // config.mla.rope_fold
        k_rope = (h @ p["k_rope"]["kernel"] + p["k_rope"]["bias"]).reshape(B, T, -1, per_component)
        k_width = G * d - k_rope.shape[2] * per_component
        mixed = jnp.concatenate([k_rope, kv[..., :k_width].reshape(B, T, -1, per_component)], axis=2)
        return demix(mixed, p["rope_mix"], slice(None)), kv[..., k_width:].reshape(B, T, G, d)
    keep, nope = rope_dims(config, i)
    k_nope = kv[..., : G * nope.shape[1]].reshape(B, T, G, -1)
    k_rope = (h @ p["k_rope"]["kernel"] + p["k_rope"]["bias"]).reshape(B, T, G, -1)
    order = np.argsort(np.concatenate([keep, nope], axis=1), axis=1)  # back to the head's dim order
    k = jnp.take_along_axis(jnp.concatenate([k_rope, k_nope], -1), order[None, None], axis=-1)
    return k, kv[..., G * nope.shape[1] :].reshape(B, T, G, d)


def effective_rank(x: Float[Array, "N n"]) -> Float[Array, ""]:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for a rank-1 matrix, n
    for one whose singular values are all equal."""
    s = jnp.linalg.svd(x.astype(jnp.float32), compute_uv=False)
    p = s / jnp.maximum(s.sum(), 1e-30)
    return jnp.exp(-(p * jnp.log(jnp.where(p > 0, p, 1.0))).sum())


def attention_stats(p: Params, h, positions, cos, sin, config: GptOssConfig, i: int) -> dict[str, Array]:
    """Sink mass and first-token mass per query head, mean q and k norms, effective ranks of k and v."""
    B, T, _ = h.shape
    H, G, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if config.is_mla(i):
        q = (h @ p["q_proj"]["kernel"] + p["q_proj"]["bias"]).reshape(B, T, H, d)
        q = scoring_queries(q, cos, sin, config, i)
        k, _ = keys_values(p, cache_entries(p, h, cos, sin, config, i), positions, config, i)
    else:
        q, k, _ = project_qkv(p, h, cos, sin, config)
    window = config.sliding_window if config.is_sliding(i) else None
    qg = q.reshape(B, T, G, H // G, -1)  # rorope: 2d wide (RoPE'd, then unrotated)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    valid = jnp.ones((B, T), bool)
    scores = jnp.where(key_mask(positions, positions, valid, window)[:, None, None], scores, -jnp.inf)
    probs = sink_softmax([scores], p["sinks"])[0]  # [B, G, R, T, S]
    later = (positions[:, None, None, :] >= 1).astype(jnp.float32)  # queries with a token before them
    first = (probs[..., 0] * later).sum((0, 3)) / jnp.maximum(later.sum((0, 3)), 1)
    k_pre, v = kv_before_rope(p, h, config, i)
    flat = lambda x: x.reshape(B * T, G, d).transpose(1, 0, 2)
    return {
        "sink_mass": (1 - probs.sum(-1)).mean((0, 3)).reshape(H),
        "first_token_mass": first.reshape(H),
        "q_norm": jnp.linalg.norm(q.astype(jnp.float32), axis=-1).mean((0, 1)),
        "k_norm": jnp.linalg.norm(k.astype(jnp.float32), axis=-1).mean((0, 1)),
        "k_effective_rank": jax.vmap(effective_rank)(flat(k_pre)),
        "v_effective_rank": jax.vmap(effective_rank)(flat(v)),
    }


def routing_stats(p: Params, x: Float[Array, "N D"], config: GptOssConfig) -> dict[str, Array]:
    logits = (x @ p["router"]["kernel"] + p["router"]["bias"]).astype(jnp.float32)
    top = jax.lax.top_k(logits, config.num_experts_per_tok)[1]
    load = jnp.zeros(config.num_local_experts).at[top.reshape(-1)].add(1.0) / top.size
    logp = jax.nn.log_softmax(logits, axis=-1)
    return {"expert_load": load, "routing_entropy": -(jnp.exp(logp) * logp).sum(-1).mean(), "top_k": top}


@functools.partial(jax.jit, static_argnames=("config", "teacher_config"))
def batch_stats(
    params: Params,
    tokens: Int[Array, "B T"],
    config: GptOssConfig,
    teacher: Params | None = None,
    teacher_config: GptOssConfig | None = None,
) -> dict[str, Any]:
    """Every statistic of one batch of windows, stacked over layers."""
    B, T = tokens.shape
    chunk = chunk_at(B, T, config)
    positions, _, cos, sin, _ = chunk
    x = embed(params, tokens)
    xt = embed(teacher, tokens) if teacher is not None else None
    per_layer = []
    inputs = dict(chunk=chunk, layer_cache=None)
    for i in range(config.num_hidden_layers):
        x_new, _, seen = decoder_layer(params["layers"][i], x, **inputs, config=config, i=i)
        h, m = seen["attn_input"], seen["moe_input"]
        stats = attention_stats(params["layers"][i]["self_attn"], h, positions, cos, sin, config, i)
        stats |= routing_stats(params["layers"][i]["mlp"], m.reshape(B * T, -1), config)
        if teacher is not None:
            xt_new, _, t_seen = decoder_layer(teacher["layers"][i], xt, **inputs, config=teacher_config, i=i)
            mt = t_seen["moe_input"]
            t_top = routing_stats(teacher["layers"][i]["mlp"], mt.reshape(B * T, -1), teacher_config)["top_k"]
            same = (jnp.sort(stats["top_k"], -1) == jnp.sort(t_top, -1)).all(-1)
            stats["top_k_changed"] = 1 - same.mean()
            a, b = x_new.astype(jnp.float32), xt_new.astype(jnp.float32)
            cosine = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)
            stats["drift_cosine"] = cosine.mean()
            stats["drift_rel_l2"] = jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30)
            if config.is_mla(i):  # the layer's approximation on the same input: teacher weights, our h
                k, v = kv_before_rope(params["layers"][i]["self_attn"], h, config, i)
                kt, vt = kv_before_rope(teacher["layers"][i]["self_attn"], h, teacher_config, i)
                rel = lambda a, b: jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30)
                stats["k_rel_error"], stats["v_rel_error"] = rel(k, kt), rel(v, vt)
            xt = xt_new
        del stats["top_k"]
        per_layer.append(stats)
        x = x_new
    out = {"layers": per_layer}
    if teacher is not None:
        logp = jax.nn.log_softmax(unembed(params, rms_norm(x, params["norm"], config.rms_norm_eps), config))
        logq = jax.nn.log_softmax(
            unembed(teacher, rms_norm(xt, teacher["norm"], teacher_config.rms_norm_eps), teacher_config)
        )
        out["token_kl"] = (jnp.exp(logq) * (logq - logp)).sum(-1).reshape(-1)
    return out


def diagnose(
    params: Params,
    config: GptOssConfig,
    windows: np.ndarray,
    batch: int,
    teacher: Params | None = None,
    teacher_config: GptOssConfig | None = None,
) -> dict[str, Any]:
    """Statistics over `windows` [N, T] of token ids, in batches of `batch` windows (a partial last batch
    is dropped so every batch has the same shape)."""
    if teacher is not None and teacher_config.num_hidden_layers != config.num_hidden_layers:
        raise ValueError("--compare: teacher and model have different numbers of layers")
    n = (len(windows) // batch) * batch
    if n == 0:
        raise ValueError(f"{len(windows)} windows do not fill one batch of {batch}")
    sums, kls = None, []
    for b in range(0, n, batch):
        out = jax.device_get(
            batch_stats(params, jnp.asarray(windows[b : b + batch]), config, teacher, teacher_config)
        )
        kls += list(out.get("token_kl", []))
        layers = out["layers"]
        sums = layers if sums is None else jax.tree.map(lambda s, x: s + x, sums, layers)
    batches = n // batch
    layers = [{k: np.asarray(v) / batches for k, v in layer.items()} for layer in sums]
    result: dict[str, Any] = {
        "tokens": int(n * windows.shape[1]),
        "layer_types": [
            ("sliding" if config.is_sliding(i) else "full") + (" mla" if config.is_mla(i) else "")
            for i in range(config.num_hidden_layers)
        ],
        "layers": [{k: v.tolist() for k, v in layer.items()} for layer in layers],
    }  # fmt: skip
    if kls:
        kl = np.asarray(kls, np.float64)
        result["token_kl"] = {"mean": kl.mean(), **{f"p{q}": np.percentile(kl, q) for q in (50, 90, 99)}}
        result["token_kl"]["max"] = kl.max()
    return result


def table(result: dict[str, Any]) -> str:
    """One line per layer: the headline statistics."""
    compare = "drift_cosine" in result["layers"][0]
    head = f"{'layer':>5} {'type':<12} {'sink':>6} {'first':>6} {'H(route)':>8} {'max load':>8}"
    head += f" {'erank k/v':>11}"
    if compare:
        head += f" {'topk chg':>8} {'cos':>7} {'rel L2':>7} {'k err':>6} {'v err':>6}"
    lines = [head]
    for i, (kind, s) in enumerate(zip(result["layer_types"], result["layers"], strict=True)):
        line = (
            f"{i:>5} {kind:<12} {np.mean(s['sink_mass']):6.3f} {np.max(s['first_token_mass']):6.3f} "
            f"{s['routing_entropy']:8.3f} {np.max(s['expert_load']):8.3f} "
            f"{np.mean(s['k_effective_rank']):5.1f}/{np.mean(s['v_effective_rank']):<5.1f}"
        )
        if compare:
            errors = [f"{s[key]:6.3f}" if key in s else f"{'-':>6}" for key in ("k_rel_error", "v_rel_error")]
            line += (
                f" {s['top_k_changed']:8.3f} {s['drift_cosine']:7.4f} {s['drift_rel_l2']:7.4f} "
                + " ".join(errors)
            )
        lines.append(line)
    if "token_kl" in result:
        kl = result["token_kl"]
        lines.append(f"per-token KL(teacher || model): mean {kl['mean']:.4f}, p50 {kl['p50']:.4f}, "
                     f"p90 {kl['p90']:.4f}, p99 {kl['p99']:.4f}, max {kl['max']:.4f}")  # fmt: skip
    lines.append("sink: mean sink mass over heads; first: the largest first-token mass of a head; H(route): "
                 "routing entropy (nats); erank: mean effective rank of k (before RoPE) / v")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: str) -> list[str]:
    """Heatmaps (layer x head) of sink mass, first-token mass, q and k norms; expert load; drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    grid = lambda key: np.asarray([s[key] for s in layers])
    written = []
    for key, title in (
        ("sink_mass", "sink mass"),
        ("first_token_mass", "first-token mass"),
        ("q_norm", "mean q norm"),
        ("k_norm", "mean k norm"),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        image = ax.imshow(grid(key), aspect="auto", cmap="viridis")
        ax.set(xlabel="head", ylabel="layer", title=title)
        fig.colorbar(image, ax=ax)
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    load = grid("expert_load")  # one bar chart per layer: tokens' share of each expert
    fig, axes = plt.subplots(len(load), 1, figsize=(8, 1.4 * len(load)), sharex=True, squeeze=False)
    for i, (ax, row) in enumerate(zip(axes[:, 0], load, strict=True)):
        ax.bar(np.arange(len(row)), row)
        ax.axhline(1 / len(row), color="gray", linestyle=":", linewidth=1)  # perfectly balanced
        ax.set_ylabel(f"layer {i}", rotation=0, ha="right")
    axes[0, 0].set_title("expert load (share of token-expert assignments; dotted: balanced)")
    axes[-1, 0].set_xlabel("expert")
    path = os.path.join(out_dir, "expert_load.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    if "drift_cosine" in layers[0]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(grid("drift_rel_l2"), marker="o", label="relative L2")
        ax.plot(1 - grid("drift_cosine"), marker="s", label="1 - cosine")
        ax.set(xlabel="layer", title="residual stream drift from the teacher", yscale="log")
        ax.legend()
        path = os.path.join(out_dir, "drift.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="transformers folder or Orbax checkpoint (GQA or MLA)")
    parser.add_argument("--compare", help="the teacher (for drift, KL, top-k changes, k/v errors)")
    parser.add_argument("--data", default="stdlib", help="corpus name, text file or folder, or a .npy of ids")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model's)")
    parser.add_argument("--out", default="diagnose", help="folder for diagnose.json and the PNGs")
    args = parser.parse_args(argv)
    from support.corpora import corpus_ids
    from weights.load import load_model

    try:
        config, params, tokenizer_dir = load_model(args.model, dtype=jnp.float32)
        teacher_config, teacher = (None, None)
        if args.compare:
            teacher_config, teacher, _ = load_model(args.compare, dtype=jnp.float32)
        if args.data.endswith(".npy"):
            ids = np.load(args.data)
        else:
            from tokenizers import Tokenizer

            folder = args.tokenizer or tokenizer_dir
            if folder is None:
                raise FileNotFoundError(
                    f"{args.model} has no tokenizer: pass --tokenizer DIR or a .npy --data"
                )
            tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            ids = corpus_ids(tokenizer, args.data, args.split, args.tokens)
        n = min(len(ids), args.tokens) // args.seq_len
        windows = np.asarray(ids[: n * args.seq_len], np.int32).reshape(n, args.seq_len)
        result = diagnose(params, config, windows, min(args.batch, max(n, 1)), teacher, teacher_config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result |= {"model": args.model, "compare": args.compare, "data": args.data, "seq_len": args.seq_len}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "diagnose.json"), result)
    pngs = plot(result, args.out)
    print(table(result))
    print(f"{result['tokens']} tokens; diagnose.json and {len(pngs)} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
