"""Calibration sets: k-means finds known clusters, the diverse selection takes one window per cluster,
and convert() calibrates each layer on its own set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weights.calib import calibration_set, kmeans, select
from weights.to_mla import convert


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 3)) * 10
    x = np.concatenate([c + rng.standard_normal((40, 3)) * 0.1 for c in centers])
    centroids, assign = kmeans(jnp.asarray(x), 5, seed=1)
    order = np.argsort(np.asarray(centroids)[:, 0])
    np.testing.assert_allclose(np.asarray(centroids)[order], centers[np.argsort(centers[:, 0])], atol=0.05)
    labels = np.asarray(assign).reshape(5, 40)
    assert all(len(set(row)) == 1 for row in labels) and len({row[0] for row in labels}) == 5


def test_diverse_selection_takes_one_window_per_kind(tiny):
    """A pool of 4 kinds of windows (each a token repeated), 8 copies each: k-means keeps one of each,
    the first-n rule does not."""
    config, params = tiny
    pool = np.repeat(np.asarray([3, 17, 42, 80])[:, None, None], 8, axis=1).reshape(32, 1)
    pool = np.broadcast_to(pool, (32, 16)).astype(np.int32)
    chosen = select(params, config, pool, 4, "kmeans")
    assert sorted(chosen[:, 0].tolist()) == [3, 17, 42, 80]
    assert sorted(set(select(params, config, pool, 4, "first")[:, 0].tolist())) == [3]
    with pytest.raises(ValueError, match="calib-select"):
        select(params, config, pool, 4, "best")


def test_sliding_layers_calibrate_on_their_own_windows(tiny):
    config, params = tiny
    stream = np.random.default_rng(5).integers(0, config.vocab_size, 4096).astype(np.int32)
    sets = calibration_set(params, config, stream, 256, "random", long_len=32, short_len=8)
    assert sets["full"].shape == (8, 32) and sets["sliding"].shape == (32, 8)
    both = convert(params, config, 6, "decompressed", layers=(0, 1), init="pca", calib_tokens=sets)[1]
    only_full = convert(
        params, config, 6, "decompressed", layers=(0, 1), init="pca", calib_tokens=sets["full"]
    )[1]
    only_sliding = convert(
        params, config, 6, "decompressed", layers=(0, 1), init="pca", calib_tokens=sets["sliding"]
    )[1]
    assert config.is_sliding(0) and not config.is_sliding(1)
    same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert same(both["layers"][0], only_sliding["layers"][0]) and same(
        both["layers"][1], only_full["layers"][1]
    )
    assert not same(both["layers"][0], only_full["layers"][0])
