"""Full-size check of checkpoint loading: a random gpt-oss-20b in the exact published MXFP4 layout
(3 shards + index, 459 tensors, bf16 everywhere but the uint8 expert blocks/scales), loaded by our reader
and by transformers' `from_pretrained` on the same machine, each in a fresh process.

    python -m eval.experiments.fullsize_checkpoint --dir /tmp/gptoss20b-random [--out eval/results/...json]

Before each loader the page cache is dropped where permitted (`page_cache_dropped` in the results), so
both read the files from disk. Reports per loader: wall time, peak anonymous host memory (RssAnon, sampled
every 10 ms, so memory-mapped file pages do not count), peak device memory, and SHA-256 of a few
dequantized tensors, which must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from gptoss_mla_jax.config import GPT_OSS_20B
from weights.hf_layout import file_shapes, hf_tensors
from weights.safetensors_io import MXFP4_QUANTIZATION_CONFIG

# Tensors whose dequantized values both loaders must agree on (name, HF layout): first, middle, last layer.
CHECKED = [
    f"model.layers.{i}.{name}"
    for i in (0, 11, 23)
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight")
]


class PeakRssAnon:
    """Samples this process's RssAnon in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.01):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


SMOKE = dataclasses.replace(
    GPT_OSS_20B,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_local_experts=4,
    hf_extra=json.dumps({"architectures": ["GptOssForCausalLM"]}),
)


def write_checkpoint(folder: str, config=GPT_OSS_20B, seed: int = 0) -> dict:
    """Random weights, exact published layout; 3 shards of equal size (~4.6 GB at full size), so layers
    straddle shard boundaries."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = hf_tensors(config, "mxfp4")
    shapes = file_shapes(config, "mxfp4")
    # Published order: by layer, then by name (embed first, lm_head / norm last).
    total = sum(
        int(np.prod(shapes[t.name])) * (1 if t.name.endswith(("_blocks", "_scales")) else 2) for t in tensors
    )
    per_shard = total // 3 + 1
    os.makedirs(folder, exist_ok=True)
    shard, size, index, n_shard = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n_shard
        file = f"model-{n_shard:05d}-of-00002.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
        shard, size, n_shard = {}, 0, n_shard + 1

    for t in tensors:
        shape = shapes[t.name]
        if t.name.endswith("_blocks"):
            value = rng.integers(0, 256, shape, dtype=np.uint8)
        elif t.name.endswith("_scales"):
            value = rng.integers(118, 124, shape, dtype=np.uint8)  # values of order 2**-9 .. 2**-1
        elif "norm" in t.name:
            value = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype("bfloat16")
        elif "sinks" in t.name:
            value = rng.standard_normal(shape, dtype=np.float32).astype("bfloat16")
        else:
            value = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype("bfloat16")
        shard[t.name] = value
        size += value.nbytes
        if size >= per_shard and n_shard < 2:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    hf = config.to_hf()
    hf["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return {"tensors": len(tensors), "bytes": total, "shards": n_shard}


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()[:16]


def load_ours(folder: str, experts: str) -> dict:
    import jax
    import jax.numpy as jnp

    from weights.safetensors_io import load_hf

    t0 = time.perf_counter()
    with PeakRssAnon() as rss:
        _, params = load_hf(folder, jnp.bfloat16, experts=experts, progress=False)
        jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    hashes = {}
    if experts == "dense":
        for name in CHECKED:
            layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
            p = params["layers"][layer]
            if rest.startswith("mlp.experts."):
                value = p["mlp"]["experts"][rest.rsplit(".", 1)[1]]
            else:
                value = p["self_attn"]["q_proj"]["kernel"].T
            hashes[name] = _sha(np.asarray(value).view(np.uint16))
    return {
        "loader": f"ours (experts {experts})",
        "seconds": seconds,
        "peak_rss_anon_gb": rss.peak / 1e9,
        "device_peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
        "device_in_use_gb": stats.get("bytes_in_use", 0) / 1e9,
        "sha256": hashes,
    }


def load_transformers(folder: str) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    with PeakRssAnon() as rss:
        model = transformers.GptOssForCausalLM.from_pretrained(
            folder,
            dtype=torch.bfloat16,
            device_map="cuda" if cuda else None,
            quantization_config=transformers.Mxfp4Config(dequantize=True),
        )
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    state = model.state_dict()
    hashes = {name: _sha(state[name].cpu().view(torch.int16).numpy()) for name in CHECKED}
    return {
        "loader": f"transformers {transformers.__version__} from_pretrained (Mxfp4Config(dequantize=True))",
        "seconds": seconds,
        "peak_rss_anon_gb": rss.peak / 1e9,
        "device_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
        "device_in_use_gb": torch.cuda.memory_allocated() / 1e9 if cuda else 0.0,
        "sha256": hashes,
    }


def _drop_page_cache() -> bool:
    """Start each loader with the checkpoint out of the page cache, where the OS lets us (root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="where to write the random checkpoint")
    parser.add_argument("--out", default="eval/results/fullsize_checkpoint.json")
    parser.add_argument(
        "--phase", choices=["all", "write", "ours", "ours-mxfp4", "transformers"], default="all"
    )
    parser.add_argument("--smoke", action="store_true", help="write a small model instead (CPU smoke test)")
    args = parser.parse_args(argv)
    if args.phase == "write":
        print(json.dumps(write_checkpoint(args.dir, SMOKE if args.smoke else GPT_OSS_20B)))
    elif args.phase == "ours":
        print(json.dumps(load_ours(args.dir, "dense")))
    elif args.phase == "ours-mxfp4":
        print(json.dumps(load_ours(args.dir, "mxfp4")))
    elif args.phase == "transformers":
        print(json.dumps(load_transformers(args.dir)))
    else:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        results = {"command": " ".join(sys.argv), "rows": []}
        # Cold (page cache dropped) first, then both loaders again with the files already cached.
        phases = [("write", True), ("ours", True), ("ours-mxfp4", True), ("transformers", True)]
        phases += [("ours", False), ("transformers", False)]
        for phase, cold in phases:
            if phase != "write" and cold:
                results.setdefault("page_cache_dropped", []).append(_drop_page_cache())
            t0 = time.perf_counter()
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "eval.experiments.fullsize_checkpoint",
                    "--dir",
                    args.dir,
                    "--phase",
                    phase,
                ]
                + (["--smoke"] if args.smoke else []),
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(out.stdout, out.stderr, file=sys.stderr)
                results["rows"].append({"phase": phase, "error": out.stderr[-2000:]})
                if phase == "write":
                    break
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["phase_seconds"] = time.perf_counter() - t0
            row["page_cache"] = "cold" if cold else "warm"
            results["rows"].append({"phase": phase, **row})
            print(phase, json.dumps(row), flush=True)
        hashes = [r["sha256"] for r in results["rows"] if r.get("sha256")]
        results["dequantized_tensors_identical"] = len(hashes) == 4 and all(h == hashes[0] for h in hashes)
        try:
            import jax

            results["device"] = jax.devices()[0].device_kind
        except Exception as e:  # the report is still useful without it
            results["device"] = f"unknown ({e})"
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
