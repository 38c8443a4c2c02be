"""Can this JAX check a Mosaic GPU attention kernel on the CPU? The question that holds the
kernels' Mosaic GPU port.

    python -m eval.experiments.mosaic_gpu_probe [--out FILE]

Every decode kernel here multiplies with a transposed shared-memory operand (K^T for the scores; MLA's
latent is both K^T and V). Mosaic GPU, the Pallas GPU backend that JAX does not deprecate, does that in
`wgmma` through `plgpu.transpose_ref`. This builds one 64 x 64 bf16 `wgmma` kernel, plain and with the
transposed operand, and for each reports whether it lowers for CUDA here (no GPU needed) and whether the
Mosaic GPU interpreter reproduces `a @ b` (or `a @ b.T`). On JAX 0.10.2 both lower, the plain one
interprets exactly and the transposed one fails in the interpreter (`port_checkable_in_ci` false).

The way around it that `flash_decode_mosaic` takes: an intermediate the kernel computes and reads
transposed (its keys) is stored and handed to wgmma by a spelling of each mode's own
(`flash_decode_mosaic.spellings`: the lowering stores it plain and reads it through the transposed view,
the interpreter stores it transposed and reads it plain); the `keys` row reports the lowering of the one
and the interpreter's result of the other, and `checkable_with_spellings` whether both hold. On a GPU
every row also runs its kernel compiled (`compiled_max_abs_difference`): the numbers of the lowered
spellings, which the interpreter never runs.
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


def failed(e: Exception) -> str:
    """An interpreted kernel's failure, named (`cause`), after clearing the interpreter's state: a kernel
    that stopped midway leaves its barriers allocated, which the next interpreted kernel would trip on."""
    try:  # private in JAX 0.10.2, like the interpreter's parameters
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
    except ImportError:
        reset_gpu_interpret_mode_state = None
    if reset_gpu_interpret_mode_state is not None:
        reset_gpu_interpret_mode_state()
    return cause(e)


def product(lhs, rhs):
    """lhs @ rhs of two 64 x 64 SMEM tiles by one wgmma, in a float32 accumulator of its own scope (the
    interpreter refuses registers mixed with SMEM)."""

    def multiply(acc):
        plgpu.wgmma(acc, lhs, rhs)
        plgpu.wgmma_wait(0)
        return acc[...]

    return pl.run_scoped(multiply, plgpu.ACC((N, N), jnp.float32))


def matmul_kernel(transposed: bool, interpret):
    """a @ b (or a @ b.T) for 64 x 64 bf16 inputs, one warpgroup, float32 accumulator."""

    def body(a_gmem, b_gmem, out_gmem):
        def in_smem(a_smem, b_smem, barrier):
            plgpu.copy_gmem_to_smem(a_gmem, a_smem, barrier)
            plgpu.copy_gmem_to_smem(b_gmem, b_smem, barrier)
            plgpu.barrier_wait(barrier)
            out_gmem[...] = product(a_smem, plgpu.transpose_ref(b_smem, (1, 0)) if transposed else b_smem)

        tile = plgpu.SMEM((N, N), jnp.bfloat16, transforms=TILES)
        pl.run_scoped(in_smem, tile, tile, plgpu.Barrier(num_arrivals=2))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((N, N), jnp.float32), interpret=interpret)


def keys_kernel(interpret):
    """c @ (a @ b)^T for 64 x 64 bf16 inputs: a @ b by wgmma, rounded to bf16 and stored as
    `flash_decode_mosaic` stores its keys in this mode, then read back transposed as a wgmma's B operand
    by that mode's spelling."""
    from gptoss_mla_jax.flash_decode_mosaic import spellings

    spelling = spellings(interpret is not None)

    def body(a_gmem, b_gmem, c_gmem, out_gmem):
        def in_smem(a_smem, b_smem, c_smem, t_smem, barrier):
            for gmem, smem in ((a_gmem, a_smem), (b_gmem, b_smem), (c_gmem, c_smem)):
                plgpu.copy_gmem_to_smem(gmem, smem, barrier)
            plgpu.barrier_wait(barrier)
            spelling.store_keys(t_smem, product(a_smem, b_smem).astype(jnp.bfloat16))
            plgpu.commit_smem()
            out_gmem[...] = product(c_smem, spelling.key_operand(t_smem))

        tile = plgpu.SMEM((N, N), jnp.bfloat16, transforms=TILES)
        pl.run_scoped(in_smem, tile, tile, tile, tile, plgpu.Barrier(num_arrivals=3))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((N, N), jnp.float32), interpret=interpret)


def cause(e: Exception) -> str:
    """The line of an exception that names the cause: for a failure inside an interpreter callback, the
    callback's own exception, which ends the traceback JAX wraps it in (before JAX's filtering note)."""
    lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("---", "For "))]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def check(row: dict, make, args, want) -> dict:
    """`row` with what this JAX does with the kernel `make(interpret)` on `args`: whether it lowers for
    CUDA (no GPU needed), on a GPU the compiled kernel's largest difference from `want`, and whether the
    Mosaic GPU interpreter runs it, with its largest difference."""
    try:
        jax.jit(make(None)).trace(*args).lower(lowering_platforms=("cuda",))
        row["lowers_for_cuda"] = True
    except Exception as e:  # the finding is the failure: name it
        row["lowers_for_cuda"], row["lowering_error"] = False, cause(e)
    if row["lowers_for_cuda"] and jax.default_backend() == "gpu":  # the lowered spelling's own numbers
        try:
            row["compiled_max_abs_difference"] = float(jnp.abs(make(None)(*args) - want).max())
        except Exception as e:
            row["compiled_error"] = cause(e)
    params = interpreter()
    if params is None:
        row["interpreted"], row["interpreter_error"] = False, "no Mosaic GPU interpreter in this JAX"
        return row
    try:
        got = make(params)(*args)
        row["interpreted"] = True
        row["max_abs_difference"] = float(jnp.abs(got - want).max())
    except Exception as e:
        row["interpreted"], row["interpreter_error"] = False, failed(e)
    return row


def probe(transposed: bool) -> dict:
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(key, (N, N), jnp.bfloat16) for key in keys)
    want = jnp.dot(a.astype(jnp.float32), (b.T if transposed else b).astype(jnp.float32))
    row = {"operand": "transposed" if transposed else "plain"}
    return check(row, lambda interpret: matmul_kernel(transposed, interpret), (a, b), want)


def probe_keys() -> dict:
    keys = jax.random.split(jax.random.key(1), 3)
    a, b, c = (jax.random.normal(key, (N, N), jnp.bfloat16) * 0.3 for key in keys)
    f32 = jnp.float32
    stored = jnp.dot(a.astype(f32), b.astype(f32)).astype(jnp.bfloat16)
    want = jnp.dot(c.astype(f32), stored.astype(f32).T)
    return check({"operand": "keys"}, keys_kernel, (a, b, c), want)


def _holds(row: dict) -> bool:
    return row["lowers_for_cuda"] and row["interpreted"] and row["max_abs_difference"] < 1e-3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = {"jax": jax.__version__, "wgmma": [probe(False), probe(True)]}
    result["keys"] = probe_keys()
    result["port_checkable_in_ci"] = all(_holds(row) for row in result["wgmma"])
    result["checkable_with_spellings"] = _holds(result["wgmma"][0]) and _holds(result["keys"])
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
