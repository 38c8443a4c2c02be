"""eval.experiments.cuda_aot's readers of compiled GPU code (kernels of optimized HLO, tensor-core
instructions of PTX, registers and the main loop of SASS) on small samples, and its error where JAX has no
CUDA compiler."""

import pytest

from eval.experiments import cuda_aot

HLO = """HloModule jit_step

%fused_reduce.3 (p: f32[8]) -> f32[] {
  ROOT %r = f32[] reduce(p)
}

ENTRY %main (a: f32[8]) -> f32[] {
  %a = f32[8]{0} parameter(0)
  %input_reduce_fusion.12 = f32[] fusion(%a), kind=kInput, calls=%fused_reduce.3, metadata={op_name="f/moe/r"}
  %p = f32[8] custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="f/attention/p"}
  %loop_add_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_add, metadata={op_name="f/add"}
  %copy.2 = f32[8]{0} copy(%loop_add_fusion)
  ROOT %t = (f32[], f32[8]) tuple(%input_reduce_fusion.12, %p)
}
"""


def test_sorts_are_counted_by_their_first_operand():
    hlo = """  %s.1 = (s32[16777216]{0}, u32[16777216]{0}) sort(%a, %b), dimensions={0}, to_apply=%c
  %s.2 = (s32[16777216]{0}, f32[16777216]{0}) sort(%d, %e), dimensions={0}, to_apply=%c
  ROOT %s.3 = f32[8192,8]{1,0} sort(%f), dimensions={1}, to_apply=%g"""
    assert cuda_aot.sorts(hlo) == {"s32[16777216]": 2, "f32[8192,8]": 1}


def test_census_counts_the_entry_kernels_by_stage_and_op():
    got = cuda_aot.census(HLO)
    assert got["kernels"] == 3 and got["triton_calls"] == 1 and got["copies"] == 1
    assert got["by_stage"] == {"moe": 1, "attention": 1, "other": 1}
    assert got["by_op"] == {"fused_reduce": 1, "__gpu$xla.gpu.triton": 1, "fused_add": 1}


def test_census_of_a_loop_body():
    """`while_body` finds the entry's while loop's body, which `census` then counts instead of the entry."""
    hlo = HLO.replace(
        "ENTRY %main",
        """%body.7 (t: (f32[8])) -> (f32[8]) {
  %f = f32[8]{0} fusion(%t), kind=kLoop, calls=%fused_add, metadata={op_name="f/moe/a"}
  %c = f32[8]{0} copy(%f)
  ROOT %r = (f32[8]) tuple(%c)
}

ENTRY %main""",
    ).replace("  ROOT %t = ", "  %w = (f32[8]) while(%x), condition=%cond.3, body=%body.7\n  ROOT %t = ")
    got = cuda_aot.census(hlo, cuda_aot.while_body(hlo))
    assert got["kernels"] == 1 and got["copies"] == 1 and got["by_stage"] == {"moe": 1}


def test_tensor_core_mix_counts_instructions_by_shape():
    ptx = """
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;
    wgmma.fence.sync.aligned;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f2}, %rd3, %rd4;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f3}, {%r1}, {%r2}, {%f4};
    """
    assert cuda_aot.tensor_core_mix(ptx) == {
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16": 2,
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32": 1,
    }


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LOP3.LUT R2, R3, 0x80008000, RZ, 0xc0, !PT ;
        /*0040*/                   HMUL2.BF16_V2 R2, R2, R5 ;
        /*0050*/              @!P1 PRMT R3, R2, 0x4140, RZ ;
        /*0060*/                   LOP3.LUT R2, R3, 0x1c001c0, RZ, 0xc0, !PT ;
        /*0070*/               @P2 BRA `(.L_x_1) ;
        /*0080*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA `(.L_x_0) ;
"""


def test_main_loop_mix_reads_the_longest_loop():
    """The longest backward branch's body (not the short loop before it, nor the forward branch after, nor
    a branch back placed after the exit, as ptxas places a barrier wait's retry), opcodes without
    modifiers, predicated ones included."""
    assert cuda_aot.main_loop_mix(SASS) == {
        "instructions": 5,
        "opcodes": {"LOP3": 2, "HMUL2": 1, "PRMT": 1, "BRA": 1},
    }
    assert cuda_aot.other_loops(SASS, least=2) == [{"instructions": 2, "opcodes": {"HMMA": 1, "BRA": 1}}]
    assert cuda_aot.other_loops(SASS) == []
    assert cuda_aot.registers("ptxas info    : Used 167 registers, used 1 barriers") == 167
    log = "Function properties for k\n 24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads"
    assert cuda_aot.spilled_bytes(log) == 20
    assert cuda_aot.spilled_bytes("    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == 0
    warned = "ptxas warning : Registers are spilled ..., 8 bytes spill stores, 12 bytes spill loads\n" + log
    assert cuda_aot.spilled_bytes(warned) == 20  # the warning repeats the properties line's counts


def test_without_the_cuda_plugin_it_says_what_to_install():
    import jax

    if _has_cuda_plugin():
        pytest.skip("this JAX has a CUDA compiler")
    backend = jax.default_backend
    with pytest.raises(SystemExit, match=r'pip install "jax\[cuda12\]=='):
        cuda_aot.main(["--ptx"])
    assert jax.default_backend is backend  # the model's view of the backend is left alone


def _has_cuda_plugin() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax_plugins") is not None
