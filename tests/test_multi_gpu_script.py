"""eval.experiments.multi_gpu_distill at a small size on simulated CPU devices: every mesh is checkpointed
once and resumed once in separate processes, and its losses match the one-device run, which accumulates
gradients where its device cannot hold the global batch."""

import json
import shutil

import jax
import numpy as np
import pytest

from eval.experiments import multi_gpu_distill
from weights.load import load_model


def test_compare_flags_a_diverging_mesh():
    base = {"losses": [1.0, 0.5], "tokens_per_s": 100.0}
    runs = {
        "1x1": base,
        "2x1": {"losses": [1.001, 0.5], "tokens_per_s": 150.0},
        "2x2": {"losses": [1.0, 0.6], "tokens_per_s": 100.0},
    }
    out = multi_gpu_distill.compare(runs, 0.01)["meshes"]
    assert out["2x1"]["losses_match"] and abs(out["2x1"]["scaling_efficiency"] - 0.75) < 1e-12
    assert not out["2x2"]["losses_match"] and abs(out["2x2"]["max_relative_loss_difference"] - 0.2) < 1e-12


def test_accumulation_splits_the_global_batch_over_the_data_axis():
    assert multi_gpu_distill.accumulation("1x1", 4, 2) == 2
    assert multi_gpu_distill.accumulation("2x2", 4, 2) == 1
    assert multi_gpu_distill.accumulation("4x1", 4, 2) == 1
    assert multi_gpu_distill.accumulation("1x4", 8, 2) == 4
    with pytest.raises(ValueError, match="--batch 2 does not split over mesh 4x1"):
        multi_gpu_distill.accumulation("4x1", 2, 2)


@pytest.mark.slow  # started first (tests/conftest.py)
def test_smoke_run_end_to_end(tmp_path):
    # One row per device: the one-device baseline accumulates 2 micro-batches of 1 per update, the 2x1
    # mesh takes the batch of 2 in one step; their losses per update must agree.
    out = tmp_path / "result.json"
    argv = ["--smoke", "--work", str(tmp_path / "work"), "--meshes", "1x1,2x1", "--steps", "2"]
    argv += ["--batch", "2", "--rows-per-device", "1", "--seq-len", "16", "--out", str(out)]
    assert multi_gpu_distill.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"1x1", "2x1"}
    assert result["runs"]["1x1"]["grad_accum"] == 2 and result["runs"]["2x1"]["grad_accum"] == 1
    for run in result["runs"].values():
        # resumed to the end: one loss per update, one micro-step row per accumulated batch
        assert len(run["losses"]) == 2 and run["steps"] == 2 * run["grad_accum"]
    assert (tmp_path / "work" / "run_2x1" / "ckpt").exists()
    assert result["comparison"]["meshes"]["2x1"]["losses_match"]

    # A resume that died before its last step (the summary.json of --stop-after's half still there) is
    # resumed again by the next call, not read as a finished run.
    run = tmp_path / "work" / "run_2x1"
    shutil.rmtree(run / "ckpt" / "2")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    assert (run / "summary.json").exists() and not multi_gpu_distill.finished(str(run), 2)
    assert multi_gpu_distill.main(argv) == 0
    again = json.loads(out.read_text())["runs"]["2x1"]
    assert again["losses"] == result["runs"]["2x1"]["losses"]

    # The baseline taken from that results file in a fresh folder (the machine of an earlier call is gone):
    # the teacher, student and data are rebuilt from their seeds bit for bit, so the meshes run there
    # compare with the baseline's losses (2x1's finished run is carried over, not run again: the resume
    # above showed that a rerun in a new process loses the same); a results file of other steps is refused.
    rerun, fresh, work = tmp_path / "rerun.json", tmp_path / "fresh", tmp_path / "work"
    shutil.copytree(work / "run_2x1", fresh / "run_2x1")
    argv2 = ["--smoke", "--work", str(fresh), "--meshes", "2x1", "--steps", "2", "--batch", "2"]
    argv2 += ["--rows-per-device", "1", "--seq-len", "16", "--out", str(rerun)]
    assert multi_gpu_distill.main([*argv2, "--baseline", str(out)]) == 0
    for name in ("teacher", "student"):
        built, rebuilt = (
            load_model(str(work / name), progress=False),
            load_model(str(fresh / name), progress=False),
        )
        assert built[0] == rebuilt[0]
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, built[1], rebuilt[1])))
    assert np.array_equal(np.load(work / "ids.npy"), np.load(fresh / "ids.npy"))
    second = json.loads(rerun.read_text())
    assert list(second["runs"]) == ["1x1", "2x1"] and second["baseline_from"] == str(out)
    assert second["runs"]["1x1"] == result["runs"]["1x1"]
    assert second["comparison"]["meshes"]["2x1"]["losses_match"]
    argv2[argv2.index("--steps") + 1] = "3"
    with pytest.raises(SystemExit, match="steps 2, this run has 3"):
        multi_gpu_distill.main([*argv2, "--baseline", str(out)])


def test_sharded_forward_check_smoke(tmp_path):
    from eval.experiments import sharded_forward_check

    out = tmp_path / "check.json"
    argv = ["--smoke", "--mesh", "2x1", "--batch", "2", "--seq-len", "16", "--layers", "1"]
    assert (
        sharded_forward_check.main(
            [*argv, "--pieces", "moe_sparse_mxfp4,forward_sparse_moe", "--out", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    differences = result["relative_difference"]
    assert differences["moe_sparse_mxfp4"] == 0 and differences["moe_sparse_mxfp4_per_shard"] == 0
    assert (
        differences["forward_sparse_moe"] < 2e-2 and differences["forward_sparse_moe_pinned"] < 2e-2
    )  # bf16
    kl = result["mean_kl_from_float32"]
    assert len(kl) == 4 and max(kl.values()) < 1e-4  # one device and sharded, unpinned and pinned
