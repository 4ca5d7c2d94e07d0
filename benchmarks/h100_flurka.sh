#!/usr/bin/env bash
# One device call: FLuRKA against its constituents over stated (r, m) (preset flurka) beside SDPA flash and
# performer-pytorch (preset headline), non-causal, fwd and fwd+bwd. GPU tests and old/new A/Bs: h100_ab.sh.
#   run(command="bash benchmarks/h100_flurka.sh", carry=[".whl"])
# .whl: pip download --no-deps of performer-pytorch==1.1.4 local-attention==1.11.2 axial-positional-embedding==0.3.12
#   hyper-connections==0.4.11 torch-einops-utils==0.2.0 (pure-Python wheels; the GPU machine lacks them)
# Knobs: BENCH_S (time limit), FLURKA_SEQ. Plots: `approxattn bench report` afterwards, here.
set -u
source "$(dirname "$0")/device_setup.sh"
timeout "${BENCH_S:-230}" python -m approxattn.bench run --preset flurka headline --seq "${FLURKA_SEQ:-65536,16384}" \
  --match FLuRKA "FAVOR+ m=" Linformer "SDPA flash" performer-pytorch --exclude causal "PyTorch ref" \
  --time-budget $(( ${BENCH_S:-230} - 30 )) --no-plots --out "$OUT/flurka" > "$OUT/bench.log" 2>&1
echo "bench rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
