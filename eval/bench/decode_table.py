"""The decode table of the README from `eval.bench.decode`'s results: ms per token of `generate`'s device
loop per batch x context and model, the fastest in bold, beside each model's byte floor, and transformers'
step where a file holds it. The files must come from one card (their `device`); a model a point skipped (its
cache does not fit) or no file measured reads "-", a point no model ran is left out.

    python -m eval.bench.decode_table eval/results/decode_table_*_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys

MODELS = {"gqa": "GQA", "mla": "MLA default", "mla_partial": "MLA partial"}


def _context(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def table(results: dict[str, dict]) -> str:
    """Markdown of the loop's ms per token at every (batch, context) that `results` ({file name: the JSON
    that `eval.bench.decode --loop-steps` wrote, finished or cut short}) measured on the kernels for a model
    of MODELS, each point once; transformers' step set against GQA's loop of the same run. A ValueError
    names what does not make one table: files from different cards or naming none, a point measured twice
    (two files, or a run sweeping a setting), a point timed without the loop, no points."""
    devices = {name: result.get("device") for name, result in results.items()}
    if None in devices.values():
        raise ValueError(f"results that name no card (their `device`): {devices}")
    if len(set(devices.values())) != 1:
        raise ValueError(f"results from more than one card: {devices}")
    points: dict[tuple[int, int], dict[str, tuple[str, dict]]] = {}
    notes = []
    for name, result in results.items():
        peers, gqa = list(result.get("transformers_rows", [])), {}
        for row in result.get("rows", result.get("rows_so_far", [])):
            if "transformers_rows" in row:  # a cut-short run's first entry
                peers += row["transformers_rows"]
                continue
            if row.get("model") not in MODELS or not row.get("decode_kernels") or "batch" not in row:
                continue  # another benchmark's rows, a model not tabled, or the jnp path
            key, point = (
                (row["batch"], row["context"]),
                f"{row['model']} at {row['batch']} x {row['context']}",
            )
            if "loop_step_ms" not in row and "skipped" not in row:
                raise ValueError(f"{name}: {point} was not timed in the device loop (--loop-steps)")
            models = points.setdefault(key, {})
            if row["model"] in models:
                raise ValueError(
                    f"{point} twice, in {models[row['model']][0]} and {name}: one setting a point"
                )
            models[row["model"]] = (name, row)
            if row["model"] == "gqa" and "loop_step_ms" in row:
                gqa[key] = row["loop_step_ms"]
        for peer in (p for p in peers if "step_ms" in p):
            at = gqa.get((peer["batch"], peer["context"]))
            ratio = (
                f", {peer['step_ms'] / at:.1f}x GQA's loop in that run"
                if at
                else " (no GQA point in its run)"
            )
            notes.append(
                f"\n{peer['model']}, transformers {peer['transformers']}: {peer['step_ms']:.1f} ms a step at "
                f"{peer['batch']} x {_context(peer['context'])}{ratio}"
            )
    if not any("loop_step_ms" in row for models in points.values() for _, row in models.values()):
        raise ValueError(
            f"no decode points of {sorted(MODELS)} timed in the device loop in {sorted(results)}"
        )
    names = list(MODELS.values())
    lines = [
        f"| batch x context | {' | '.join(names)} | floor {' / '.join(names)} |",
        "|---" * (len(MODELS) + 2) + "|",
    ]
    for batch, context in sorted(points):
        models = {m: row for m, (_, row) in points[batch, context].items()}
        times = {m: f"{row['loop_step_ms']:.2f}" for m, row in models.items() if "loop_step_ms" in row}
        if not times:  # no model's cache fits there
            continue
        best = min(times.values(), key=float)  # as printed: equal-looking times are bold alike
        cells = ["-" if m not in times else f"**{best}**" if times[m] == best else times[m] for m in MODELS]
        floors = [f"{models[m]['floor_ms']:.2f}" if "floor_ms" in models.get(m, {}) else "-" for m in MODELS]
        lines.append(f"| {batch} x {_context(context)} | {' | '.join(cells)} | {' / '.join(floors)} |")
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="eval.bench.decode --loop-steps results (JSON)")
    args = parser.parse_args(argv)
    results = {}
    for name in args.files:
        try:
            with open(name) as f:
                results[name] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"{name}: {e}")
    try:
        print(table(results))
    except (ValueError, KeyError) as e:  # KeyError: a row without the fields a decode point has
        parser.error(f"{e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
