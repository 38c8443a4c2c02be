"""eval.multi_gpu_distill at a small size on simulated CPU devices: every mesh is checkpointed once and
resumed once in separate processes, and its losses match the one-device run."""

import json
import shutil

from eval import multi_gpu_distill


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


def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "result.json"
    argv = ["--smoke", "--work", str(tmp_path / "work"), "--meshes", "1x1,2x1", "--steps", "2"]
    assert multi_gpu_distill.main([*argv, "--batch", "2", "--seq-len", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"1x1", "2x1"}
    for run in result["runs"].values():
        assert len(run["losses"]) == 2 and run["steps"] == 2  # resumed to the end, one row per step
    assert (tmp_path / "work" / "run_2x1" / "ckpt").exists()
    assert result["comparison"]["meshes"]["2x1"]["losses_match"]

    # A resume that died before its last step (the summary.json of --stop-after's half still there) is
    # resumed again by the next call, not read as a finished run.
    run = tmp_path / "work" / "run_2x1"
    shutil.rmtree(run / "ckpt" / "2")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    assert (run / "summary.json").exists() and not multi_gpu_distill.finished(str(run), 2)
    assert multi_gpu_distill.main([*argv, "--batch", "2", "--seq-len", "16", "--out", str(out)]) == 0
    again = json.loads(out.read_text())["runs"]["2x1"]
    assert again["losses"] == result["runs"]["2x1"]["losses"]
