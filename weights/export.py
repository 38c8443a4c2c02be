"""Export an Orbax checkpoint (or re-export an HF folder) as a transformers checkpoint folder.

    python -m weights.export --ckpt CKPT --out HF_DIR [--experts bf16|mxfp4] [--dtype keep|bf16|fp32]
                             [--max-shard-size 5GB] [--overwrite]

`--experts bf16` writes dense experts (`gate_up_proj`, `down_proj`; bfloat16 when dequantized from MXFP4),
`--experts mxfp4` packed ones (`*_blocks`, `*_scales`); by default experts are written as the checkpoint
holds them. `--dtype` casts every floating point tensor (default: as held).

Writes config.json, safetensors shards with model.safetensors.index.json, and the tokenizer files of the
source; the folder appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from weights.load import load_model
from weights.safetensors_io import CheckpointError, save_hf

UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="Orbax checkpoint (or transformers folder)")
    parser.add_argument("--out", required=True, help="transformers folder to create")
    parser.add_argument("--experts", choices=["bf16", "mxfp4"], help="expert storage (default: as held)")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp32"], default="keep")
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: --out {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        config, params, tokenizer = load_model(
            args.ckpt, experts="mxfp4" if args.experts == "mxfp4" else "dense"
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    experts = {"bf16": "dense", "mxfp4": "mxfp4", None: None}[args.experts]
    dtype = {"keep": None, "bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    save_hf(params, config, args.out, experts, parse_size(args.max_shard_size), tokenizer, dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
