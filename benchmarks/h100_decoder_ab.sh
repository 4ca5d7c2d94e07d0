#!/usr/bin/env bash
# One device call for SEA's row-window-GEMM decoder: its GPU tests (and the SEA / kernel tests it touches),
# the decoder alone at 64K (benchmarks/row_gemm_tune.py: the layers it replaced, each GEMM under a few launch
# configs), then the whole module old vs new alternating (bench preset sea: eager and CUDA-graph replay, SDPA
# beside them). Old = an ignored copy of the previous source:
#   rm -rf .ab_old && mkdir .ab_old && git archive <commit> src | tar -x -C .ab_old
#   run(command="bash benchmarks/h100_decoder_ab.sh", carry=[".ab_old"])
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi -L; date -u; } > "$OUT/session.log"
PYTHONPATH=src timeout "${TESTS_S:-200}" python -m pytest -q -m "gpu and not gpu_heavy" -n 4 -p no:cacheprovider -rfEx \
  tests/test_row_window_gemm.py tests/test_sea_gpu.py tests/test_graphs.py tests/test_kernels.py \
  -k "real_size_on_gpu or wide_values or training_step or fused_module or graph or replay" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
PYTHONPATH=src timeout "${TUNE_S:-150}" python benchmarks/row_gemm_tune.py --seq 65536 --json "$OUT/row_gemm_65k.json" \
  > "$OUT/row_gemm_65k.log" 2>&1
echo "tune rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
for i in $(seq "${ROUNDS:-2}"); do
  for side in old new; do
    src=src; [ "$side" = old ] && src=.ab_old/src
    PYTHONPATH=$src timeout "${BENCH_S:-100}" python -m approxattn.bench run --preset sea --seq "${SEQ:-65536,16384}" \
      --match "SDPA flash" "sea module" --no-plots --no-memory --out "/tmp/sea_$side$i" > "/tmp/sea_$side$i.log" 2>&1
    echo "bench $side$i rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
  done
done
for f in /tmp/sea_old*.log /tmp/sea_new*.log; do echo "== $(basename "$f")"; grep "^\[" "$f"; done > "$OUT/summary.log"
tar -czf "$OUT/bench.tar.gz" -C /tmp $(cd /tmp && ls -d sea_old* sea_new* 2>/dev/null)   # 6 files come back
