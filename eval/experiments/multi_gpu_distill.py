"""`python -m train.distill` on several meshes of one host, each checkpointed once and resumed once, against
the one-device run of the same steps: losses, tokens/s, MFU, per-device peak memory, scaling efficiency.

    python -m eval.experiments.multi_gpu_distill --work /tmp/mgd --meshes 1x1,4x1,2x2 [--steps 16]
        [--batch 4] [--rows-per-device 2] [--seq-len 2048] [--out eval/results/multi_gpu_distill.json]
    python -m eval.experiments.multi_gpu_distill --smoke ...   # a 2-layer model on simulated CPU devices

The teacher is a random gpt-oss-20b in the published MXFP4 layout (eval.experiments.fullsize_checkpoint),
the student
its default MLA conversion (weights.to_mla; weight-SVD init, as there is no text to calibrate on), the data
random token ids. Every run is its own process, as a user would launch it: `--stop-after steps/2` (one
checkpoint), then `--resume` to the end. The meshes need as many visible devices as they have.

Every mesh makes the same updates from the same global batches. A mesh whose data axis cannot hold the
global batch at --rows-per-device sequences per device (one H200 holds 2 x 2048 of gpt-oss-20b's
distillation, not 4) accumulates gradients over micro-batches (`--grad-accum`): the same mean gradient,
the same learning rates, and its loss per update is the mean of its micro-steps' losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from eval.experiments import fullsize_checkpoint
from gptoss_mla_jax.config import GPT_OSS_20B
from support.results import write_json


def mesh_devices(mesh: str) -> int:
    return int(np.prod([int(x) for x in mesh.split("x")]))


def run(argv: list[str], env: dict) -> None:
    print("$", " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], check=True, env=env)


def finished(folder: str, steps: int) -> bool:
    """Whether the run in `folder` logged all `steps` (a --stop-after half writes its summary too)."""
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return sum(1 for _ in f) >= steps
    except FileNotFoundError:
        return False


def accumulation(mesh: str, batch: int, rows_per_device: int) -> int:
    """The fewest micro-batches per update that split `batch` evenly over the mesh's data axis with at
    most `rows_per_device` sequences on each device."""
    data = int(mesh.split("x")[0])
    for accum in range(1, batch + 1):
        micro = batch // accum
        if batch % accum == 0 and micro % data == 0 and micro // data <= rows_per_device:
            return accum
    raise ValueError(
        f"--batch {batch} does not split over mesh {mesh}'s {data} data shards at "
        f"<= {rows_per_device} rows per device (--rows-per-device)"
    )


def read_run(folder: str, accum: int) -> dict:
    """The run's summary, with its loss per update (the mean over the update's micro-steps)."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        micro = np.array([json.loads(line)["loss"] for line in f])
    summary["grad_accum"] = accum
    summary["losses"] = micro.reshape(-1, accum).mean(axis=1).tolist()
    return summary


def compare(runs: dict[str, dict], tolerance: float) -> dict:
    """Each mesh against the first (one device): largest relative loss difference over the steps, and
    throughput per device relative to it."""
    (base_mesh, base), *others = runs.items()
    out = {}
    for mesh, summary in others:
        n = mesh_devices(mesh)
        diff = max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], base["losses"], strict=True))
        out[mesh] = {
            "devices": n,
            "max_relative_loss_difference": diff,
            "losses_match": diff <= tolerance,
            "scaling_efficiency": summary["tokens_per_s"] / (n * base["tokens_per_s"]),
        }
    return {"baseline": base_mesh, "tolerance": tolerance, "meshes": out}


def read_baseline(path: str, args: argparse.Namespace) -> dict[str, dict]:
    """{mesh: run} of the first mesh in an earlier results file, after checking it ran the same steps."""
    with open(path) as f:
        earlier = json.load(f)
    for key, want in (("steps", args.steps), ("global_batch", args.batch), ("seq_len", args.seq_len)):
        if earlier[key] != want:
            raise SystemExit(f"--baseline {path}: {key} {earlier[key]}, this run has {want}")
    if earlier["shape"] != ("smoke" if args.smoke else "gpt-oss-20b"):
        raise SystemExit(f"--baseline {path}: shape {earlier['shape']}")
    mesh, summary = next(iter(earlier["runs"].items()))
    return {mesh: summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", required=True, help="folder for the checkpoints and runs")
    parser.add_argument("--meshes", default="1x1,4x1,2x2", help="the first is the baseline")
    parser.add_argument("--steps", type=int, default=16, help="updates")
    parser.add_argument(
        "--batch", type=int, default=4, help="global batch per update, the same on every mesh"
    )
    parser.add_argument(
        "--rows-per-device", type=int, default=2,
        help="most sequences per device per micro-step (4 x 2048 ran out of memory on one H200)",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=2e-2, help="relative loss difference (bf16)")
    parser.add_argument("--smoke", action="store_true", help="small model, simulated CPU devices")
    parser.add_argument(
        "--baseline",
        help="results JSON of an earlier run of this script with the same steps, batch and seq-len: its "
        "first mesh is the baseline, not rerun (the teacher, student and data are seeded, so rebuilt equal)",
    )
    parser.add_argument("--out", default="eval/results/multi_gpu_distill.json")
    args = parser.parse_args(argv)
    meshes = args.meshes.split(",")
    baseline = read_baseline(args.baseline, args) if args.baseline else {}
    smoke = dataclasses.replace(fullsize_checkpoint.SMOKE, num_hidden_layers=2, layer_types=())
    config = smoke if args.smoke else GPT_OSS_20B
    # The resumed half of a mesh compiles the same step as its first half: share XLA's compilation cache
    # (tokens/s leaves the warm-up steps out either way).
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(args.work, "xla-cache"), **os.environ}
    if args.smoke:
        devices = max(mesh_devices(m) for m in meshes)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    teacher, student = os.path.join(args.work, "teacher"), os.path.join(args.work, "student")
    ids = os.path.join(args.work, "ids.npy")
    os.makedirs(args.work, exist_ok=True)
    if not os.path.exists(os.path.join(teacher, "config.json")):
        fullsize_checkpoint.write_checkpoint(teacher, config)
    if not os.path.exists(student):
        small = ["--latent-dim", "32"] if args.smoke else []  # the smoke model's hidden size is 64
        run(["-m", "weights.to_mla", "--model", teacher, "--out", student, "--init", "svd", *small], env)
    if not os.path.exists(ids):
        tokens = (args.steps + 2) * args.batch * (args.seq_len + 1) * 20 // 19  # 5% is held out
        np.save(ids, np.random.default_rng(0).integers(0, config.vocab_size, tokens, dtype=np.int32))

    accums = {mesh: accumulation(mesh, args.batch, args.rows_per_device) for mesh in meshes}
    runs = dict(baseline)
    for mesh, accum in accums.items():
        # train.distill counts micro-steps: steps, warm-up and the checkpoint scale with the accumulation.
        folder = os.path.join(args.work, f"run_{mesh}")
        steps, half = args.steps * accum, args.steps // 2 * accum
        common = ["-m", "train.distill", "--teacher", teacher, "--student", student, "--mesh", mesh]
        common += ["--data", ids, "--steps", str(steps), "--batch", str(args.batch // accum)]
        common += ["--grad-accum", str(accum), "--warmup", str(2 * accum), "--ckpt-every", str(half)]
        common += ["--seq-len", str(args.seq_len), "--out", folder, "--no-progress"]
        if not finished(folder, steps):
            if not os.path.exists(os.path.join(folder, "ckpt")):
                run([*common, "--stop-after", str(half)], env)
            run([*common, "--resume"], env)
        runs[mesh] = read_run(folder, accum)
    result = {
        "command": " ".join(
            ["python -m eval.experiments.multi_gpu_distill", *(argv if argv is not None else sys.argv[1:])]
        ),
        "shape": "smoke" if args.smoke else "gpt-oss-20b",
        "steps": args.steps,
        "global_batch": args.batch,
        "rows_per_device": args.rows_per_device,
        "seq_len": args.seq_len,
        "baseline_from": args.baseline,
        "runs": runs,
        "comparison": compare(runs, args.tolerance),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, result)  # atomic: a temporary file renamed into place
    print(json.dumps(result["comparison"], indent=1))
    return 0 if all(m["losses_match"] for m in result["comparison"]["meshes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
