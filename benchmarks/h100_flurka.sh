#!/usr/bin/env bash
# One device call: (TESTS) GPU tests, (AB_OLD) an old-vs-new A/B of the fused paths AB_MATCH names, then FLuRKA
# against its constituents over stated (r, m) (preset flurka) beside SDPA flash and performer-pytorch (preset
# headline), non-causal, fwd and fwd+bwd.
#   mkdir -p .ab_old && git archive HEAD src | tar -x -C .ab_old      (before editing; git-ignored)
#   run(command="TESTS='tests/test_kernels.py -k elu' AB_OLD=.ab_old/src bash benchmarks/h100_flurka.sh",
#       carry=[".whl", ".ab_old"])   (.whl: performer-pytorch and its needs)
# .whl: pip download --no-deps of performer-pytorch==1.1.4 local-attention==1.11.2 axial-positional-embedding==0.3.12
#   hyper-connections==0.4.11 torch-einops-utils==0.2.0 (pure-Python wheels; the GPU machine lacks them)
# Knobs: TESTS_S, AB_SEQ, AB_ROUNDS, BENCH_S (time limits / sizes), FLURKA_SEQ. Plots: `approxattn bench report`
# afterwards, here. At most 7 files come back.
set -u
source "$(dirname "$0")/device_setup.sh"
if [ -n "${TESTS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_S:-90}" python -m pytest -q -m gpu -n 4 -p no:cacheprovider -rfEx $TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
fi
if [ -n "${AB_OLD:-}" ]; then
  IFS=';' read -r -a match <<< "${AB_MATCH:-elu+1 linear (fused);FLuRKA r=128 m=64 (fused)}"
  for round in $(seq "${AB_ROUNDS:-2}"); do
    for side in old new; do
      source_dir=src
      [ "$side" = old ] && source_dir=$AB_OLD
      echo "== round $round" >> "$OUT/ab_$side.log"
      PYTHONPATH="$source_dir:/tmp/site" timeout 60 python -m approxattn.bench run --preset headline \
        --seq "${AB_SEQ:-65536}" --match "${match[@]}" --exclude causal --no-plots --no-memory \
        --out "/tmp/ab_${side}_$round" >> "$OUT/ab_$side.log" 2>&1
      echo "ab $side round $round rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
    done
  done
fi
timeout "${BENCH_S:-230}" python -m approxattn.bench run --preset flurka headline --seq "${FLURKA_SEQ:-65536,16384}" \
  --match FLuRKA "FAVOR+ m=" Linformer "SDPA flash" performer-pytorch --exclude causal "PyTorch ref" \
  --time-budget $(( ${BENCH_S:-230} - 30 )) --no-plots --out "$OUT/flurka" > "$OUT/bench.log" 2>&1
echo "bench rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
