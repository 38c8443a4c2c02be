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
    that `eval.bench.decode --loop-steps` wrote, finished or cut short}) measured for a model of MODELS."""
    devices = {name: result.get("device") for name, result in results.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"results from more than one card: {devices}")
    points: dict[tuple[int, int], dict[str, dict]] = {}
    peers = []
    for result in results.values():
        rows = result.get("rows", result.get("rows_so_far", []))
        for row in rows:
            if "transformers_rows" in row:  # a cut-short run's first entry
                peers += row["transformers_rows"]
            elif row.get("model") in MODELS and row.get("decode_kernels", True):
                models = points.setdefault((row["batch"], row["context"]), {})
                if "loop_step_ms" in row or row["model"] not in models:
                    models[row["model"]] = row
        peers += result.get("transformers_rows", [])
    if not points:
        raise ValueError(f"no decode points of {sorted(MODELS)} in {sorted(results)}")
    names = [MODELS[m] for m in MODELS]
    lines = [
        f"| batch x context | {' | '.join(names)} | floor {' / '.join(names)} |",
        "|---" * (len(MODELS) + 2) + "|",
    ]
    for batch, context in sorted(points):
        models = points[batch, context]
        times = {m: row["loop_step_ms"] for m, row in models.items() if "loop_step_ms" in row}
        if not times:  # no model's cache fits there
            continue
        best = min(times.values())
        cells = [
            "-" if m not in times else (f"**{times[m]:.2f}**" if times[m] == best else f"{times[m]:.2f}")
            for m in MODELS
        ]
        floors = [f"{models[m]['floor_ms']:.2f}" if m in models else "-" for m in MODELS]
        lines.append(f"| {batch} x {_context(context)} | {' | '.join(cells)} | {' / '.join(floors)} |")
    for peer in peers:
        if "step_ms" in peer:
            gqa = points.get((peer["batch"], peer["context"]), {}).get("gqa", {}).get("loop_step_ms")
            ratio = f", {peer['step_ms'] / gqa:.1f}x GQA's loop" if gqa else ""
            lines.append(
                f"\n{peer['model']}, transformers {peer['transformers']}: {peer['step_ms']:.1f} ms a step at "
                f"{peer['batch']} x {_context(peer['context'])}{ratio}"
            )
    return "\n".join(lines)


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
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
