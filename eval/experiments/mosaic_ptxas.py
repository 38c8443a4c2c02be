"""The Mosaic GPU decompressed-MLA decode kernel (`flash_decode_mosaic`) assembled for Hopper (sm_90a) on a
machine without a GPU: ptxas's report of each launch, its registers a thread, the bytes it spills and
whether it serializes the wgmmas for want of registers (what makes a kernel slow that no interpreter
shows).

    python -m eval.experiments.mosaic_ptxas --install    # the CUDA plugin, ptxas, nvdisasm into .cuda-tools
    python -m eval.experiments.mosaic_ptxas [--warps 4,8] [--sass] [--out F]
    python -m eval.experiments.mosaic_ptxas --moe [--sass]    # the wide-batch MXFP4 kernel's products

JAX lowers the kernel for CUDA on the CPU (as CI does), at gpt-oss-20b's decode shape and the launches the
model gives it at batch 64 (a full layer's cache of 32K slots, a sliding layer's ring of 128), and the
CUDA plugin's `MosaicGpuCompile` (the entry JAX's PyTorch bridge calls) runs Mosaic GPU's pipeline down
to PTX and ptxas, whose report `MOSAIC_GPU_DUMP_PTXAS` prints. Two things a GPU machine gives the plugin
are stood in for: the driver's answer to which device this is (a libcuda.so.1 built here by the C
compiler, answering compute capability 9.0 to the two questions the plugin asks) and LLVM's NVPTX target,
which the plugin's XLA compiler registers when it starts (its four `LLVMInitializeNVPTX*` functions,
called at their addresses in the plugin's symbol table, read by binutils' `nm`). Loading the assembled
kernel onto a device then fails, after the report. `--sass` adds the instruction mix of each loop of the
assembled kernel (`MOSAIC_GPU_DUMP_SASS`, disassembled by nvdisasm, installed with the others): per block
of slots, what each role's loop issues. CI runs it on the model's launches (tests/test_mosaic_ptxas.py):
no spills, no serialized wgmmas.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import itertools
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from eval.experiments.cuda_aot import _loops, _mix, registers, spilled_bytes
from eval.experiments.mosaic_profile import inputs, launch_of
from gptoss_mla_jax import flash_decode, flash_decode_mosaic

TOOLS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", ".cuda-tools"))  # git-ignored
# ptxas and libdevice, nvdisasm, and the CUDA plugin of this JAX (its Mosaic GPU compiler)
PACKAGES = (
    "nvidia-cuda-nvcc-cu12==12.9.86",
    "nvidia-cuda-nvdisasm==13.5.37",
    f"jax-cuda12-pjrt=={jax.__version__}",
)
INSTALL = "python -m eval.experiments.mosaic_ptxas --install"
WINDOW = 128  # gpt-oss-20b's sliding window: a sliding layer's ring of slots
MOE_BATCHES = (128, 256)  # the wide-batch kernel's 32-row tiles (batch 128's) and 64-row ones (256's)
NVPTX_INIT = ("TargetInfo", "Target", "TargetMC", "AsmPrinter")  # LLVMInitializeNVPTX*, in this order
# A stand-in driver: one device of compute capability 9.0 (attributes 75 / 76: major / minor), all the
# plugin asks before it compiles
DRIVER = r"""
int cuCtxGetDevice(int *device) { *device = 0; return 0; }
int cuDeviceGetAttribute(int *value, int attribute, int device) {
  *value = attribute == 75 ? 9 : 0;
  return 0;
}
"""


def serialized(ptxas_log: str) -> bool:
    """Whether ptxas serialized the wgmmas for want of registers (its C7512 performance note)."""
    return "wgmma.mma_async instructions are serialized" in ptxas_log


def report(log: str) -> dict:
    """Registers a thread, bytes spilled (stores plus loads) and serialized wgmmas from ptxas's report."""
    return {
        "registers": registers(log),
        "spilled_bytes": spilled_bytes(log),
        "wgmma_serialized": serialized(log),
    }


def loops(sass: str) -> list[dict]:
    """Each loop of the kernel's SASS in the order of the code: its instructions and wgmmas (HGMMA), and
    its ten commonest opcodes."""
    lines = sass.splitlines()
    bodies = sorted(_loops(sass), key=lambda body: lines.index(body[0]))
    mixes = [_mix(body) for body in bodies]
    return [
        {"instructions": m["instructions"], "hgmma": m["opcodes"].get("HGMMA", 0),
         "opcodes": dict(list(m["opcodes"].items())[:10])}
        for m in mixes if m["instructions"] > 8
    ]  # fmt: skip


def paths(tools: str, sass: bool = False) -> tuple[str, str, str | None]:
    """The CUDA plugin's library, ptxas's package (ptxas, libdevice) and, with `sass`, nvdisasm under
    `tools`, or what to install."""
    plugin = os.path.join(tools, "jax_plugins", "xla_cuda12", "xla_cuda_plugin.so")
    cuda = os.path.join(tools, "nvidia", "cuda_nvcc")
    disassembler = os.path.join(tools, "nvidia", "cu13", "bin", "nvdisasm") if sass else None
    wanted = [plugin, os.path.join(cuda, "bin", "ptxas")] + [disassembler] * sass
    missing = [p for p in wanted if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"mosaic_ptxas: no {', '.join(missing)}; install them: {INSTALL}")
    versions = [n for n in os.listdir(tools) if n.startswith("jax_cuda12_pjrt-")]
    if versions != [f"jax_cuda12_pjrt-{jax.__version__}.dist-info"]:
        raise SystemExit(
            f"mosaic_ptxas: {tools} holds {versions}, not this JAX's plugin {jax.__version__}: {INSTALL}"
        )
    return plugin, cuda, disassembler


def install(tools: str) -> None:
    """PACKAGES into `tools` (a folder of their own: the CUDA plugin must not be where JAX looks for
    plugins, or every JAX process here would try to start it), unless all are there. Anything else there
    goes first: pip's --target keeps a folder it finds (another JAX's plugin, a partial install)."""
    try:
        paths(tools, sass=True)
    except SystemExit:
        shutil.rmtree(tools, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tools, *PACKAGES]
        subprocess.run(command, check=True)
        paths(tools, sass=True)


def symbols(library: str) -> dict[str, int]:
    """Offsets of MosaicGpuCompile and the NVPTX target's initializers in the plugin's symbol table."""
    if shutil.which("nm") is None:
        raise SystemExit("mosaic_ptxas: needs binutils' nm to read the CUDA plugin's symbol table")
    wanted = {"MosaicGpuCompile", *(f"LLVMInitializeNVPTX{n}" for n in NVPTX_INIT)}
    found = {}
    for line in subprocess.run(
        ["nm", library], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in wanted:
            found[parts[2]] = int(parts[0], 16)
    if missing := wanted - found.keys():
        raise SystemExit(f"mosaic_ptxas: {library} has no {sorted(missing)} (another plugin build?)")
    return found


@functools.cache
def compiler(tools: str, sass: bool = False):
    """`MosaicGpuCompile` of the plugin, ready to assemble on this machine (the module docstring); with
    `sass` it prints the kernel's SASS too."""
    plugin, cuda, disassembler = paths(tools, sass)
    if shutil.which("cc") is None:
        raise SystemExit("mosaic_ptxas: needs a C compiler (cc) to build the stand-in driver")
    work = tempfile.mkdtemp(prefix="mosaic_ptxas_")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    source, driver = os.path.join(work, "driver.c"), os.path.join(work, "libcuda.so.1")
    with open(source, "w") as f:
        f.write(DRIVER)
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", driver, source], check=True)
    ctypes.CDLL(driver, mode=ctypes.RTLD_GLOBAL)  # the plugin's dlopen("libcuda.so.1") finds it loaded
    # a CUDA root as the plugin looks for one: ptxas, libdevice and nvdisasm, from their packages
    root = os.path.join(work, "cuda")
    os.makedirs(os.path.join(root, "bin"))
    links = {"bin/ptxas": os.path.join(cuda, "bin", "ptxas"), "nvvm": os.path.join(cuda, "nvvm")}
    for name, target in (links | ({"bin/nvdisasm": disassembler} if sass else {})).items():
        os.symlink(os.path.abspath(target), os.path.join(root, name))
    os.environ["MOSAIC_GPU_CUDA_ROOT"] = root
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    if sass:
        os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"
    library = ctypes.CDLL(os.path.abspath(plugin))
    offsets = symbols(plugin)
    base = ctypes.cast(library.MosaicGpuCompile, ctypes.c_void_p).value - offsets["MosaicGpuCompile"]
    for name in NVPTX_INIT:
        ctypes.CFUNCTYPE(None)(base + offsets[f"LLVMInitializeNVPTX{name}"])()
    compile_, unload = library.MosaicGpuCompile, library.MosaicGpuUnload
    compile_.argtypes, compile_.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    unload.argtypes = [ctypes.c_void_p]
    return compile_, unload, work


def module(launch: flash_decode.Launch, batch: int, context: int, sliding: bool) -> bytes:
    """The Mosaic GPU module JAX lowers for CUDA for the kernel at `launch` over a bf16 cache of `context`
    slots, a sliding layer's ring (window WINDOW) when `sliding`."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    args = jax.eval_shape(functools.partial(inputs, batch, context))  # the profiler's, as shapes
    window = dict(window=WINDOW, sliding=True) if sliding else {}
    flash_decode_mosaic.decompressed_splits.clear_cache()  # traced again, at this launch
    mosaic_core.KNOWN_KERNELS.clear()  # the lowering's record of its modules, by hash: this one alone
    traced = flash_decode_mosaic.decompressed_splits.trace(*args, launch=launch, **window)
    traced.lower(lowering_platforms=("cuda",))
    (kernel,) = mosaic_core.KNOWN_KERNELS
    return mosaic_core.KNOWN_KERNELS[kernel]


def moe_launch(product: str, batch: int, launch=None):
    """The wide-batch kernel's launch for one of gpt-oss-20b's expert products at `batch` (default: its
    launch table's; the row tile the batch's where the launch leaves it open, `gmm_mosaic.at_pairs`)."""
    from gptoss_mla_jax import gmm_mosaic
    from gptoss_mla_jax.config import GPT_OSS_20B

    pairs = batch * GPT_OSS_20B.num_experts_per_tok / GPT_OSS_20B.num_local_experts
    return gmm_mosaic.at_pairs(launch or gmm_mosaic.LAUNCH[product], pairs)


def moe_module(product: str, batch: int = 256, launch=None) -> bytes:
    """The Mosaic GPU module of the wide-batch MXFP4 kernel (`gmm_mosaic`) for one of gpt-oss-20b's expert
    products ("gate_up", with its SwiGLU, or "down") at `launch` (default: its launch table's; the row tile
    the batch's where the launch leaves it open), over batch's layout of the launch's row tiles
    (`routing.layout_rows`)."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    from gptoss_mla_jax import gmm_mosaic, routing
    from gptoss_mla_jax.config import GPT_OSS_20B
    from gptoss_mla_jax.moe import glu

    config, spec = GPT_OSS_20B, jax.ShapeDtypeStruct
    D, F, E, k = (
        config.hidden_size,
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
    )
    launch = moe_launch(product, batch, launch)
    M = routing.layout_rows(batch, k, E, launch.rows)
    K, N, transposed = (D, 2 * F, False) if product == "gate_up" else (F, D, True)
    packed = gmm_mosaic.Packed(
        spec((E, N // launch.cols, K // 64, launch.cols, 8), jnp.uint32), spec((E, K // 32, N), jnp.uint8)
    )
    mosaic_core.KNOWN_KERNELS.clear()
    gmm_mosaic.product_t.trace(
        spec((K, M) if transposed else (M, K), jnp.bfloat16), spec((M // launch.rows,), jnp.int32),
        packed, spec((E, N), jnp.float32), glu=glu(config) if product == "gate_up" else None,
        transposed=transposed, launch=launch,
    ).lower(lowering_platforms=("cuda",))  # fmt: skip
    (kernel,) = mosaic_core.KNOWN_KERNELS
    return mosaic_core.KNOWN_KERNELS[kernel]


def assemble(asm: bytes, tools: str, sass: bool = False) -> str:
    """What the plugin prints while it compiles a Mosaic GPU module, read off this process's stdout and
    stderr (through a file in the work folder, which stays there if the plugin aborts the process):
    ptxas's report and, with `sass`, the kernel's SASS."""
    compile_, unload, work = compiler(tools, sass)
    path = os.path.join(work, "plugin.log")
    with open(path, "w+b") as log:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            kernel = compile_(asm, len(asm))  # assembles, then fails to load onto a device there is not
            if kernel:
                unload(kernel)
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            list(map(os.close, saved))
        log.seek(0)
        text = log.read().decode(errors="replace")
    if "Used" not in text:
        raise RuntimeError(f"mosaic_ptxas: ptxas gave no report; the plugin said:\n{text[-4000:]}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warps", default="4,8", help="the launches' warps (1, 2 warpgroups)")
    parser.add_argument("--point", default="64,32768", help="batch,context whose launch is assembled")
    parser.add_argument("--tools", default=TOOLS, help="where the CUDA plugin and nvcc are installed")
    parser.add_argument("--install", action="store_true", help="install them there (pip), then stop")
    parser.add_argument("--sass", action="store_true", help="each loop's instruction mix too (nvdisasm)")
    parser.add_argument(
        "--moe", action="store_true",
        help="the wide-batch MXFP4 kernel's two products at batches 128 and 256 (32- and 64-row tiles) "
        "instead (gmm_mosaic)",
    )  # fmt: skip
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.install:
        install(args.tools)
        return 0
    batch, context = (int(n) for n in args.point.split(","))
    rows = []
    for moe_batch, product in itertools.product(MOE_BATCHES if args.moe else (), ("gate_up", "down")):
        log = assemble(moe_module(product, moe_batch), args.tools, args.sass)
        row = {"product": product, "batch": moe_batch, "rows": moe_launch(product, moe_batch).rows}
        rows.append(row | report(log) | ({"loops": loops(log)} if args.sass else {}))
        print({k: v for k, v in rows[-1].items() if k != "loops"}, flush=True)
    for warps in (int(w) for w in args.warps.split(",")) if not args.moe else ():
        for sliding, slots in ((False, context), (True, WINDOW)):
            launch = launch_of(batch, slots, warps)
            log = assemble(module(launch, batch, slots, sliding), args.tools, args.sass)
            row = {"warps": warps, "sliding": sliding, "splits": launch.splits, "block": launch.block}
            rows.append(row | report(log) | ({"loops": loops(log)} if args.sass else {}))
            print({k: v for k, v in rows[-1].items() if k != "loops"}, flush=True)
            for loop in rows[-1].get("loops", []):
                print("  loop:", loop["instructions"], "instructions,", loop["hgmma"], "wgmmas", flush=True)
    result = {
        "jax": jax.__version__, "target": "sm_90a", "batch": batch, "context": context, "rows": rows,
        "command": " ".join(["python -m eval.experiments.mosaic_ptxas", *(argv or sys.argv[1:])]),
    }  # fmt: skip
    if args.out:
        from support.results import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
