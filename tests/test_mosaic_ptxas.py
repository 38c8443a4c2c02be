"""eval.experiments.mosaic_ptxas on a machine without the CUDA plugin: its reading of ptxas's report (a
real one: the three-warpgroup kernel when its loop carries stayed live through the key makers' code), the
Mosaic GPU module it lowers for each launch (the register counts it is given included), and what it asks
to install when the plugin is missing."""

import pytest

from eval.experiments import mosaic_ptxas
from gptoss_mla_jax import flash_decode_mosaic
from gptoss_mla_jax.flash_decode import Launch

SPILLED = """\
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'anonymous_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel', 672 bytes spill stores, 708 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
ptxas info    : Used 168 registers, used 16 barriers, 560 bytes cumulative stack size, 1 bytes smem
"""  # noqa: E501
CLEAN = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
ptxas info    : Used 180 registers, used 16 barriers, 1 bytes smem
"""


def test_reads_registers_spills_and_serialized_wgmmas():
    assert mosaic_ptxas.report(SPILLED) == {"registers": 168, "spilled_bytes": 1380, "wgmma_serialized": True}
    assert mosaic_ptxas.report(CLEAN) == {"registers": 180, "spilled_bytes": 0, "wgmma_serialized": False}


def test_lowers_one_module_a_launch_with_the_register_counts_given(monkeypatch):
    """Each call lowers afresh, so that register counts set on `flash_decode_mosaic` reach the module (a
    module per launch and counts, the same again for the same ones)."""
    launch = Launch(2, 64, warps=12)
    first = mosaic_ptxas.module(launch, 2, 4096, sliding=False)
    assert first == mosaic_ptxas.module(launch, 2, 4096, sliding=False)
    assert first != mosaic_ptxas.module(launch, 2, 4096, sliding=True)
    monkeypatch.setattr(flash_decode_mosaic, "MAKER_REGISTERS", 152)
    monkeypatch.setattr(flash_decode_mosaic, "ATTENDER_REGISTERS", 200)
    assert first != mosaic_ptxas.module(launch, 2, 4096, sliding=False)


def test_names_what_to_install(tmp_path):
    with pytest.raises(SystemExit, match=r"pip install --target .cuda-tools .*jax-cuda12-pjrt=="):
        mosaic_ptxas.paths(str(tmp_path))
