"""python -m train.distill as users run it: killed with SIGKILL mid-run, then resumed; a healing that hurts
keeps the conversion."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train.distill import main
from train.loop import logged_rows
from weights.orbax_io import restore_checkpoint, save_checkpoint
from weights.safetensors_io import load_hf
from weights.to_mla import convert

from .conftest import hf_logits

# Subprocesses compute exactly like this one: same simulated devices, same matmul precision.
ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def files(tiny2_hf, tmp_path_factory):
    """(teacher folder, student Orbax checkpoint, token ids .npy): the two-layer tiny teacher."""
    root = tmp_path_factory.mktemp("distill_cli")
    config, teacher = load_hf(tiny2_hf[1], progress=False)
    calib = np.random.default_rng(0).integers(0, config.vocab_size, (4, 32))
    student_config, student, _ = convert(teacher, config, 8, "decompressed", init="pca", calib_tokens=calib)
    save_checkpoint(str(root / "student"), student, student_config)
    np.save(root / "ids.npy", np.random.default_rng(1).integers(0, config.vocab_size, 4096).astype(np.int32))
    return tiny2_hf[1], str(root / "student"), str(root / "ids.npy")


def args(files, out, *extra) -> list[str]:
    teacher, student, ids = files
    return [
        "--teacher", teacher, "--student", student, "--data", ids, "--out", str(out),
        "--seq-len", "16", "--batch", "8", "--lr", "1e-3", "--warmup", "2", "--dtype", "fp32",
        "--no-progress", *extra,
    ]  # fmt: skip


def losses(out) -> list[tuple[int, float, float, float]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["kl"], r["grad_norm"]) for r in map(json.loads, f)]


def test_sigkill_mid_run_then_resume_logs_the_same_losses(files, tmp_path):
    assert main(args(files, tmp_path / "ref", "--steps", "60", "--ckpt-every", "10")) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.distill", *args(files, cut, "--steps", "60", "--ckpt-every", "10")],
        env=ENV,
        stderr=subprocess.PIPE,
    )
    metrics, deadline = cut / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(row["step"] >= 25 for row in logged_rows(metrics)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    saved = sorted(int(p.name) for p in (cut / "ckpt").iterdir() if p.name.isdigit())
    assert saved and 20 <= saved[-1] < 60, saved
    assert max(r[0] for r in losses(cut)) > saved[-1]  # it died after logging steps it never saved

    assert main(args(files, cut, "--steps", "60", "--ckpt-every", "10", "--resume")) == 0
    assert losses(cut) == losses(tmp_path / "ref")  # every step once, bitwise equal


def test_a_metrics_line_cut_off_mid_write_is_not_read(tmp_path):
    """A run killed (or read) while writing its metrics leaves a last line without its newline: resume and
    live readers take the whole lines only."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    assert logged_rows(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(files, out, *extra) -> None:
    """`python -m train.distill --mesh 8x1` as two processes of 4 simulated CPU devices each."""
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    command = [sys.executable, "-m", "train.distill", *args(files, out, "--mesh", "8x1", *extra)]
    command += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    logs = [out.parent / f"{out.name}.process{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:  # files, not pipes: a full pipe would stall one process's collectives
            procs.append(subprocess.Popen([*command, "--process-id", str(i)], env=env, stdout=f, stderr=f))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (code, log) in enumerate(zip(codes, logs, strict=True)):
        assert code == 0, f"process {i}:\n{log.read_text()[-3000:]}"


@pytest.mark.slow  # started first (tests/conftest.py)
def test_two_processes_match_one_process_and_resume_collectively(files, tmp_path):
    """Two processes spanning one 8x1 mesh log the same losses as one process with 8 devices, through a
    collective Orbax checkpoint and --resume."""
    assert main(args(files, tmp_path / "one", "--mesh", "8x1", "--steps", "4", "--ckpt-every", "2")) == 0
    two = tmp_path / "two"
    run_two_processes(files, two, "--steps", "4", "--ckpt-every", "2", "--stop-after", "2")
    assert [r[0] for r in losses(two)] == [1, 2]
    run_two_processes(files, two, "--steps", "4", "--ckpt-every", "2", "--resume")
    one, both = np.asarray(losses(tmp_path / "one")), np.asarray(losses(two))
    assert one.shape == both.shape == (4, 4)
    np.testing.assert_allclose(both, one, rtol=1e-5)


def teacher_samples(model, vocab_size: int, rows: int, seq_len: int, seed: int) -> np.ndarray:
    """[rows, seq_len] tokens sampled from the teacher (its torch twin), each row from a random first
    token: text on which the teacher has the lowest expected perplexity of any model."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((rows, seq_len), np.int64)
    tokens[:, 0] = rng.integers(0, vocab_size, rows)
    for t in range(1, seq_len):  # one shape throughout: position t - 1 sees only the tokens up to it
        logits = hf_logits(model, tokens)[:, t - 1].astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        tokens[:, t] = [rng.choice(vocab_size, p=row / row.sum()) for row in p]
    return tokens


def mla_weights(path: str) -> list[np.ndarray]:
    _, params, _ = restore_checkpoint(path)
    return [
        np.asarray(leaf)
        for key, leaf in jax.tree_util.tree_leaves_with_path(params)
        if any(name in jax.tree_util.keystr(key) for name in ("kv_a", "kv_b"))
    ]


def test_healing_that_hurts_keeps_the_conversion(files, tiny2_hf, tmp_path, capsys):
    """Held-out tokens sampled from the teacher, training data one token repeated: distillation fits the
    student to a context the held-out text never has, its held-out PPL (and KL) rise, and the run outputs
    the converted student. The same steps, rates and shapes as the SIGKILL test (shared compilations)."""
    teacher, student, _ = files
    model, vocab = tiny2_hf[0], tiny2_hf[0].config.vocab_size
    held_out = teacher_samples(model, vocab, 13, 16, seed=2).reshape(-1)  # 13 evaluation windows
    ids = tmp_path / "ids.npy"
    np.save(ids, np.concatenate([np.full(19 * len(held_out), 5), held_out]).astype(np.int32))  # last 5%
    out = tmp_path / "run"
    command = args((teacher, student, str(ids)), out, "--steps", "60", "--ckpt-every", "10")
    # A --stop-after stop is not the end of the run: nothing is chosen or saved as the student yet.
    assert main([*command, "--stop-after", "30"]) == 0
    assert "kept" not in json.loads((out / "summary.json").read_text())
    assert not (out / "student").exists()

    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["kept"] == "converted", summary
    assert summary["healed_ppl"] > summary["converted_ppl"]  # measured: 38.93 against 38.77
    assert summary["healed_kl"] > summary["converted_kl"]
    assert summary["held_out_tokens"] == 13 * 15
    printed = capsys.readouterr().out
    assert f"kept the converted student: held-out PPL {summary['converted_ppl']:.4f} converted" in printed
    for saved, converted in zip(mla_weights(str(out / "student")), mla_weights(student), strict=True):
        np.testing.assert_array_equal(saved, converted)

    # The finished run resumed with --keep-healed: no training, the healed student replaces the folder.
    assert main([*command, "--resume", "--keep-healed"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == "healed" and summary["keep_healed"] and summary["steps"] == 60
    assert summary["healed_ppl"] > summary["converted_ppl"]
    saved, converted = mla_weights(str(out / "student")), mla_weights(student)
    assert any(not np.array_equal(a, b) for a, b in zip(saved, converted, strict=True))
