"""Convert grouped-query attention layers into Multi-head Latent Attention (docs/design.md, "MLA: the math").

    python -m weights.to_mla --model SRC --out CKPT --latent-dim R --rope-mode decompressed|partial|rorope
        [--rope-pairs N] [--rope-components M [--rope-fold F]] [--layers full|all|LIST] [--init svd|pca]
        [--calib DATA --calib-tokens N]
        [--calib-select first|random|kmeans] [--calib-seq-len 512] [--calib-sliding-len W]

Calibration tokens (`weights/calib.py`): by default a diverse set, the windows nearest the k-means
centroids of the model's own mean-pooled hidden states among 8x as many, with short windows (the sliding
window) for sliding-window layers and long ones for full-attention layers.

Initialisations (all linear algebra in jnp, so it runs on the accelerator; one layer at a time):
- `svd`: truncated SVD of the stacked key/value weights `[W_k, W_v]` (`x @ W` layout), split as
  `U sqrt(S)` (the down-projection, cached latent) and `sqrt(S) V^T` (the up-projection); biases exact.
- `pca`: activation-aware. The k/v outputs on calibration tokens, K and V each scaled to unit RMS so
  neither dominates, are centred and their top-r principal directions U kept: down = `W s U`,
  up = `U^T / s`, and the bias absorbs the mean and what the projection drops of the original bias,
  so the fit includes the biases and is exact at full rank.
For `partial`, the RoPE pairs each kv head keeps are those with the largest q.k norm contribution
`mean_t sum_{query heads of the group} |q_pair| |k_pair|` on the calibration tokens (MHA2MLA's 2-norm rule);
their key dims are copied exactly, the rest of K and all of V are what the latent compresses.
For `rorope`, each frequency pair's G x G mixing matrix is the PCA basis of the kv heads' keys of that pair
on the calibration tokens (`rorope_mix`); the key projection is mixed by it, its leading M components per
pair become `k_rope` exactly, the other components and all of V are what the latent compresses. With
`--rope-fold F` (FreqFold) the PCA runs over groups of F adjacent pairs of all kv heads (G F dims).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gptoss_mla_jax.config import FULL, ROPE_MODES, SLIDING, ConfigError, GptOssConfig, MlaConfig
from gptoss_mla_jax.mla import mix, rope_dims
from gptoss_mla_jax.model import attention_inputs, check_params
from weights.calib import POOL_FACTOR, SELECTIONS, calibration_set

Params = dict[str, Any]
HI = jax.lax.Precision.HIGHEST
# Defaults: the full-attention layers (nearly all of the cache at long context), `decompressed` with a
# 192-wide latent: 192 values per token instead of 1024 (-81% per layer, -80.9% of the whole gpt-oss-20b
# cache at 32K context; `python -m eval.kv_cache --preset gpt-oss-20b`). Measured (eval/results/
# quality_study.md), `partial` with 2 RoPE pairs per kv head costs KL 0.26 at any rank before healing and
# is still +9% PPL after it (the loss is the RoPE removed from 30 of 32 pairs); decompressed + pca loses
# KL 0.0012 at 75% less cache on the full-attention layers, +0.11% PPL.
DEFAULT_LATENT_DIM, DEFAULT_ROPE_MODE, DEFAULT_ROPE_PAIRS, DEFAULT_LAYERS = 192, "decompressed", 2, "full"
DEFAULT_ROPE_COMPONENTS = 1  # rorope: one mixed component per pair, head_dim RoPE values per token


def parse_layers(spec: str, config: GptOssConfig) -> tuple[int, ...]:
    """`full` (the full-attention layers, the default), `sliding`, `all`, or a comma list like `1,3,5`."""
    n = config.num_hidden_layers
    if spec == "all":
        return tuple(range(n))
    if spec in ("full", "sliding"):
        kind = FULL if spec == "full" else SLIDING
        return tuple(i for i in range(n) if config.layer_types[i] == kind)
    try:
        layers = tuple(sorted({int(part) for part in spec.split(",")}))
    except ValueError:
        raise ValueError(
            f"--layers {spec!r}: expected full, sliding, all or a comma list of layer indices"
        ) from None
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"--layers {spec!r}: layer(s) {bad} do not exist (the model has layers 0..{n - 1})")
    return layers


def _heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, -1)


def select_rope_pairs(
    attn: Params, h: jax.Array, config: GptOssConfig, n_pairs: int
) -> tuple[tuple[int, ...], ...]:
    """Per kv head, the `n_pairs` frequency pairs with the largest mean |q_pair| |k_pair| over the
    calibration tokens, summed over the query heads that read that kv head."""
    G, R, d = config.num_key_value_heads, config.q_per_kv, config.head_dim
    q = _heads(jnp.dot(h, attn["q_proj"]["kernel"], precision=HI) + attn["q_proj"]["bias"], G * R)
    k = _heads(jnp.dot(h, attn["k_proj"]["kernel"], precision=HI) + attn["k_proj"]["bias"], G)
    pair_norm = lambda x: jnp.sqrt(x[..., : d // 2] ** 2 + x[..., d // 2 :] ** 2)  # rotation-invariant
    qn = pair_norm(q).reshape(-1, G, R, d // 2)
    kn = pair_norm(k).reshape(-1, G, 1, d // 2)
    score = (qn * kn).mean(0).sum(1)  # [G, d/2]
    top = jnp.argsort(-score, axis=-1)[:, :n_pairs]
    return tuple(tuple(sorted(int(p) for p in row)) for row in np.asarray(top))


def rorope_mix(
    attn: Params, h: jax.Array, config: GptOssConfig, fold: int = 1
) -> tuple[jax.Array, jax.Array]:
    """(rope_mix [d/2F, GF, G, F], energy [d/2F, GF]): per group of `fold` adjacent frequency pairs, the
    principal directions (rows, by decreasing energy) of the G kv heads' keys of those pairs before RoPE
    on the calibration tokens, and the energy of each. Both coordinates of a pair are pooled and the keys
    are not centred: RoPE turns the coordinates into each other and the scores see the whole key, mean
    included."""
    G, d = config.num_key_value_heads, config.head_dim
    Q = d // (2 * fold)
    k = _heads(jnp.dot(h, attn["k_proj"]["kernel"], precision=HI) + attn["k_proj"]["bias"], G)
    groups = k.astype(jnp.float32).reshape(-1, G, 2, Q, fold)  # [N, kv head, coordinate, group, pair]
    second_moment = jnp.einsum("ngcqi,nhcqk->qgihk", groups, groups, precision=HI) / (2 * groups.shape[0])
    energy, vecs = jnp.linalg.eigh(second_moment.reshape(Q, G * fold, G * fold))  # ascending
    return jnp.swapaxes(vecs[..., ::-1], 1, 2).reshape(Q, G * fold, G, fold), energy[:, ::-1]


def _key_parts(attn: Params, config: GptOssConfig, layer_config: GptOssConfig, layer: int, rope_mix):
    """((kernel, bias) of the key values that keep RoPE, `k_rope`'s; None for decompressed), and (kernel,
    bias) of those the latent compresses: partial, each kv head's kept and other dims; rorope, the key
    projection mixed by `rope_mix` (`rorope_mix`), its leading M components per group and the others."""
    G, d = config.num_key_value_heads, config.head_dim
    wk, bk = attn["k_proj"]["kernel"], attn["k_proj"]["bias"]
    mode = layer_config.mla.rope_mode
    if mode == "decompressed":
        return None, (wk, bk)
    if mode == "partial":
        keep, nope = rope_dims(layer_config, layer)
        cols = lambda dims: (np.arange(G)[:, None] * d + dims).reshape(-1)
        return (wk[:, cols(keep)], bk[cols(keep)]), (wk[:, cols(nope)], bk[cols(nope)])
    m = layer_config.mla.num_rope_components(layer)
    mixed = lambda x: mix(_heads(x.astype(jnp.float32), G), rope_mix)
    with jax.default_matmul_precision("highest"):
        wm, bm = mixed(wk), mixed(bk)  # [D, GF, d/F], [GF, d/F]
    flat = lambda x: x.reshape(*x.shape[:-2], -1).astype(wk.dtype)
    return (flat(wm[:, :m]), flat(bm[:m])), (flat(wm[:, m:]), flat(bm[m:]))


def fit_layer(
    attn: Params, h: jax.Array | None, config: GptOssConfig, layer_config: GptOssConfig, layer: int, init: str
) -> tuple[Params, dict[str, Any]]:
    """MLA params for one layer (of `layer_config`, which carries the MLA settings) and its report row."""
    mla = layer_config.mla
    r = mla.latent_dims[mla.index(layer)]
    rope_mix, pair_energy = (None, None)
    if mla.rope_mode == "rorope":
        rope_mix, pair_energy = rorope_mix(attn, h, config, mla.rope_fold)
    kept, (wk, bk) = _key_parts(attn, config, layer_config, layer, rope_mix)
    w = jnp.concatenate([wk, attn["v_proj"]["kernel"]], axis=1)
    b = jnp.concatenate([bk, attn["v_proj"]["bias"]])
    k_width = wk.shape[1]
    w32, b32 = w.astype(jnp.float32), b.astype(jnp.float32)
    if init == "svd":
        u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
        energy = s**2
        down = u[:, :r] * jnp.sqrt(s[:r])
        up = jnp.sqrt(s[:r])[:, None] * vt[:r]
        bias = b32
    else:
        y = jnp.dot(h.astype(jnp.float32), w32, precision=HI) + b32
        mean = y.mean(0)
        k_rms = jnp.sqrt(jnp.mean((y[:, :k_width] - mean[:k_width]) ** 2)) if k_width else 1.0
        v_rms = jnp.sqrt(jnp.mean((y[:, k_width:] - mean[k_width:]) ** 2))
        scale = jnp.concatenate([jnp.full(k_width, 1 / k_rms), jnp.full(w.shape[1] - k_width, 1 / v_rms)])
        centred = (y - mean) * scale
        energy, vecs = jnp.linalg.eigh(jnp.dot(centred.T, centred, precision=HI) / y.shape[0])
        energy, vecs = energy[::-1], vecs[:, ::-1]
        u = vecs[:, :r]
        down = jnp.dot(w32 * scale, u, precision=HI)
        up = u.T / scale
        bias = mean + jnp.dot(jnp.dot((b32 - mean) * scale, u, precision=HI), u.T, precision=HI) / scale
    dtype = attn["k_proj"]["kernel"].dtype
    new = {name: attn[name] for name in ("q_proj", "o_proj", "sinks")}
    new["kv_a"] = {"kernel": down.astype(dtype)}
    new["kv_b"] = {"kernel": up.astype(dtype), "bias": bias.astype(dtype)}
    if kept is not None:
        new["k_rope"] = {"kernel": kept[0], "bias": kept[1]}
    if rope_mix is not None:
        new["rope_mix"] = rope_mix.astype(dtype)
    energy = jnp.maximum(energy, 0)
    curve = np.asarray(jnp.cumsum(energy) / energy.sum())
    report = {
        "layer": layer,
        "latent_dim": r,
        "energy_retained": float(curve[r - 1]),
        "energy_curve": curve.tolist(),
    }
    if h is not None:
        report.update(_reconstruction_errors(attn, new, h, w32, b32, k_width))
    if mla.rope_mode == "partial":
        report["rope_pairs"] = [list(p) for p in mla.rope_pairs[mla.index(layer)]]
    if mla.rope_mode == "rorope":
        m = mla.num_rope_components(layer)
        report["rope_components"] = m
        # The share of the keys' energy (before RoPE) in the components that keep RoPE.
        report["rope_energy_retained"] = float(pair_energy[:, :m].sum() / pair_energy.sum())
    return new, report


def _reconstruction_errors(attn, new, h, w, b, k_width) -> dict[str, float]:
    """Relative L2 error of the compressed part of K and of V on the calibration tokens."""
    h = h.astype(jnp.float32)
    y = jnp.dot(h, w, precision=HI) + b
    c = jnp.dot(h, new["kv_a"]["kernel"].astype(jnp.float32), precision=HI)
    y_hat = jnp.dot(c, new["kv_b"]["kernel"].astype(jnp.float32), precision=HI) + new["kv_b"]["bias"]
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-30))
    out = {"v_rel_error": rel(y[:, k_width:], y_hat[:, k_width:])}
    out["k_rel_error"] = rel(y[:, :k_width], y_hat[:, :k_width]) if k_width else 0.0
    return out


PerLayer = int | dict[int, int]


def per_layer(budget: PerLayer, layers: tuple[int, ...], flag: str) -> dict[int, int]:
    """{layer: n} for every converted layer, from one budget for all or a budget per layer."""
    if not isinstance(budget, dict):
        return dict.fromkeys(layers, budget)
    if set(budget) != set(layers):
        raise ValueError(
            f"{flag} per layer names layers {sorted(budget)}; the converted layers are {list(layers)}"
        )
    return {int(i): int(n) for i, n in budget.items()}


def convert(
    params: Params,
    config: GptOssConfig,
    latent_dim: PerLayer,
    rope_mode: str = "decompressed",
    layers: tuple[int, ...] | None = None,
    rope_pairs: PerLayer = 0,
    init: str = "svd",
    calib_tokens: np.ndarray | dict[str, np.ndarray] | None = None,
    progress: bool = False,
    rope_components: PerLayer = 0,
    rope_fold: int = 1,
) -> tuple[GptOssConfig, Params, list[dict[str, Any]]]:
    """(MLA config, MLA params, per-layer report). Unconverted layers are shared, not copied.

    `latent_dim`, `rope_pairs` and `rope_components` are one budget for every converted layer or a budget
    per layer ({layer: n}, every converted layer named), so layers whose keys need more RoPE can keep more.
    `calib_tokens`: [N, T] token windows for every layer, or {"full": ..., "sliding": ...} (see
    `weights.calib`) giving sliding-window layers their own windows."""
    if config.mla is not None:
        raise ValueError(
            "the source model is already MLA (its config has an 'mla' section); convert the original"
        )
    layers = parse_layers("full", config) if layers is None else tuple(layers)
    if not layers:
        raise ValueError("--layers selects no layer to convert")
    d, G = config.head_dim, config.num_key_value_heads
    dims = per_layer(latent_dim, layers, "--latent-dim")
    n_pairs = per_layer(rope_pairs, layers, "--rope-pairs")
    components = per_layer(rope_components, layers, "--rope-components")
    if rope_mode == "partial" and not all(1 <= n <= d // 2 for n in n_pairs.values()):
        raise ValueError(f"--rope-pairs {rope_pairs} must be in 1..{d // 2} (head_dim / 2) for partial mode")
    if rope_mode == "rorope" and (rope_fold < 1 or (d // 2) % rope_fold):
        raise ValueError(f"--rope-fold {rope_fold} must divide the {d // 2} frequency pairs (head_dim / 2)")
    if rope_mode == "rorope" and not all(1 <= n <= G * rope_fold for n in components.values()):
        raise ValueError(
            f"--rope-components {rope_components} must be in 1..{G * rope_fold} (the kv heads times "
            f"--rope-fold) for rorope mode"
        )
    needs_calib = init == "pca" or rope_mode in ("partial", "rorope")
    sets = calib_tokens if isinstance(calib_tokens, dict) else {"full": calib_tokens, "sliding": calib_tokens}
    if needs_calib and any(t is None or np.asarray(t).size == 0 for t in sets.values()):
        raise ValueError(
            f"--init {init} / --rope-mode {rope_mode} need calibration tokens (--calib): none given"
        )
    inputs = None
    if needs_calib:  # each layer's attention inputs on its own set (sliding layers: short windows)
        by_set = {id(t): attention_inputs(params, jnp.asarray(t), config) for t in sets.values()}
        kind = lambda i: "sliding" if config.is_sliding(i) else "full"
        inputs = [by_set[id(sets[kind(i)])][i] for i in range(config.num_hidden_layers)]
    flat = lambda x: x.reshape(-1, x.shape[-1])
    pairs = []
    if rope_mode == "partial":
        pairs = [
            select_rope_pairs(params["layers"][i]["self_attn"], flat(inputs[i]), config, n_pairs[i])
            for i in layers
        ]
    try:
        kept = tuple(components[i] for i in layers) if rope_mode == "rorope" else ()
        fold = rope_fold if rope_mode == "rorope" else 1
        mla = MlaConfig(rope_mode, layers, tuple(dims[i] for i in layers), tuple(pairs), kept, fold)
        mla_config = dataclasses.replace(config, mla=mla)
    except ConfigError as e:
        raise ValueError(f"--latent-dim / --rope-pairs / --rope-components: {e}") from None
    new_layers = list(params["layers"])
    report = []
    for i in tqdm(layers, desc="converting", unit="layer", disable=not progress):
        attn = params["layers"][i]["self_attn"]
        new_attn, row = fit_layer(
            attn, flat(inputs[i]) if inputs is not None else None, config, mla_config, i, init
        )
        new_layers[i] = {**params["layers"][i], "self_attn": new_attn}
        report.append(row)
    new_params = {**params, "layers": new_layers}
    check_params(new_params, mla_config)
    return mla_config, new_params, report


def plot_energy(report: list[dict[str, Any]], path: str, title: str) -> None:
    """Cumulative singular-value (svd) or principal-component (pca) energy per converted layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report:
        curve = row["energy_curve"]
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"layer {row['layer']}")
        ax.plot(row["latent_dim"], row["energy_retained"], "k.", ms=4)
    ax.set(xlabel="latent rank", ylabel="energy retained", title=title, ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_mla_flags(parser: argparse.ArgumentParser) -> None:
    """The MLA settings flags, shared by the converter and the cache calculator."""
    parser.add_argument("--latent-dim", type=int, default=DEFAULT_LATENT_DIM, help="latent width per token")
    parser.add_argument("--rope-mode", choices=list(ROPE_MODES), default=DEFAULT_ROPE_MODE)
    parser.add_argument(
        "--rope-pairs", type=int, default=DEFAULT_ROPE_PAIRS, help="RoPE pairs kept per kv head (partial)"
    )
    parser.add_argument(
        "--rope-components",
        type=int,
        default=DEFAULT_ROPE_COMPONENTS,
        help="mixed key components kept with RoPE per frequency pair (group), 1..kv heads x fold (rorope)",
    )
    parser.add_argument(
        "--rope-fold",
        type=int,
        default=1,
        help="FreqFold: adjacent frequency pairs mixed together, turned at the first's frequency (rorope)",
    )
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="full, sliding, all, or e.g. 1,3,5")


def main(argv=None) -> int:
    from support.corpora import token_windows
    from weights.load import load_model
    from weights.orbax_io import save_checkpoint

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="source model: transformers folder or Orbax checkpoint"
    )
    parser.add_argument("--out", required=True, help="Orbax checkpoint to create")
    add_mla_flags(parser)
    parser.add_argument("--init", choices=["svd", "pca"], default="pca")  # ahead of svd at every rank
    parser.add_argument("--calib", default="stdlib", help="calibration text: stdlib or a file / folder")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--calib-seq-len", type=int, default=512, help="windows for full-attention layers")
    parser.add_argument(
        "--calib-select",
        choices=SELECTIONS,
        default="kmeans",
        help="which windows (weights/calib.py): the corpus' first, random, or diverse by k-means (default)",
    )
    parser.add_argument(
        "--calib-sliding-len", type=int, help="windows for sliding-window layers (default: the window)"
    )
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        print(f"error: --out {args.out} exists", file=sys.stderr)
        return 2
    try:
        config, params, tokenizer_dir = load_model(args.model)
        layers = parse_layers(args.layers, config)
        calib = None
        if args.init == "pca" or args.rope_mode != "decompressed":
            if args.calib_tokens <= 0:
                raise ValueError(f"--calib-tokens {args.calib_tokens}: calibration data is empty")
            if tokenizer_dir is None:
                raise ValueError(
                    f"--calib {args.calib}: {args.model} has no tokenizer.json to tokenize it with"
                )
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
            long_len = min(args.calib_seq_len, args.calib_tokens)
            pool = 1 if args.calib_select == "first" else POOL_FACTOR
            stream = token_windows(tokenizer, args.calib, args.calib_tokens * pool, 1).reshape(-1)
            calib = calibration_set(
                params,
                config,
                stream,
                args.calib_tokens,
                args.calib_select,
                long_len,
                min(args.calib_sliding_len or config.sliding_window, long_len),
            )
        mla_config, mla_params, report = convert(
            params,
            config,
            args.latent_dim,
            args.rope_mode,
            layers,
            args.rope_pairs,
            args.init,
            calib,
            progress=True,
            rope_components=args.rope_components,
            rope_fold=args.rope_fold,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Everything goes into a temporary folder that becomes --out only when complete.
    out = os.path.abspath(args.out)
    tmp = f"{out}.partial-{os.getpid()}"
    save_checkpoint(tmp, mla_params, mla_config, source=os.path.abspath(args.model))
    if tokenizer_dir and not os.path.isdir(os.path.join(tmp, "tokenizer")):
        from weights.orbax_io import copy_tokenizer

        copy_tokenizer(tokenizer_dir, tmp)
    summary = {
        "source": os.path.abspath(args.model),
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "mla": mla_config.mla.to_hf(),
        "layers": report,
    }
    with open(os.path.join(tmp, "mla_report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_energy(
        report,
        os.path.join(tmp, "mla_energy.png"),
        f"{args.init} init, {args.rope_mode}, r={args.latent_dim}",
    )
    os.rename(tmp, out)
    for row in report:
        errors = (
            f", k err {row['k_rel_error']:.3f}, v err {row['v_rel_error']:.3f}"
            if "v_rel_error" in row
            else ""
        )
        print(f"layer {row['layer']:3d}: r={row['latent_dim']}, energy {row['energy_retained']:.4f}{errors}")
    print(f"wrote {out} (report: mla_report.json, plot: mla_energy.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
