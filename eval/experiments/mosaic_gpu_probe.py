"""Can this JAX check a Mosaic GPU attention kernel on the CPU? The question that holds the
kernels' Mosaic GPU port.

    python -m eval.experiments.mosaic_gpu_probe [--out FILE]

Every decode kernel here multiplies with a transposed shared-memory operand (K^T for the scores; MLA's
latent is both K^T and V). Mosaic GPU, the Pallas GPU backend that JAX does not deprecate, does that in
`wgmma` through `plgpu.transpose_ref`. This builds one 64 x 64 bf16 `wgmma` kernel, plain and with the
transposed operand, and for each reports whether it lowers for CUDA here (no GPU needed) and whether the
Mosaic GPU interpreter reproduces `a @ b` (or `a @ b.T`). On JAX 0.10.2 both lower, the plain one
interprets exactly and the transposed one fails in the interpreter: the port waits until a JAX on PyPI
passes all four.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from support.results import write_json

N = 64
TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # what wgmma wants of bf16 tiles


def interpreter():
    """The Mosaic GPU interpreter's parameters (private in JAX 0.10.2), or None where there is none."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams()


def matmul_kernel(transposed: bool, interpret):
    """a @ b (or a @ b.T) for 64 x 64 bf16 inputs, one warpgroup, float32 accumulator."""

    def body(a_gmem, b_gmem, out_gmem):
        def in_smem(a_smem, b_smem, barrier):
            plgpu.copy_gmem_to_smem(a_gmem, a_smem, barrier)
            plgpu.copy_gmem_to_smem(b_gmem, b_smem, barrier)
            plgpu.barrier_wait(barrier)

            def multiply(acc):  # its own scope: the interpreter refuses registers mixed with SMEM
                rhs = plgpu.transpose_ref(b_smem, (1, 0)) if transposed else b_smem
                plgpu.wgmma(acc, a_smem, rhs)
                plgpu.wgmma_wait(0)
                return acc[...]

            out_gmem[...] = pl.run_scoped(multiply, plgpu.ACC((N, N), jnp.float32))

        tile = plgpu.SMEM((N, N), jnp.bfloat16, transforms=TILES)
        pl.run_scoped(in_smem, tile, tile, plgpu.Barrier(num_arrivals=2))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((N, N), jnp.float32), interpret=interpret)


def cause(e: Exception) -> str:
    """The line of an exception that names the cause: for a failure inside an interpreter callback, the
    callback's own exception, which ends the traceback JAX wraps it in (before JAX's filtering note)."""
    lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("---", "For "))]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def probe(transposed: bool) -> dict:
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(key, (N, N), jnp.bfloat16) for key in keys)
    row = {"operand": "transposed" if transposed else "plain"}
    try:
        jax.jit(matmul_kernel(transposed, None)).trace(a, b).lower(lowering_platforms=("cuda",))
        row["lowers_for_cuda"] = True
    except Exception as e:  # the finding is the failure: name it
        row["lowers_for_cuda"], row["lowering_error"] = False, cause(e)
    params = interpreter()
    if params is None:
        row["interpreted"], row["interpreter_error"] = False, "no Mosaic GPU interpreter in this JAX"
        return row
    want = jnp.dot(a.astype(jnp.float32), (b.T if transposed else b).astype(jnp.float32))
    try:
        got = matmul_kernel(transposed, params)(a, b)
        row["interpreted"] = True
        row["max_abs_difference"] = float(jnp.abs(got - want).max())
    except Exception as e:
        row["interpreted"], row["interpreter_error"] = False, cause(e)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = {"jax": jax.__version__, "wgmma": [probe(False), probe(True)]}
    result["port_checkable_in_ci"] = all(
        row["lowers_for_cuda"] and row["interpreted"] and row["max_abs_difference"] < 1e-3
        for row in result["wgmma"]
    )
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
