#!/usr/bin/env bash
# Run 19 as one call (session 26: device starts failed for two sessions, so call1.sh and next_call_2.sh are merged
# and cut to fit 600 s), in order of need: the sea module old (.ab_old = 38e272a's source) against new at 64K, one
# process a side, new twice (the middle conv as the GEMM, then as the band kernel, the default); the band kernel's
# configs against the middle GEMM; the head's configs (paired first) and precision against the fp64 twin, its JSON rewritten per
# row; the module with the head's pick against its default (first: the head is the prediction to check); the
# encoder's and the row-window GEMMs' sweeps;
# SEA's and the row-window GEMMs' GPU tests with what time is left.
#   DEADLINE (s, default 585): when the steps stop; set it under a short budget.
#   run(command="bash benchmarks/results/h100/run19/call1b.sh", carry=[".whl", ".ab_old"], kind="nvidia-h100-x1")
set -u
START=$(date +%s)
source benchmarks/device_setup.sh
stamp() { echo "$1 rc=$2 $(date -u +%T)" >> "$OUT/session.log"; }
left() { local l=$(( ${DEADLINE:-585} - ($(date +%s) - START) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
for side in old new-gemm new; do
  src=src; [ $side = old ] && src=.ab_old/src
  middle=band; [ $side = new-gemm ] && middle=gemm
  APPROXATTN_SEA_MIDDLE=$middle PYTHONPATH=$src:/tmp/site timeout 35 python -m approxattn.bench run --preset sea --seq 65536 \
    --match "SDPA flash" "sea module" --exclude causal graphed --no-plots --no-memory --out /tmp/sea_$side \
    >> "$OUT/sea_ab.log" 2>&1
  stamp "sea $side" $?
  echo "== $side done" >> "$OUT/sea_ab.log"
done
timeout $(left 45) python benchmarks/row_gemm_tune.py --steps band --json "$OUT/row_gemm_tune.json" \
  > "$OUT/band_tune.log" 2>&1; stamp band_tune $?
timeout $(left 200) python benchmarks/sea_head_tune.py --out "$OUT" > "$OUT/head_tune.log" 2>&1; stamp head_tune $?
timeout $(left 60) python benchmarks/sea_tuned_ab.py --results "$OUT" > "$OUT/tuned_ab.log" 2>&1; stamp tuned_ab $?
timeout $(left 55) python benchmarks/sea_encoder_tune.py --out "$OUT" > "$OUT/encoder_tune.log" 2>&1
stamp encoder_tune $?
timeout $(left 55) python benchmarks/row_gemm_tune.py --steps first,middle --json "$OUT/row_gemm_tune_gemms.json" \
  > "$OUT/row_gemm_tune.log" 2>&1; stamp row_gemm_tune $?
timeout $(left 100) python -m pytest -m gpu -q -p no:cacheprovider -rfEx tests/test_sea_gpu.py tests/test_band_conv.py \
  tests/test_row_window_gemm.py > "$OUT/gpu_tests.log" 2>&1; stamp tests $?
