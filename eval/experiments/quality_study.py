"""The quality study: how much KV cache can gpt-oss-style attention lose, and how much does distillation win
back?

    python -m eval.experiments.quality_study --teacher runs/study-teacher [--data stdlib+python-doc]
        [--train-steps 700] [--distill-steps 100] [--out eval/results/quality_study]

1. Teacher: a GPT-OSS-architecture model (train.pretrain's study recipe) trained here on real text when
   --teacher does not exist yet. It is exported with weights.export and transformers' GptOssForCausalLM
   scores the same held-out windows as eval.ppl: the cross-check with an implementation we did not write.
2. Matrix: layers {full, all} x mode {decompressed, partial} x latent sizes giving {50, 75, 87.5}% less
   cache on the converted layers x init {svd, pca}. Each student is converted as a user would (weights.to_mla
   with k-means calibration windows, short ones for sliding layers), scored (held-out PPL, KL to the
   teacher), healed with train.loop.run on a fixed token budget (the same for every row), scored again;
   each score also at --long-seq-len (default 2048: four times the training context).
3. OUT.json gets each row as it finishes, converted and scored, then healed and scored again, telling rows
   first. A rerun with the same teacher skips finished rows, so the study spreads over time-limited
   allocations (eval/experiments/quality_study_gpu.sh); rows of another teacher are refused (fingerprint).
   A teacher retrained elsewhere is bit-identical only under XLA_FLAGS=--xla_gpu_deterministic_ops=true.
   OUT.md is the table, OUT.png PPL vs cache reduction.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from gptoss_mla_jax.cache import accounting, values_per_token
from gptoss_mla_jax.config import MlaConfig
from gptoss_mla_jax.perplexity import TeacherLogProbs, perplexity, teacher_log_probs
from support.corpora import token_windows
from support.results import write_json
from train.loop import DistillOptions, run
from train.pretrain import CONFIGS
from train.student import assemble_student
from weights.calib import POOL_FACTOR, calibration_set
from weights.load import load_model
from weights.to_mla import convert, parse_layers

REDUCTIONS = (0.5, 0.75, 0.875)
ROPE_PAIRS = 2
LONG_CONTEXT = 32768  # whole-model cache reduction is reported at this context


def teacher_scores(teacher, config, windows: np.ndarray) -> TeacherLogProbs:
    """The teacher's log-probabilities on disjoint held-out windows, computed once for every student scored
    there (the study's vocabulary keeps them small), with float32 matmuls at full precision."""
    length = windows.shape[1]
    with jax.default_matmul_precision("highest"):
        return teacher_log_probs(teacher, config, windows.reshape(-1), length, length)


def score(student, student_config, windows: np.ndarray, teacher: TeacherLogProbs) -> dict:
    """PPL of teacher and student and mean KL(teacher || student) over the windows, with float32 matmuls at
    full precision (the GPU default would round them to TF32)."""
    length = windows.shape[1]
    with jax.default_matmul_precision("highest"):
        out = perplexity(
            student, student_config, windows.reshape(-1), length, length, teacher=teacher, progress=False
        )
    return {"ppl": out["ppl"], "kl": out["kl"], "teacher_ppl": out["teacher_ppl"]}


@dataclasses.dataclass(frozen=True)
class StudyMode:
    """A conversion of the matrix, by name: `decompressed`; `partialN`, N RoPE pairs kept per kv head
    (`partial`: ROPE_PAIRS); `roropeM` or `roropeMfF`, M mixed components kept per group of F frequency
    pairs (F = 1 without FreqFold)."""

    rope_mode: str
    size: int = 0  # RoPE pairs per kv head (partial) or kept components (rorope)
    fold: int = 1

    @classmethod
    def parse(cls, name: str) -> StudyMode:
        match = re.fullmatch(r"(decompressed|partial|rorope)(\d*)(?:f(\d+))?", name)
        if match is None or (match[1] == "rorope" and not match[2]) or (match[1] != "rorope" and match[3]):
            raise ValueError(f"--modes: {name!r} is not decompressed, partial[N] or roropeM[fF]")
        mode, size, fold = match[1], int(match[2] or 0), int(match[3] or 1)
        if mode == "decompressed" and size:
            raise ValueError(f"--modes: {name!r}: decompressed takes no size")
        return cls(mode, size or (ROPE_PAIRS if mode == "partial" else 0), fold)

    def rope_values(self, G: int, d: int) -> int:
        """Cached key values per token that keep RoPE (beside the latent), by `MlaConfig.rope_values` for
        one layer converted this way (the pairs' indices do not matter, only their count)."""
        partial, rorope = self.rope_mode == "partial", self.rope_mode == "rorope"
        mla = MlaConfig(
            self.rope_mode, (0,), (0,), ((tuple(range(self.size)),) * G,) if partial else (),
            (self.size,) if rorope else (), self.fold,
        )  # fmt: skip
        return mla.rope_values(0, d, G)


def latent_dim_for(reduction: float, mode: str, G: int, d: int) -> int:
    """Latent width that leaves (1 - reduction) of a GQA layer's 2Gd cached values per token."""
    budget = round((1 - reduction) * 2 * G * d)
    return budget - StudyMode.parse(mode).rope_values(G, d)


def study_modes(text: str) -> list[str]:
    """--modes: comma-separated names, each checked by StudyMode.parse."""
    names = text.split(",")
    for name in names:
        try:
            StudyMode.parse(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def fingerprint(params) -> str:
    """sha256 over every leaf's bytes, in tree order: the same teacher, bit for bit, or not."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


def transformers_ppl(hf_dir: str, windows: np.ndarray, batch_tokens: int = 4096) -> float:
    """Held-out PPL of an exported checkpoint by transformers' GptOssForCausalLM (float32, eager attention,
    which implements the sinks), on the same disjoint windows and scored positions as eval.ppl. Batches
    hold about `batch_tokens` tokens: eager attention's scores grow with the square of a window's length
    (64 heads x 4K x 4K in float32 is 4 GiB a window), and JAX keeps most of the GPU."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.GptOssForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).to(device)
    model.eval()
    nll, count = 0.0, 0
    batch = max(1, batch_tokens // (windows.shape[1] - 1))
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.as_tensor(windows[i : i + batch], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, :-1].double()
            targets = ids[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            )
            count += targets.numel()
    return float(np.exp(nll / count))


def cross_check(teacher, config, tokenizer_dir: str, windows: np.ndarray, ours: float) -> dict:
    from weights.safetensors_io import save_hf

    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf(teacher, config, hf_dir, tokenizer_from=tokenizer_dir, progress=False)
        theirs = transformers_ppl(hf_dir, windows)
    return {"eval_ppl": ours, "transformers_ppl": theirs, "relative_difference": abs(theirs - ours) / ours}


def heal(teacher, config, student, student_config, sequences: np.ndarray, args) -> dict:
    """The student after `args.distill_steps` steps of train.distill (KL, bf16 compute, MLA weights
    trained), float32 leaves."""
    with tempfile.TemporaryDirectory() as run_dir:
        _, trained = run(
            teacher,
            config,
            student,
            student_config,
            sequences,
            run_dir,
            DistillOptions(
                batch=args.distill_batch,
                steps=args.distill_steps,
                lr=args.distill_lr,
                warmup=max(args.distill_steps // 10, 1),
                ckpt_every=args.distill_steps,
                keep=1,
                seed=args.seed,
                dtype=jnp.bfloat16,
                progress=False,
            ),
        )
    return assemble_student(teacher, trained, student_config, jnp.float32)


def matrix(args, G: int, d: int) -> list[tuple[str, str, float, str]]:
    """Every (layers, mode, reduction, init) asked for, less the modes whose RoPE values alone fill the
    cache at that reduction (no latent left), said once each."""
    rows = []
    for m in itertools.product(args.layers, args.modes, args.reductions, args.inits):
        if latent_dim_for(m[2], m[1], G, d) >= 1:
            rows.append(m)
        elif m == (args.layers[0], m[1], m[2], args.inits[0]):
            print(f"skipped: {m[1]} keeps no latent at {m[2]:.2%} less cache", flush=True)
    return rows


def key(layers: str, mode: str, reduction: float, init: str) -> str:
    return f"{layers}/{mode}/{reduction}/{init}"


def healing(result: dict, seq_len: int) -> dict:
    """How a study healed its rows; studies before --distill-seq-len healed at the training context."""
    return {"seq_len": seq_len} | result["distill"]


def healing_flags(healed_by: dict, asked: dict) -> str:
    """The --distill-* flags that would heal as `healed_by` where `asked` differs ("--distill-lr 0.001")."""
    return " ".join(f"--distill-{k.replace('_', '-')} {v}" for k, v in healed_by.items() if asked[k] != v)


def settings_conflict(out: str, merge: list[str], long_len: int, seq_len: int, distill: dict) -> str | None:
    """Why this run's flags cannot add to the study at `out` (or take the --merge files' rows), from the
    results files alone: their long windows' length or their healing differ. None when they agree."""
    if os.path.exists(f"{out}.json"):
        with open(f"{out}.json") as f:
            result = json.load(f)
        long = result.get("long_context")  # studies before it scored only the training context
        if long and long["seq_len"] != long_len:
            return (
                f"{out}.json scored long windows of {long['seq_len']} tokens; pass --long-seq-len "
                f"{long['seq_len']} or another --out"
            )
        healed_by = healing(result, seq_len)
        if healed_by != distill:
            flags = healing_flags(healed_by, distill)
            return f"{out}.json healed its rows with {flags}; pass that or another --out"
    for other in merge:
        with open(other) as f:
            healed_by = healing(json.load(f), seq_len)
        if healed_by != distill:
            return f"--merge {other} healed its rows with {healing_flags(healed_by, distill)}"
    return None


def row_key(row: dict) -> str:
    return key(row["layers"], row["mode"], row["reduction"], row["init"])


def table(result: dict) -> str:
    rows = result["rows"]
    teacher = result["teacher_ppl"]
    long = result.get("long_context")  # studies before it scored only the training context
    long_len = long["seq_len"] if long else "-"
    healing_windows = result["distill"].get("seq_len")  # studies before it healed at the training context
    windows = f" in windows of {healing_windows} tokens" if healing_windows else ""
    lines = [
        f"Teacher PPL {teacher:.3f} on {result['held_out_tokens']} held-out tokens "
        f"({result['device']}); distillation budget {result['distill_tokens']:,} tokens per row"
        f"{windows}.",
        "",
        "| layers | mode | less cache (converted layers / whole model at 32K) | latent r | init "
        "| PPL converted | PPL distilled | vs teacher | KL converted | KL distilled "
        f"| vs teacher at {long_len} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["layers"],
            r["mode"],
            f"{r['layer_reduction']:.1%} / {r['model_reduction_32k']:.1%}",
            r["latent_dim"],
            r["init"],
            f"{r['converted']['ppl']:.3f}",
            f"{r['distilled']['ppl']:.3f}" if "distilled" in r else "not run",
            f"{r['distilled']['ppl'] / teacher - 1:+.2%}" if "distilled" in r else "",
            f"{r['converted']['kl']:.4f}",
            f"{r['distilled']['kl']:.4f}" if "distilled" in r else "",
            f"{r['distilled']['long']['ppl'] / long['teacher_ppl'] - 1:+.2%}"
            if long and "long" in r.get("distilled", {})
            else "",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_sets = [s for s in ("full", "all") if any(r["layers"] == s for r in result["rows"])]
    worse = lambda ppl: 100 * (ppl / result["teacher_ppl"] - 1)  # % above the teacher's PPL
    fig, axes = plt.subplots(1, len(layer_sets), figsize=(6 * len(layer_sets), 4.5), squeeze=False)
    for ax, layers in zip(axes[0], layer_sets, strict=True):
        lines = sorted({(r["mode"], r["init"]) for r in result["rows"]})  # one color each, in every panel
        for index, (mode, init) in enumerate(lines):
            color = f"C{index % 10}"
            rows = sorted(
                (r for r in result["rows"] if (r["layers"], r["mode"], r["init"]) == (layers, mode, init)),
                key=lambda r: r["layer_reduction"],
            )
            if not rows:
                continue
            x = [100 * r["layer_reduction"] for r in rows]
            ax.plot(
                x,
                [worse(r["converted"]["ppl"]) for r in rows],
                "--o",
                color=color,
                mfc="none",
                label=f"{mode}, {init}",
            )
            healed = [
                (100 * r["layer_reduction"], worse(r["distilled"]["ppl"])) for r in rows if "distilled" in r
            ]
            if healed:
                ax.plot(*zip(*healed, strict=True), "-o", color=color)
        ax.axhline(3, color="k", lw=0.8, ls=":", label="target: 3% above the teacher")
        ax.set_yscale("symlog", linthresh=0.1)
        lowest = min(
            worse(r[stage]["ppl"])
            for r in result["rows"]
            for stage in ("converted", "distilled")
            if stage in r
        )
        ax.set_ylim(bottom=min(0.0, 1.5 * lowest))  # a student better than its teacher stays on the plot
        ax.set_xlabel("% less KV cache on the converted layers")
        ax.set_ylabel(
            f"% PPL above the teacher's {result['teacher_ppl']:.2f}\n(dashed: converted, solid: distilled)"
        )
        ax.set_title(f"layers converted: {layers}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (trained here if missing)")
    parser.add_argument("--data", default="stdlib+python-doc")
    parser.add_argument("--teacher-config", choices=sorted(CONFIGS), default="study")
    parser.add_argument("--train-steps", type=int, default=700)
    parser.add_argument(
        "--train-batch", type=int,
        help="the teacher's sequences per step (train.pretrain's default); fewer, longer ones with --seq-len",
    )  # fmt: skip
    parser.add_argument("--tokenizer-chars", type=int, default=20_000_000)
    parser.add_argument(
        "--train-tokens", type=int, help="size of the teacher's training stream (train.pretrain's default)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument(
        "--long-seq-len", type=int, default=2048,
        help="also score every student on windows this long (as many tokens as the --eval-windows)",
    )  # fmt: skip
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--distill-batch", type=int, default=8)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument(
        "--distill-seq-len", type=int,
        help="healing windows' length (default --seq-len): longer windows heal the positions past the "
        "teacher's training context too",
    )  # fmt: skip
    parser.add_argument("--layers", type=lambda s: s.split(","), default=["full", "all"])
    parser.add_argument(
        "--modes", type=study_modes, default=["decompressed", "partial"],
        help="decompressed, partial[N] (N RoPE pairs per kv head, default 2), roropeM[fF] (M components kept "
        "per group of F frequency pairs)",
    )  # fmt: skip
    parser.add_argument("--reductions", type=lambda s: [float(x) for x in s.split(",")], default=REDUCTIONS)
    parser.add_argument("--inits", type=lambda s: s.split(","), default=["svd", "pca"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile-cache", help="persistent XLA cache folder: rows of the same shapes compile once"
    )
    parser.add_argument("--merge", nargs="*", default=[], help="fold in the rows of other runs' OUT.json")
    parser.add_argument("--time-limit", type=float, help="start no new row after this many seconds")
    parser.add_argument(
        "--out", default="eval/results/quality_study", help="writes OUT.json, OUT.md, OUT.png"
    )
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    distill_seq_len = args.distill_seq_len or args.seq_len
    distill_tokens = args.distill_steps * args.distill_batch * distill_seq_len
    distill = {"steps": args.distill_steps, "batch": args.distill_batch, "lr": args.distill_lr}
    distill["seq_len"] = distill_seq_len
    # Flags that disagree with the results already written are refused before any teacher work (training
    # one takes minutes of a time-limited allocation).
    conflict = settings_conflict(args.out, args.merge, args.long_seq_len, args.seq_len, distill)
    if conflict:
        print(f"error: {conflict}", file=sys.stderr)
        return 1

    if not os.path.exists(args.teacher):
        from train import pretrain

        recipe = {"--out": args.teacher, "--steps": args.train_steps, "--data": args.data}
        recipe |= {"--config": args.teacher_config, "--seq-len": args.seq_len, "--seed": args.seed}
        recipe["--tokenizer-chars"] = args.tokenizer_chars
        if args.train_tokens:
            recipe["--train-tokens"] = args.train_tokens
        if args.train_batch:
            recipe["--batch"] = args.train_batch
        pretrain.main([str(x) for item in recipe.items() for x in item])
        print(f"teacher trained in {time.perf_counter() - t_start:.0f} s", flush=True)
    config, teacher, tokenizer_dir = load_model(args.teacher, progress=False)
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    held_out = token_windows(
        tokenizer, args.data, args.eval_windows * (args.seq_len + 1), args.seq_len + 1, "test"
    )
    long_len, long_windows = args.long_seq_len, max(args.eval_windows * args.seq_len // args.long_seq_len, 1)
    held_out_long = token_windows(tokenizer, args.data, long_windows * (long_len + 1), long_len + 1, "test")

    @functools.cache
    def reference(long: bool) -> TeacherLogProbs:
        return teacher_scores(teacher, config, held_out_long if long else held_out)

    def scores(student, student_config) -> dict:
        """Held-out PPL and KL at the training context, and (under "long") at --long-seq-len."""
        out = score(student, student_config, held_out, reference(False))
        return out | {"long": score(student, student_config, held_out_long, reference(True))}

    # Calibration windows and distillation data are made when a row first needs them (a rerun with every
    # row finished needs neither).
    @functools.cache
    def calib() -> dict[str, np.ndarray]:
        path = f"{args.out}.calib.npz"  # kept beside the results: a rerun of the same teacher reads them
        if os.path.exists(path):
            with np.load(path) as saved:
                if (
                    str(saved["teacher_fingerprint"]) == teacher_id
                    and int(saved["tokens"]) == args.calib_tokens
                ):
                    return {
                        k.removeprefix("windows_"): saved[k] for k in saved.files if k.startswith("windows_")
                    }
            print(f"{path} holds another teacher's or size's windows: choosing them again", flush=True)
        t0 = time.perf_counter()
        pool = args.calib_tokens * POOL_FACTOR
        stream = token_windows(tokenizer, args.data, pool, 1, "validation").reshape(-1)
        windows = calibration_set(teacher, config, stream, args.calib_tokens, "kmeans", args.seq_len)
        print(f"calibration windows chosen in {time.perf_counter() - t0:.0f} s", flush=True)
        with open(f"{path}.tmp", "wb") as f:
            arrays = {f"windows_{k}": np.asarray(v) for k, v in windows.items()}
            np.savez(f, **arrays, teacher_fingerprint=teacher_id, tokens=args.calib_tokens)
        os.replace(f"{path}.tmp", path)
        return windows

    @functools.cache
    def sequences() -> np.ndarray:
        return token_windows(tokenizer, args.data, distill_tokens, distill_seq_len + 1, "train")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    teacher_id = fingerprint(teacher)
    result = None
    if os.path.exists(f"{args.out}.json"):
        with open(f"{args.out}.json") as f:
            result = json.load(f)
        if result["teacher_fingerprint"] != teacher_id:
            print(
                f"error: {args.out}.json holds rows of another teacher (fingerprint "
                f"{result['teacher_fingerprint'][:12]}, this one {teacher_id[:12]}); pass another --out",
                file=sys.stderr,
            )
            return 1
    if result is None:
        teacher_ppl = score(teacher, config, held_out, reference(False))["ppl"]
        result = {
            "command": " ".join(sys.argv),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "device": jax.devices()[0].device_kind,
            "teacher": os.path.abspath(args.teacher),
            "teacher_fingerprint": teacher_id,
            "config": config.to_hf(),
            "data": args.data,
            "held_out_tokens": int(held_out.shape[0] * (held_out.shape[1] - 1)),
            "calibration_tokens": args.calib_tokens,
            "distill": distill,
            "distill_tokens": distill_tokens,
            "teacher_ppl": teacher_ppl,
            "cross_check": cross_check(teacher, config, tokenizer_dir, held_out, teacher_ppl),
            "rows": [],
        }
        if os.path.exists(os.path.join(args.teacher, "train_log.json")):
            with open(os.path.join(args.teacher, "train_log.json")) as f:
                result["teacher_train_log"] = json.load(f)
        print(json.dumps(result["cross_check"]), flush=True)
    if "long_context" not in result:  # also a study begun before long windows were scored
        result["long_context"] = {
            "seq_len": long_len,
            "tokens": int(held_out_long.shape[0] * long_len),
            "teacher_ppl": score(teacher, config, held_out_long, reference(True))["ppl"],
        }
        write_json(f"{args.out}.json", result)

    for other in args.merge:
        with open(other) as f:
            extra = json.load(f)
        if extra["teacher_fingerprint"] != teacher_id:
            print(f"error: --merge {other} holds rows of another teacher", file=sys.stderr)
            return 1
        have = {row_key(r) for r in result["rows"]}
        result["rows"] += [r for r in extra["rows"] if row_key(r) not in have]
    rows = {row_key(r): r for r in result["rows"]}
    G, d = config.num_key_value_heads, config.head_dim
    todo = matrix(args, G, d)

    def student_for(layers, mode, reduction, init):
        latent = latent_dim_for(reduction, mode, G, d)
        layer_ids = parse_layers(layers, config)
        m = StudyMode.parse(mode)
        pairs, components = (m.size, 0) if m.rope_mode == "partial" else (0, m.size)
        return convert(
            teacher, config, latent, m.rope_mode, layer_ids, pairs, init, calib(), rope_components=components,
            rope_fold=m.fold,
        )[:2]  # fmt: skip

    def out_of_time() -> bool:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            print(f"time limit reached; rerun to finish the rows of {args.out}.json", flush=True)
            return True
        return False

    # Row by row, most telling first (high reductions, pca): each converted, scored, healed and scored
    # again before the next begins, so a time-limited run leaves whole rows done and the least important
    # ones for later (a conversion costs about as much as its healing on a GPU: compiles dominate both).
    for m in sorted(todo, key=lambda m: (-m[2], m[3] != "pca", m[1], m[0])):
        row = rows.get(key(*m))
        if (row is not None and "distilled" in row) or out_of_time():
            continue
        layers, mode, reduction, init = m
        calib()  # timed on its own
        t0 = time.perf_counter()
        student_config, student = student_for(*m)
        t_converted = time.perf_counter()
        if row is None:
            layer = student_config.mla.layers[0]
            rows[key(*m)] = row = {
                "layers": layers,
                "mode": mode,
                "reduction": reduction,
                "init": init,
                "latent_dim": latent_dim_for(reduction, mode, G, d),
                "rope_pairs": StudyMode.parse(mode).size if mode.startswith("partial") else 0,
                "rope_values": StudyMode.parse(mode).rope_values(G, d),
                "values_per_token": values_per_token(student_config, layer),
                "layer_reduction": 1 - values_per_token(student_config, layer) / (2 * G * d),
                "model_reduction_32k": accounting(student_config, 1, LONG_CONTEXT, jnp.bfloat16)["reduction"],
                "converted": scores(student, student_config),
                "convert_and_score_seconds": time.perf_counter() - t0,
                "convert_seconds": t_converted - t0,
            }
            result["rows"].append(row)
            write_json(f"{args.out}.json", result)
            print(json.dumps(row), flush=True)
            if out_of_time():
                continue
        sequences()  # made once, not timed with a row
        t0 = time.perf_counter()
        healed = heal(teacher, config, student, student_config, sequences(), args)
        t_healed = time.perf_counter()
        row["distilled"] = scores(healed, student_config)
        row["distill_and_score_seconds"] = time.perf_counter() - t0
        row["heal_seconds"] = t_healed - t0
        write_json(f"{args.out}.json", result)
        print(json.dumps(row), flush=True)
    if result["rows"]:
        order = {key(*m): i for i, m in enumerate(todo)}
        result["rows"].sort(key=lambda r: order.get(row_key(r), len(order)))
        write_json(f"{args.out}.json", result)
        with open(f"{args.out}.md", "w") as f:
            f.write(table(result))
        plot(result, f"{args.out}.png")
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
