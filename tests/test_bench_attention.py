"""eval.bench.attention at a tiny size (interpreted kernel): the table, the agreement check and the launch
sweep all run and report what the GPU run reports."""

import pytest

from eval.bench import attention as bench
from gptoss_mla_jax import flash_attention as fa


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    for name, value in (("H", 4), ("G", 2), ("D", 16), ("WINDOW", 8)):
        monkeypatch.setattr(bench, name, value)
    for kind in fa.LAUNCH:
        monkeypatch.setitem(fa.LAUNCH, kind, fa.Blocks(16, 16))


def test_visible_pairs():
    assert bench.visible_pairs(4, None) == 1 + 2 + 3 + 4
    assert bench.visible_pairs(4, 2) == 1 + 2 + 2 + 2


def test_benchmark_rows():
    rows = bench.benchmark([(1, 32)], repeats=1)
    assert not [r for r in rows if "error" in r]
    assert len(rows) == 2 * 2 * 2  # windows x paths x stages
    assert all(r["tflops"] > 0 for r in rows)


def test_check_agrees_with_float32():
    """bf16 inputs against jnp in float32: the kernel's error is bf16 rounding, under bf16's unit roundoff
    (2^-8) for the output and every gradient. (bf16 jnp's is of the same size, 5e-3 for the sinks' gradient
    here; the kernel rounds dS to bf16 for its tensor-core products, which jnp's backward does not, and sums
    the sinks' gradient in float32, so their errors differ a little either way.)"""
    rows = bench.check(1, 48)
    by_path = {(r["window"], r["path"]): r for r in rows}
    assert len(by_path) == 4
    for (window, path), row in by_path.items():
        for stage in ("forward", "d_q", "d_k", "d_v", "d_sinks"):
            assert path == "jnp" or row[stage]["norm"] < 2**-8, (window, stage, row[stage])


def test_sweep_reports_every_candidate(monkeypatch):
    monkeypatch.setattr(bench, "CANDIDATES", {"forward": [fa.Blocks(16, 16)], "dq": [fa.Blocks(16, 16)]})
    results = bench.sweep(1, 32, repeats=1, kinds=("forward", "dq"))
    assert set(results) == {"forward", "dq"}
    assert all("ms" in r for rows in results.values() for r in rows)
    assert fa.LAUNCH["forward"] == fa.Blocks(16, 16)  # the table is restored
