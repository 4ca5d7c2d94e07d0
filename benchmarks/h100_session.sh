#!/usr/bin/env bash
# One device call (H100): all GPU tests, SEA's stage profile beside SDPA, the headline bench.
#   run(command="bash benchmarks/h100_session.sh", carry=[".whl"])   (.whl: the peers' wheels, see README)
# Knobs (environment): TESTS_S / STAGES_S / BENCH_S time limits (0 skips the part), SEA_SEQ,
# SEA_CHECK (N of the fused-vs-reference check), BENCH_SEQ, BENCH_MATCH (labels to keep), BENCH_BUDGET.
# Everything lands in $OUT in few files (the device tool brings back at most 8).
set -u
source "$(dirname "$0")/device_setup.sh"

if [ "${TESTS_S:-150}" != 0 ]; then
  # every GPU test: the light ones 8 at a time, then the memory-heavy ones alone (side by side with
  # the others they ran out of the card's 80 GB in run 7)
  timeout "${TESTS_S:-150}" python -m pytest -m "gpu and not gpu_heavy" tests -n 8 -q -p no:cacheprovider -rfEx \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" >> "$OUT/session.log"
  timeout "${TESTS_S:-150}" python -m pytest -m gpu_heavy tests -q -p no:cacheprovider -rfEx >> "$OUT/gpu_tests.log" 2>&1
  echo "gpu heavy tests rc=$?" >> "$OUT/session.log"
fi
if [ "${STAGES_S:-100}" != 0 ]; then
  timeout "${STAGES_S:-100}" python benchmarks/sea_stages.py --seq "${SEA_SEQ:-16384,65536}" --check "${SEA_CHECK:-0}" \
    --out "$OUT" > "$OUT/sea_stages.log" 2>&1
  echo "sea stages rc=$?" >> "$OUT/session.log"
fi
if [ "${BENCH_S:-140}" != 0 ]; then
  timeout "${BENCH_S:-140}" python -m approxattn.bench run --preset headline --seq "${BENCH_SEQ:-65536,4096,2048}" \
    ${BENCH_MATCH:+--match $BENCH_MATCH} --exclude "causal (PyTorch ref" "FlexAttention" --time-budget "${BENCH_BUDGET:-120}" \
    --no-plots --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" >> "$OUT/session.log"
fi
date -u +"%Y-%m-%d %H:%M UTC" >> "$OUT/session.log"
