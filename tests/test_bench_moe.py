"""eval.bench.moe at a tiny size (interpreted kernels): the benchmark rows, the agreement check and the
launch sweep all run and report what the GPU run reports."""

import pytest

from eval.bench import moe as bench
from gptoss_mla_jax import gmm as gmm_lib
from gptoss_mla_jax.gmm import Tiles


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "E", 4)
    monkeypatch.setattr(bench, "PROJECTIONS", {"gate_up": (64, 64), "down": (32, 64)})
    small = {(k, None, None): Tiles(16, 32, 32) for k in ("gmm", "gmm_t", "tgmm", "mxfp4", "mxfp4_t")}
    monkeypatch.setattr(gmm_lib, "LAUNCH", small)


def test_benchmark_rows():
    rows = bench.benchmark([16], repeats=1)
    assert not [r for r in rows if "error" in r]
    # bf16: 3 stages x 3 paths; MXFP4: 2 stages (no weight gradient) x 2 paths; dense peer once per stage.
    per_projection = {(r["weights"], r["routing"]) for r in rows}
    assert len(rows) == 2 * (3 * 3 + 3 * 2 + 2 * 2 * 2) and len(per_projection) == 4
    assert all(r["tflops"] > 0 for r in rows)


def test_check_agrees_with_ragged_dot():
    """bf16 inputs against ragged_dot in float32: the kernel's error is bf16 rounding, as large as bf16
    ragged_dot's own, for every stage and every weight format."""
    rows = bench.check(16)
    by_path = {(r["projection"], r["weights"], r["path"]): r for r in rows}
    assert len(by_path) == 12  # 2 projections x (bf16, mxfp4, mxfp4 with padded scale rows) x 2 paths
    for (projection, weights, path), row in by_path.items():
        if path != "gmm":
            continue
        peer = by_path[(projection, weights, "ragged_dot")]
        for stage in ("forward", "d_lhs", "d_rhs"):
            if stage in row:
                assert row[stage]["norm"] < 1e-2, (projection, weights, stage, row[stage])
                assert row[stage]["norm"] <= 1.1 * peer[stage]["norm"], (projection, weights, stage)


def test_sweep_reports_the_best_setting(monkeypatch):
    monkeypatch.setattr(bench, "CANDIDATES", {"gmm": [Tiles(16, 16, 16), Tiles(16, 32, 32)]})
    results = bench.sweep(16, repeats=1, kinds=("gmm",))
    assert set(results) == {"gmm/gate_up", "gmm/down"}
    assert all("ms" in r for rows in results.values() for r in rows)


def test_decode_variants_experiment_runs_and_agrees(tmp_path):
    """`eval.experiments.mxfp4_decode_variants --smoke`: the variants the interpreter can run (with and
    without the folded decoding, each launch) give the same MoE output, and the routing times are there."""
    import json

    from eval.experiments import mxfp4_decode_variants

    out = tmp_path / "variants.json"
    assert mxfp4_decode_variants.main(["--smoke", "--batches", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["variant"] for r in result["rows"]} == {"two_multiplies", "folded"}
    assert all(r["same_as_first"] for r in result["rows"]), result["rows"]
    assert {"router_logits_xla", "routing_kernel_over_256_rows"} <= result.keys()
