"""eval.experiments.quality_study at a tiny size: teacher trained, transformers agrees on its held-out PPL, a
matrix row is converted, scored, distilled and scored again; a rerun skips finished rows and refuses another
teacher."""

import json
import shutil

import numpy as np
import pytest

from eval.experiments import quality_study


@pytest.mark.slow  # started first (tests/conftest.py)
def test_study_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "study"
    argv = [
        "--teacher", str(tmp_path / "teacher"), "--data", "stdlib", "--teacher-config", "tiny",
        "--train-steps", "3", "--train-batch", "8", "--train-tokens", str(3 * 8 * 65),
        "--tokenizer-chars", "300000",
        "--seq-len", "64", "--eval-windows", "4", "--long-seq-len", "128",
        "--calib-tokens", "256", "--distill-steps", "3", "--distill-batch", "2", "--layers", "full",
        "--modes", "partial", "--reductions", "0.75", "--inits", "pca", "--out", str(out),
    ]  # fmt: skip
    assert quality_study.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    # float32 on both sides: the two implementations agree to rounding.
    assert result["cross_check"]["relative_difference"] < 1e-5
    assert result["teacher_train_log"]["args"]["batch"] == 8
    (row,) = result["rows"]
    assert (row["layers"], row["mode"], row["init"], row["rope_pairs"]) == ("full", "partial", "pca", 2)
    # 8 kv heads x 16 dims: GQA caches 256 values per token, the latent 64 - 2 pairs x 2 x 8 heads = 32.
    assert row["latent_dim"] == 32 and row["values_per_token"] == 64 and row["layer_reduction"] == 0.75
    assert 0 < row["model_reduction_32k"] < 0.75  # sliding layers stay GQA
    # Long windows: twice the training context, as many tokens as the short ones.
    assert result["long_context"]["seq_len"] == 128 and result["long_context"]["tokens"] == 2 * 128
    assert result["long_context"]["teacher_ppl"] > 1
    for stage in ("converted", "distilled"):
        assert row[stage]["kl"] > 0 and row[stage]["ppl"] > 1
        assert row[stage]["long"]["kl"] > 0 and row[stage]["long"]["ppl"] > 1
    assert result["distill_tokens"] == 3 * 2 * 64
    assert result["distill"] == {"steps": 3, "batch": 2, "lr": 1e-3, "seq_len": 64}
    assert "| full | partial | 75.0% / " in out.with_suffix(".md").read_text()
    assert "384 tokens per row in windows of 64 tokens." in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0

    assert quality_study.main(argv) == 0  # nothing left to do: the row is kept, not redone
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == [row]

    # The calibration windows are kept beside the results, for the same teacher (a run on a fresh machine
    # retrains it bit for bit, then reads them instead of choosing them again).
    saved = np.load(out.with_suffix(".calib.npz"))
    assert str(saved["teacher_fingerprint"]) == result["teacher_fingerprint"]
    assert {"windows_full", "windows_sliding"} <= set(saved.files)

    # A second run (other layers, rorope keeping 1 mixed component of each frequency pair: 16 RoPE values
    # and a latent of 48) folded into the first: one table. It reads the first run's windows.
    other = tmp_path / "other"
    shutil.copy(out.with_suffix(".calib.npz"), other.with_suffix(".calib.npz"))
    monkeypatch.setattr(quality_study, "calibration_set", lambda *a, **k: pytest.fail("windows chosen again"))
    argv_other = [*argv, "--layers", "all", "--modes", "rorope1", "--out", str(other)]
    assert quality_study.main(argv_other) == 0
    assert quality_study.main([*argv, "--merge", str(other.with_suffix(".json"))]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["layers"], r["mode"]) for r in merged] == [("full", "partial"), ("all", "rorope1")]
    assert (merged[1]["latent_dim"], merged[1]["rope_values"], merged[1]["values_per_token"]) == (48, 16, 64)

    # Flags that disagree with the written results are refused from the results files alone, before the
    # teacher is loaded (or trained).
    with monkeypatch.context() as patched:
        patched.setattr(quality_study, "load_model", lambda *a, **k: pytest.fail("teacher loaded"))
        assert quality_study.main([*argv, "--long-seq-len", "256"]) == 1  # long windows of another length
        # Rows healed on another budget are neither added to nor merged into a study's table.
        assert quality_study.main([*argv, "--distill-seq-len", "128"]) == 1
        result_other = json.loads(other.with_suffix(".json").read_text())
        result_other["distill"]["lr"] = 1e-4
        other.with_suffix(".json").write_text(json.dumps(result_other))
        assert quality_study.main([*argv, "--merge", str(other.with_suffix(".json"))]) == 1

    result["teacher_fingerprint"] = "0" * 64
    out.with_suffix(".json").write_text(json.dumps(result))
    assert quality_study.main(argv) == 1  # rows of another teacher are never mixed in


def test_study_mode_names():
    """--modes names: sizes and FreqFold parsed, the latent shrunk by the RoPE values each mode caches
    (gpt-oss-20b's 8 kv heads of 64 at 75% less cache: 256 values per token)."""
    parse, latent = quality_study.StudyMode.parse, quality_study.latent_dim_for
    assert parse("partial") == quality_study.StudyMode("partial", quality_study.ROPE_PAIRS)
    assert parse("rorope2f2") == quality_study.StudyMode("rorope", 2, 2)
    assert [latent(0.75, m, 8, 64) for m in ("decompressed", "partial8", "rorope1", "rorope2f2")] == [
        256,
        128,
        192,
        192,
    ]
    for bad in ("rorope", "decompressed2", "partialf2", "mla"):
        with pytest.raises(ValueError, match="--modes"):
            parse(bad)
