"""Convert a transformers checkpoint folder into an Orbax checkpoint.

python -m weights.convert --hf DIR --out CKPT [--dtype bf16|fp32] [--experts dense|mxfp4]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from weights.orbax_io import save_checkpoint
from weights.safetensors_io import CheckpointError, load_hf

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "keep": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf", required=True, help="transformers checkpoint folder")
    parser.add_argument("--out", required=True, help="Orbax checkpoint folder to create")
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast floating tensors")
    parser.add_argument(
        "--experts", choices=["dense", "mxfp4"], default="dense", help="hold experts dense or packed in MXFP4"
    )
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        config, params = load_hf(args.hf, DTYPES[args.dtype], args.experts)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_checkpoint(args.out, params, config, source=os.path.abspath(args.hf))
    print(f"wrote {args.out} ({config.num_hidden_layers} layers, experts {args.experts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
