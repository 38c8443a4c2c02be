#!/usr/bin/env bash
# Decode measurements on one GPU in a device call of under 10 minutes, as named stages run one after the
# other (no timing shares the card); each stage's JSON lands in OUT_DIR and every log in OUT_DIR/decode_gpu.log
# (one file: a device call brings back at most 8).
#   check      the grouped matmul's bf16 agreement with ragged_dot, MXFP4 (compiled decoding) included
#   moe        one layer's MoE at batches 1, 8, 64 and 256: kernels (each decode launch) vs jnp vs bytes; routing
#   moe_b1     the same at batch 1 only
#   moe_wide   the same at batches 128 and 256, the layout's row tile up to 64 rows (the default) against up to
#              16 (128: 32-row tiles against 16; 256: 64-row tiles against the sorted layout)
#   moe_wide_sweep  one layer's MoE at batches 128 and 256, the launch table's launch and the standard sweep
#   wide       one layer's MoE at 64, 128 and 256 on the launch table's launches and, where a batch takes it, on
#              the wide-batch MXFP4 kernel (gmm_mosaic; launch "wide"), in one process
#   wide_sweep the same at 128 and 256 on each of the wide-batch kernel's launches (decode_moe.WIDE_LAUNCHES)
#   wide_rows  the same on the launches with the layout's tiles of 64 rows (WIDE_LAUNCHES["rows"])
#   wide_range one layer's MoE at batches 8, 32, 64 and 512 on the grouped matmul and on the wide-batch
#              kernel (taken there for the run: --wide-min-pairs 1)
#   wide_past  the same at batches 768 and 1024, past the kernel's range (--wide-min-pairs 1)
#   wide_all   the same at batches 1, 8 and 16 and at prefill's 2048 and 4096 tokens (--wide-min-pairs 0.1):
#              what the experts holding only the wide-batch layout would cost there
#   wide_e2e   GQA's and MLA partial's loop at 256 x 4K on the wide-batch kernel and on the grouped matmul,
#              in one process
#   variants   the MXFP4 decoding's variants timed against each other on one layer's MoE (batches 1, 8, 64)
#   layouts    one layer's MoE at batches 1-256 on the launch table's own launches only, with lhs split on
#              chip and given as halves (gmm.SPLIT_ROWS 64, 16), in one process
#   profile    kernels per decode step and where the device time goes, batch 1 x 4K; profile_32k at 1 x 32K
#   graphs     the same profile of GQA with XLA's command buffers (CUDA graphs) for every kind of op
#   e2e        whole-model decode steps on the kernels, GQA and both MLA modes, batches 1 and 64 at 4K / 32K
#   final      e2e as CUDA graphs, per call and per token of a 16-step device loop, with transformers' model
#              (batch 1 x 4K) in the same run (a call of its own)
#   peer       final's transformers model and GQA at 1 x 4K only, in one run
#   kernels    each attention decode kernel against its jnp path
#   capacity   the largest batch that runs at 32K and 128K, on the kernels, the experts in the wide-batch
#              kernel's layout alone (as the command line holds them for a batch of 16 or more); each probe
#              of the search compiles a step: capacity_32k and capacity_128k, one context each, fit a call
#   absorbed   the absorbed MLA kernel (partial's) at batches 1, 8 and 64 x 32K and 128K, every launch
#   absorbed_launches  the same kernel's own device time (profiler) at 8 x 32K and 64 x 32K over launches
#              (slots a step, warps, stages) and the plan's slices, half and twice them
#   absorbed_kernel_stages  its own time with 2 and 3 pipeline stages at batches 1, 8, 64 x 32K and 128K
#   absorbed_stages  MLA partial's loop at 8 x 32K and 64 x 32K with the absorbed kernel pipelining 2 and 3
#              blocks (flash_decode.PIPELINE_STAGES), in one process
#   step_memory  one decode step of MLA partial at 32 x 32K: XLA's memory plan against the allocator's figures
#              (XLA's buffer assignment dumped), then the step with only its temporaries and a share of a
#              layer's latent left free; and, in another process, its first call (compiled there) with
#              half a layer's latent left free
#   step_memory_capacity  the same at 282 x 32K, where the capacity search failed: the first call through jit
#              with 1.5 of a layer's latent free, then the compiled step with 0.25; then the first call with 0.5
#   step_memory_edge  the same at 268 x 32K and 275 x 32K, the last batch the capacity search ran and the
#              first it failed at with the steps compiled before the cache (plan, buffers, runs, each in its
#              own process, XLA's buffer assignment dumped)
#   mla        the GQA and decompressed-MLA kernels at 32K, every launch (kv heads per program included)
#   mla_e2e    whole-model steps of GQA and decompressed MLA at 32K on the kernels, as CUDA graphs
#   loop       e2e per step and per token of a device-side loop of 16 steps (as generate runs), CUDA graphs
#   loop_b1    the loop at batch 1 for all four models (4K and 32K), CUDA graphs as generate sets them (about
#              12 minutes: more than one device call holds; the points it finished are in its JSON)
#   loop_b1_4k, loop_b1_32k   the same at one context, each within one device call
#   loop_64x32k  the loop at 64 x 32K for all four models
#   gqa_mla_64x32k  GQA's and the default MLA's loop at 64 x 32K in one process, JAX given 97% of the card
#              (GQA's 51.7 GB cache then fits an 80 GB H100 beside the model)
#   gqa_mla_b1 GQA's and the default MLA's loop at 1 x 4K and 1 x 32K in one process
#   loop_while loop_b1 with the while loop itself a command buffer too (WHILE, CONDITIONAL)
#   splits     each attention kernel at batch 1 (4K, 32K) over a grid of cache slices and head blocks, by
#              device busy time, beside each setting's per-slice state bytes; splits_b8 the same at 8 x 32K
#   splits_b64 the same at 64 x 32K
#   mla_fill   the MLA models' loop with their kernels' grids split until 132 programs (the SMs,
#              flash_decode.MLA_FILL_PROGRAMS) and until 264: decompressed and partial at 1 x 4K and 1 x 32K, then
#              both at 64 x 32K (JAX given 97% of the card), each in one process
#   share      the absorbed models' loop at 1 x 32K without and with the slices' state bounded (SHARE,
#              default 0.25), in one process
#   fused      the fused residual add + norm kernel against XLA's path (agreement, device time), the
#              router's product in it against the routing kernel's own, then GQA's loop at 1 x 4K and
#              64 x 4K with the residual adds fused with their norms (with the router's product, without)
#              and not fused
#   agreement  the kernels' bf16 agreement compiled: the fused residual add + norm (and the router's product in
#              it) against XLA's path, then the Mosaic GPU kernel's tests compiled (pytest, carried in .whl)
#   mosaic     the Mosaic GPU probe on this JAX, the Mosaic GPU kernel's tests compiled (pytest, carried in
#              .whl), then decompressed MLA's Triton and Mosaic GPU kernels (one and two warpgroups a
#              program) at 64 x 32K (agreement with the jnp path and time), within one device call
#   mosaic_small the two kernels likewise at batches 1 and 8 (32K)
#   mosaic_e2e the decompressed MLA model's loop at 1 x 32K and 64 x 32K on each kernel, in one process
#   mosaic2_e2e the decompressed MLA model's loop at batches 1, 8, 64 x 4K and 32K on Triton and on two warpgroups
#   mosaic_profile  the Triton and Mosaic GPU kernels timed at 8 x 32K and 64 x 32K in one process, the
#              Mosaic GPU kernel's cycles per block in each phase (its in-kernel profiler, 8 x 32K) and ptxas's
#              registers and spills for it, then its tests compiled
#   mosaic_64x32k  what one device call holds of the target: the Mosaic GPU kernel at 64 x 32K (both modes,
#              agreement with the jnp path and time), the decompressed MLA model's loop there on each
#              kernel (one process) and GQA's (another)
#   table_small  the README's decode table (`python -m eval.bench.decode_table`) at batches 1 and 8 x 4K, 32K
#              and 128K (CONTEXTS overrides; LIMIT the seconds it may take, 570): GQA, the default MLA and MLA partial, per token of the loop only,
#              transformers' step at 1 x 4K first
#   table_wide the same at batches 64 and 256, the experts in the wide-batch kernel's layout alone (as the
#              command line holds them for such a batch), JAX given 97% of the card
#   bash eval/experiments/decode_gpu.sh OUT_DIR [STAGES]        (default: check,moe,profile,e2e)
set -uo pipefail
OUT=${1:?usage: bash eval/experiments/decode_gpu.sh OUT_DIR [STAGES]}
STAGES=${2:-check,moe,profile,e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then  # wheels the GPU image lacks (jaxtyping), carried with the call
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
run() {  # run NAME LIMIT_S MODULE ARGS...: one process, its JSON in OUT/NAME.json, its log appended
  local name=$1 limit=$2 module=$3
  shift 3
  echo "==> $name: $module $*" >> "$OUT/decode_gpu.log"
  timeout "$limit" python -m "$module" "$@" --out "$OUT/$name.json" >> "$OUT/decode_gpu.log" 2>&1 \
    || echo "$name: exit $?" | tee -a "$OUT/decode_gpu.log"
}
mosaic_tests() {  # mosaic_tests LIMIT_S [PYTEST ARGS]: the Mosaic GPU kernel's tests, compiled (pytest in .whl)
  local limit=$1
  shift
  echo "==> mosaic_tests: the Mosaic GPU kernel's tests, compiled $*" >> "$OUT/decode_gpu.log"
  timeout "$limit" python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_flash_decode_mosaic.py "$@" \
    >> "$OUT/decode_gpu.log" 2>&1 || echo "mosaic_tests: exit $?" | tee -a "$OUT/decode_gpu.log"
}
for stage in ${STAGES//,/ }; do
  case "$stage" in
    check) run bench_moe_check 240 eval.bench.moe --check --tokens 2048 ;;
    moe) run decode_moe 330 eval.bench.decode --moe 1,8,64,256 --repeats 10 ;;
    moe_b1) run decode_moe_b1 150 eval.bench.decode --moe 1 --repeats 10 ;;
    moe_wide) run decode_moe_wide 400 eval.bench.decode --moe 128,256 --max-aligns 64,16 --repeats 10 ;;
    moe_wide_sweep) run decode_moe_wide_sweep 420 eval.bench.decode --moe 128,256 --repeats 10 ;;
    wide) run decode_moe_wide_kernel 300 eval.bench.decode --moe 64,128,256 --moe-launches none --repeats 10 ;;
    wide_sweep) run decode_moe_wide_sweep_kernel 420 eval.bench.decode --moe 128,256 --moe-launches none \
      --wide-launches sweep --repeats 10 ;;
    wide_range) run decode_moe_wide_range 400 eval.bench.decode --moe 8,32,64,512 --moe-launches none \
      --wide-min-pairs 1 --repeats 10 ;;
    wide_past) run decode_moe_wide_past 400 eval.bench.decode --moe 768,1024 --moe-launches none \
      --wide-min-pairs 1 --repeats 10 ;;
    wide_all) run decode_moe_wide_all 450 eval.bench.decode --moe 1,8,16,2048,4096 --moe-launches none \
      --wide-min-pairs 0.1 --repeats 10 ;;
    wide_e2e) run decode_e2e_wide 420 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
      --models gqa,mla_partial --batches 256 --contexts 4096 --loop-steps 16 --repeats 5 --wide-kernel on,off ;;
    wide_rows) run decode_moe_wide_rows_kernel 420 eval.bench.decode --moe 128,256 --moe-launches none \
      --wide-launches rows --repeats 10 ;;
    variants) run mxfp4_decode_variants 240 eval.experiments.mxfp4_decode_variants ;;
    layouts) run decode_moe_layouts 300 eval.bench.decode --moe 1,8,64,128,256 --split-rows 64,16 \
      --moe-launches none --repeats 10 ;;
    profile) run decode_profile 300 eval.bench.decode --profile 1,4096 --partial --repeats 5 ;;
    profile_32k) run decode_profile_32k 300 eval.bench.decode --profile 1,32768 --partial --repeats 5 ;;
    graphs) run decode_profile_graphs 150 eval.bench.decode --profile 1,4096 --models gqa --repeats 5 --cuda-graphs ;;
    e2e) run decode_e2e 330 eval.bench.decode --decode-kernels on --partial --batches 1,64 --contexts 4096,32768 ;;
    final) run decode_e2e 560 eval.bench.decode --with-transformers --cuda-graphs --decode-kernels on --partial \
      --batches 1,64 --contexts 4096,32768 --loop-steps 16 --repeats 5 ;;
    peer) run decode_e2e_peer 400 eval.bench.decode --with-transformers --cuda-graphs --decode-kernels on \
      --models gqa --batches 1 --contexts 4096 --loop-steps 16 --repeats 5 ;;
    kernels) run decode_kernels 400 eval.bench.decode --kernels --batches 1,8,64 --contexts 4096,32768,131072 ;;
    absorbed) run decode_kernels_absorbed 420 eval.bench.decode --kernels --models mla_partial \
      --batches 1,8,64 --contexts 32768,131072 ;;
    absorbed_launches) run decode_splits_absorbed_launches 330 eval.experiments.decode_splits --layers mla_partial \
      --batches 8,64 --contexts 32768 --launches 64x4x2,64x4x3,128x4x3,64x8x2 --factors 1,0.5,2 --model-heads ;;
    absorbed_kernel_stages) run decode_splits_absorbed_stages 150 eval.experiments.decode_splits --layers mla_partial \
      --batches 1,8,64 --contexts 131072,32768 --launches 64x4x2,64x4x3 --factors 1 --model-heads ;;
    absorbed_stages) run decode_e2e_absorbed_stages 330 eval.bench.decode --cuda-graphs --decode-kernels on \
      --partial --models mla_partial --batches 8,64 --contexts 32768 --loop-steps 16 --repeats 5 --absorbed-stages 2,3 ;;
    step_memory)
      XLA_FLAGS="--xla_dump_to=/tmp/step_dump --xla_dump_hlo_module_re=.*decode_step.*" run step_memory 200 \
        eval.experiments.step_memory --model mla_partial --batch 32 --context 32768 --dump /tmp/step_dump \
        --pressures 0.25,0.75,1.25,2.5
      run step_memory_first_call 150 eval.experiments.step_memory --model mla_partial --batch 32 --context 32768 \
        --first-under 0.5 ;;
    step_memory_capacity)  # at the batch the capacity search failed at on an H100 (282 x 32K, partial)
      run step_memory_capacity_first_1.5 240 eval.experiments.step_memory --model mla_partial --batch 282 \
        --context 32768 --first-under 1.5 --pressures 0.25
      run step_memory_capacity_first_0.5 200 eval.experiments.step_memory --model mla_partial --batch 282 \
        --context 32768 --first-under 0.5 ;;
    step_memory_edge)
      for batch in 268 275; do
        XLA_FLAGS="--xla_dump_to=/tmp/edge_$batch --xla_dump_hlo_module_re=.*decode_step.*" run \
          "step_memory_edge_$batch" 200 eval.experiments.step_memory --model mla_partial --batch "$batch" \
          --context 32768 --dump "/tmp/edge_$batch"
      done ;;
    mla) run decode_kernels_mla 330 eval.bench.decode --kernels --models gqa,mla --batches 1,8,64 --contexts 32768 ;;
    mla_e2e) run decode_e2e_mla 240 eval.bench.decode --cuda-graphs --decode-kernels on --models gqa,mla --batches 1,64 --contexts 32768 ;;
    loop) run decode_e2e_loop 330 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
      --models gqa,mla,mla_partial --batches 1,64 --contexts 4096,32768 --loop-steps 16 --repeats 5 ;;
    loop_b1) run decode_e2e_loop_b1 280 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
      --batches 1 --contexts 4096,32768 --loop-steps 16 --repeats 5 ;;
    loop_b1_4k|loop_b1_32k) run "decode_e2e_$stage" 480 eval.bench.decode --cuda-graphs --decode-kernels on \
      --partial --batches 1 --contexts "$([ "$stage" = loop_b1_4k ] && echo 4096 || echo 32768)" \
      --loop-steps 16 --repeats 5 ;;
    loop_64x32k) run decode_e2e_loop_64x32k 300 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
      --batches 64 --contexts 32768 --loop-steps 16 --repeats 5 ;;
    gqa_mla_64x32k) XLA_PYTHON_CLIENT_MEM_FRACTION=0.97 run decode_e2e_gqa_mla_64x32k 300 eval.bench.decode \
      --cuda-graphs --decode-kernels on --models gqa,mla --batches 64 --contexts 32768 --loop-steps 16 --repeats 5 ;;
    gqa_mla_b1) run decode_e2e_gqa_mla_b1 300 eval.bench.decode --cuda-graphs --decode-kernels on \
      --models gqa,mla --batches 1 --contexts 4096,32768 --loop-steps 16 --repeats 5 ;;
    loop_while) (
      XLA_FLAGS="$(python -c 'from gptoss_mla_jax.generation import CUDA_GRAPH_FLAGS as f; print(f)'),WHILE,CONDITIONAL"
      export XLA_FLAGS
      run decode_e2e_loop_while 280 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
        --batches 1 --contexts 4096,32768 --loop-steps 16 --repeats 5
    ) ;;
    splits) run decode_splits 330 eval.experiments.decode_splits --batches 1 --contexts 4096,32768 ;;
    splits_b8) run decode_splits_b8 200 eval.experiments.decode_splits --batches 8 --contexts 32768 ;;
    splits_b64) run decode_splits_b64 200 eval.experiments.decode_splits --batches 64 --contexts 32768 ;;
    mla_fill)
      run decode_e2e_mla_fill_b1 260 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
        --models mla,mla_partial --batches 1 --contexts 4096,32768 --loop-steps 16 --repeats 5 \
        --mla-fill-programs 132,264
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.97 run decode_e2e_mla_fill_64x32k 280 eval.bench.decode --cuda-graphs \
        --decode-kernels on --partial --models mla,mla_partial --batches 64 --contexts 32768 --loop-steps 16 --repeats 5 \
        --mla-fill-programs 132,264 ;;
    share) run decode_e2e_share 480 eval.bench.decode --cuda-graphs --decode-kernels on --partial \
      --models mla_partial,mla_rorope --batches 1 --contexts 32768 --loop-steps 16 --repeats 5 \
      --state-shares "none,${SHARE:-0.25}" ;;
    agreement)
      run add_norm_check 150 eval.experiments.add_norm_check
      mosaic_tests 240 ;;
    fused) run add_norm_check 150 eval.experiments.add_norm_check
      run decode_e2e_fused 420 eval.bench.decode --cuda-graphs --decode-kernels on --models gqa \
      --batches 1,64 --contexts 4096 --loop-steps 16 --repeats 5 --fused-norms router,norms,off ;;
    mosaic)
      run mosaic_gpu_probe 90 eval.experiments.mosaic_gpu_probe
      mosaic_tests 180
      run decode_kernels_mosaic 280 eval.bench.decode --kernels --models mla,mla_mosaic --batches 64 \
        --contexts 32768 ;;
    mosaic_small) run decode_kernels_mosaic_small 400 eval.bench.decode --kernels --models mla,mla_mosaic \
      --batches 1,8 --contexts 32768 ;;
    mosaic_e2e) run decode_e2e_mosaic 500 eval.bench.decode --cuda-graphs --decode-kernels on --models mla \
      --batches 1,64 --contexts 32768 --loop-steps 16 --repeats 5 --decompressed-kernels triton,mosaic,mosaic2 ;;
    mosaic2_e2e) run decode_e2e_mosaic2 540 eval.bench.decode --cuda-graphs --decode-kernels on --models mla \
      --batches 1,8,64 --contexts 4096,32768 --loop-steps 16 --repeats 5 --decompressed-kernels triton,mosaic2 ;;
    mosaic_profile) MOSAIC_GPU_DUMP_PTXAS=1 run mosaic_profile 330 eval.experiments.mosaic_profile  # + registers
      mosaic_tests 150 ;;
    mosaic_64x32k) run decode_kernels_mosaic_64x32k 150 eval.bench.decode --kernels --models mla_mosaic \
        --batches 64 --contexts 32768
      run decode_e2e_mosaic_64x32k 280 eval.bench.decode --cuda-graphs --decode-kernels on --models mla \
        --batches 64 --contexts 32768 --loop-steps 16 --repeats 5 --decompressed-kernels triton,mosaic,mosaic2
      run decode_e2e_gqa_64x32k 150 eval.bench.decode --cuda-graphs --decode-kernels on --models gqa \
        --batches 64 --contexts 32768 --loop-steps 16 --repeats 5 ;;
    table_small) run decode_table_b1_8 "${LIMIT:-570}" eval.bench.decode --with-transformers --cuda-graphs --decode-kernels on \
      --partial --models gqa,mla,mla_partial --batches 1,8 --contexts "${CONTEXTS:-4096,32768,131072}" \
      --loop-steps 16 --repeats 5 --loop-only ;;
    table_wide) XLA_PYTHON_CLIENT_MEM_FRACTION=0.97 run decode_table_b64_256 "${LIMIT:-570}" eval.bench.decode --cuda-graphs \
      --decode-kernels on --partial --models gqa,mla,mla_partial --batches 64,256 \
      --contexts "${CONTEXTS:-4096,32768,131072}" --loop-steps 16 --repeats 5 --loop-only --wide-kernel only ;;
    capacity) run decode_capacity 560 eval.bench.decode --capacity --decode-kernels on --partial --contexts 32768,131072 \
      --wide-kernel only ;;
    capacity_32k|capacity_128k) context=$([ "$stage" = capacity_32k ] && echo 32768 || echo 131072)
      run "decode_$stage" 560 eval.bench.decode --capacity --decode-kernels on --partial --contexts "$context" \
        --wide-kernel only ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
grep -h "exit\|kernel_ms\|step_ms\|kernels_per_step" "$OUT/decode_gpu.log" | cut -c1-400 | tail -n 40
