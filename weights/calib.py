"""Calibration sets for `weights.to_mla`: which tokens the PCA init and the RoPE-pair choice look at.

- `first`: the first tokens of the corpus split (what a plain `token_windows` gives);
- `random`: windows drawn at random from a pool spread over the split;
- `kmeans`: a diverse selection: the pool's windows embedded by the model's own mean-pooled hidden states
  (the last layer's normed attention input), clustered with k-means (in jnp), and the window nearest each
  centroid kept.

Sliding-window layers only ever see `sliding_window` keys, so they get their own short dense windows
(`short_len`, default the window) and full-attention layers long ones (`long_len`), each set with the
same token budget: `{"full": [n, long_len], "sliding": [m, short_len]}`, which `weights.to_mla.convert`
accepts as its calibration tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptoss_mla_jax.config import GptOssConfig
from gptoss_mla_jax.model import Params, attention_inputs

SELECTIONS = ("first", "random", "kmeans")
POOL_FACTOR = 8  # random / kmeans choose among this many times the windows they keep


def _sq_distances(x: Float[Array, "M D"], c: Float[Array, "k D"]) -> Float[Array, "M k"]:
    return jnp.maximum((x * x).sum(-1)[:, None] - 2 * x @ c.T + (c * c).sum(-1)[None, :], 0)


def kmeans(
    x: Float[Array, "M D"], k: int, seed: int = 0, iters: int = 50
) -> tuple[Float[Array, "k D"], Int[Array, " M"]]:
    """Lloyd's k-means with k-means++ seeding: (centroids, cluster of each row). An emptied cluster keeps
    its previous centroid."""
    x = jnp.asarray(x, jnp.float32)
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k-means: k = {k} clusters for {m} points")

    def seed_one(carry, key):  # k-means++: the next seed far from the chosen ones, in proportion to d^2
        centroids, d2, i = carry
        pick = jax.random.choice(key, m, p=d2 / jnp.maximum(d2.sum(), 1e-30))
        centroids = centroids.at[i].set(x[pick])
        return (centroids, jnp.minimum(d2, ((x - x[pick]) ** 2).sum(-1)), i + 1), None

    first, rest = jax.random.split(jax.random.key(seed))
    start = x[jax.random.randint(first, (), 0, m)]
    init = (jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(start), ((x - start) ** 2).sum(-1), 1)
    (centroids, _, _), _ = jax.lax.scan(seed_one, init, jax.random.split(rest, k - 1))

    def step(centroids, _):
        one_hot = jax.nn.one_hot(jnp.argmin(_sq_distances(x, centroids), axis=1), k, dtype=x.dtype)
        counts = one_hot.sum(0)
        means = (one_hot.T @ x) / jnp.maximum(counts, 1)[:, None]
        return jnp.where(counts[:, None] > 0, means, centroids), None

    centroids, _ = jax.lax.scan(step, centroids, None, length=iters)
    return centroids, jnp.argmin(_sq_distances(x, centroids), axis=1)


def window_features(params: Params, config: GptOssConfig, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """[M, D]: each window's mean-pooled last-layer attention input (the model's own view of it)."""
    last = jax.jit(lambda t: attention_inputs(params, t, config)[-1].astype(jnp.float32).mean(1))
    return np.concatenate(
        [np.asarray(last(jnp.asarray(windows[i : i + batch]))) for i in range(0, len(windows), batch)]
    )


def select(
    params: Params, config: GptOssConfig, pool: np.ndarray, n: int, how: str, seed: int = 0
) -> np.ndarray:
    """`n` windows of `pool` [M, T]: the first n, n at random, or one nearest each of n k-means centroids."""
    if how not in SELECTIONS:
        raise ValueError(f"--calib-select {how!r}: expected one of {', '.join(SELECTIONS)}")
    if n > len(pool):
        raise ValueError(f"calibration: {n} windows asked from a pool of {len(pool)}")
    if how == "first":
        return pool[:n]
    if how == "random":
        return pool[np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))]
    features = window_features(params, config, pool)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    centroids, _ = kmeans(jnp.asarray(features), n, seed)
    distance = np.asarray(_sq_distances(jnp.asarray(features), centroids))  # [M, n]
    chosen: set[int] = set()
    for c in range(n):  # the nearest window to each centroid not taken yet
        order = np.argsort(distance[:, c])
        chosen.add(int(next(i for i in order if i not in chosen)))
    return pool[np.sort(list(chosen))]


def calibration_set(
    params: Params,
    config: GptOssConfig,
    stream: np.ndarray,
    n_tokens: int,
    how: str = "kmeans",
    long_len: int = 512,
    short_len: int | None = None,
    pool_factor: int = POOL_FACTOR,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """{"full": long windows, "sliding": short windows}, each about `n_tokens` tokens, chosen by `how`
    from `pool_factor` times as many windows cut from `stream` (a token id array); `first` takes the
    stream's first windows."""
    short_len = short_len or config.sliding_window
    out = {}
    for kind, length in (("full", long_len), ("sliding", short_len)):
        n = max(n_tokens // length, 1)
        available = len(stream) // length
        if available < n:
            raise ValueError(
                f"calibration: {len(stream)} tokens hold {available} windows of {length}, need {n}"
            )
        # The pool: evenly spaced windows over the whole stream, so a selection can reach all of it.
        count = min(available, n * pool_factor) if how != "first" else n
        starts = np.linspace(0, (available - 1) * length, count).astype(np.int64) // length * length
        pool = np.stack([stream[s : s + length] for s in starts]).astype(np.int32)
        out[kind] = select(params, config, pool, n, how, seed)
    return out
