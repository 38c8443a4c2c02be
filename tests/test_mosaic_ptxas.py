"""eval.experiments.mosaic_ptxas: its reading of ptxas's report (a real one, verbatim: a three-warpgroup
variant of the kernel whose loop carries stayed live through its key makers' code) and of the SASS's loops,
the Mosaic GPU module it lowers for each launch, what it asks to install when the tools are missing, and,
with them, the model's launches (and the wide-batch MXFP4 kernel's) assembled without spills."""

import json
import subprocess
import sys

import pytest

from eval.experiments import mosaic_ptxas
from gptoss_mla_jax.flash_decode import Launch

SPILLED = """\
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'anonymous_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel', 684 bytes spill stores, 720 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    568 bytes stack frame, 684 bytes spill stores, 720 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 568 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 299.838 ms
"""  # noqa: E501
CLEAN = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 180 registers, used 16 barriers, 1 bytes smem
"""


def test_reads_registers_spills_and_serialized_wgmmas():
    """Spills from the function's properties line, counted once though the warning repeats them, and
    read as well where ptxas does not warn."""
    assert mosaic_ptxas.report(SPILLED) == {"registers": 168, "spilled_bytes": 1404, "wgmma_serialized": True}
    assert mosaic_ptxas.report(CLEAN) == {"registers": 180, "spilled_bytes": 0, "wgmma_serialized": False}
    unwarned = "\n".join(line for line in SPILLED.splitlines() if "warning" not in line)
    assert mosaic_ptxas.report(unwarned)["spilled_bytes"] == 1404


def test_lowers_one_module_a_launch():
    """A module per launch and layer kind, the same again for the same ones."""
    launch = Launch(2, 64, warps=8)
    first = mosaic_ptxas.module(launch, 2, 4096, sliding=False)
    assert first == mosaic_ptxas.module(launch, 2, 4096, sliding=False)
    assert first != mosaic_ptxas.module(launch, 2, 4096, sliding=True)
    assert first != mosaic_ptxas.module(launch._replace(warps=4), 2, 4096, sliding=False)


def test_names_what_to_install(tmp_path):
    with pytest.raises(SystemExit, match=r"install them: python -m eval.experiments.mosaic_ptxas --install"):
        mosaic_ptxas.paths(str(tmp_path))


def test_model_launches_neither_spill_nor_serialize_wgmmas(tmp_path):
    """The Mosaic GPU kernel as the model launches it (two warpgroups, the default where compiled), at
    batch 64 over a full layer's 32K slots and a sliding layer's 128 (one slice each), assembled for sm_90a
    on this machine (README's test command installs the tools): ptxas spills nothing and serializes no
    wgmma, which the interpreter cannot show and which once made a three-warpgroup variant 2.4x slower on an
    H100. (The one-warpgroup variant, `"mosaic"`, chosen only by name, sits at 255 registers and spills 36
    bytes on the sliding layer's two-block slice: docs/decode.md.)"""
    out = tmp_path / "ptxas.json"
    command = [sys.executable, "-m", "eval.experiments.mosaic_ptxas", "--warps", "8", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["warps"], row["sliding"], row["splits"]) for row in rows] == [(8, False, 1), (8, True, 1)]
    assert all(row["spilled_bytes"] == 0 and not row["wgmma_serialized"] for row in rows), rows


def test_wide_moe_kernel_neither_spills_nor_serializes_wgmmas(tmp_path):
    """The wide-batch MXFP4 kernel (`gmm_mosaic`) at its launches for gpt-oss-20b's two expert products,
    batches 128 and 256 (its 32- and 64-row tiles), assembled for sm_90a: no spills, no serialized wgmmas
    (its decoded weights are wgmma's register operand; registers a program hold how many programs an SM
    runs)."""
    out = tmp_path / "ptxas.json"
    command = [sys.executable, "-m", "eval.experiments.mosaic_ptxas", "--moe", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["product"], row["rows"]) for row in rows] == [
        ("gate_up", 32),
        ("down", 32),
        ("gate_up", 64),
        ("down", 64),
    ]
    assert all(row["spilled_bytes"] == 0 and not row["wgmma_serialized"] for row in rows), rows


def test_reads_each_loop_in_code_order_without_the_barrier_retries():
    """Loops in the order of the code (not longest first) with their wgmmas; a barrier wait's retry, which
    ptxas places after the exit and branches back into the body, makes no loop; loops of 8 instructions or
    fewer are left out."""
    line = "        /*{:04x}*/                   {} R{}, R1, R2 ;\n"
    first = "".join(line.format(0x100 + 16 * i, "FMUL", i) for i in range(8))
    second = "".join(line.format(0x400 + 16 * i, "FADD", i) for i in range(12))
    sass = f"""\
.L_x_0:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR52].tnspB, RZ, !UPT ;
{first}        /*0200*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0210*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3 ;
        /*0220*/               @P2 BRA `(.L_x_1) ;
.L_x_2:
{second}        /*0600*/               @P3 BRA `(.L_x_2) ;
        /*0610*/                   EXIT ;
        /*0620*/                   BRA `(.L_x_0) ;
"""
    assert mosaic_ptxas.loops(sass) == [
        {"instructions": 10, "hgmma": 1, "opcodes": {"FMUL": 8, "HGMMA": 1, "BRA": 1}},
        {"instructions": 13, "hgmma": 0, "opcodes": {"FADD": 12, "BRA": 1}},
    ]
