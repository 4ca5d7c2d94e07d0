#!/usr/bin/env bash
# One device call: FLuRKA against its constituents over stated (r, m) (preset flurka), beside SDPA flash
# and performer-pytorch (preset headline), non-causal, N = 65,536 and 16,384, fwd and fwd+bwd.
#   run(command="bash benchmarks/h100_flurka.sh", carry=[".whl"])   (.whl: performer-pytorch and its needs)
# Knobs: BENCH_S (time limit of the bench), FLURKA_SEQ. Plots: `approxattn bench report` afterwards, here.
set -u
source "$(dirname "$0")/device_setup.sh"
timeout "${BENCH_S:-230}" python -m approxattn.bench run --preset flurka headline --seq "${FLURKA_SEQ:-65536,16384}" \
  --match FLuRKA "FAVOR+ m=" Linformer "SDPA flash" performer-pytorch --exclude causal "PyTorch ref" \
  --time-budget $(( ${BENCH_S:-230} - 30 )) --no-plots --out "$OUT/flurka" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/session.log"
date -u +"%Y-%m-%d %H:%M:%S UTC" >> "$OUT/session.log"
