#!/usr/bin/env bash
# A/B of a kernel change in one device call: the same bench cases with the source before the
# change (an ignored copy of src/ in $AB_OLD, carried) and with the working tree's, side by side.
#   mkdir -p .ab_old && git archive HEAD src | tar -x -C .ab_old     (before editing; git-ignored)
#   run(command="AB_OLD=.ab_old/src bash benchmarks/h100_ab.sh", carry=[".whl", ".ab_old"])
# AB_NEW (default src) names the other side's source, for a variant that is not in the tree.
# Knobs: AB_SEQ, AB_S / AB_NEW_S (time limits of the two sides); AB_EXTRA="label:VAR=value ...;label2:..." times
# the new side again under each entry's environment (e.g. "fusedq:APPROXATTN_QUERY_BACKWARD=fused"), after it. The cases: the fused feature-map kernels with m = 256.
# AB_TESTS="tests/test_kernels.py ...": first the GPU tests of the new side. AB_TUNE="q_bwd dstate ...": then the
# launch-config sweep (benchmarks/tune.py) of those kernel kinds on the new side, whose best configs the new side
# is timed with (APPROXATTN_LAUNCH_OVERRIDES).
set -u
MATCH=("FAVOR+ m=256" "ReLU features m=256" "FLuRKA r=128 m=256")
[ -n "${AB_MATCH:-}" ] && IFS=';' read -r -a MATCH <<< "$AB_MATCH"  # e.g. AB_MATCH="FAVOR+ m=256;SDPA flash"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
run_side() {  # $1 = label, $2 = source folder, $3 = time limit, then extra labels to time
  local label=$1 source=$2 limit=$3
  shift 3
  PYTHONPATH="$source:/tmp/site" timeout "$limit" python -m approxattn.bench run --preset headline \
    --seq "${AB_SEQ:-65536}" --match "${MATCH[@]}" "$@" \
    --exclude "PyTorch ref" --no-plots --no-memory --out "/tmp/ab_$label" > "$OUT/ab_$label.log" 2>&1
  echo "ab $label rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
  cp "/tmp/ab_$label/results.json" "$OUT/ab_$label.json" 2>/dev/null
}
if [ -n "${AB_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  PYTHONPATH="${AB_NEW:-src}:/tmp/site" timeout "${AB_TESTS_S:-240}" python -m pytest -q -m "gpu and not gpu_heavy" \
    -n 8 -p no:cacheprovider -rfEx $AB_TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
  # the memory-heavy ones (~50 GB each) one at a time
  # shellcheck disable=SC2086
  PYTHONPATH="${AB_NEW:-src}:/tmp/site" timeout "${AB_TESTS_S:-240}" python -m pytest -q -m gpu_heavy \
    -p no:cacheprovider -rfEx $AB_TESTS >> "$OUT/gpu_tests.log" 2>&1
  echo "gpu heavy tests rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
fi
if [ -n "${AB_TUNE:-}" ]; then
  tune_seq=${AB_SEQ:-65536}
  # shellcheck disable=SC2086
  PYTHONPATH="${AB_NEW:-src}:/tmp/site" timeout "${AB_TUNE_S:-180}" python benchmarks/tune.py "${tune_seq%%,*}" \
    $AB_TUNE > "$OUT/tune.log" 2>&1
  echo "tune rc=$? $(date -u +%H:%M:%S)" >> "$OUT/session.log"
  APPROXATTN_LAUNCH_OVERRIDES=$(python benchmarks/tuned_overrides.py "$OUT/tune.log")
  export APPROXATTN_LAUNCH_OVERRIDES
  echo "new side overrides: ${APPROXATTN_LAUNCH_OVERRIDES:-none}" >> "$OUT/session.log"
fi
APPROXATTN_LAUNCH_OVERRIDES= run_side old "${AB_OLD:-.ab_old/src}" "${AB_S:-150}"
# the new side also times the peers the issue's targets name (AB_PEERS=0: not; AB_PEER_LIST: these), so their ratios come
# from this run; fla's first K=256 call spends ~150 s in its autotuner (measured), so it goes last
peers=("SDPA flash" "performer-pytorch" "fla chunk_linear_attn K=256")
[ "${AB_PEERS:-1}" = 0 ] && peers=()
[ -n "${AB_PEER_LIST:-}" ] && IFS=';' read -r -a peers <<< "$AB_PEER_LIST"  # e.g. "SDPA flash causal;fla chunk_linear_attn K=256"
run_side new "${AB_NEW:-src}" "${AB_NEW_S:-240}" "${peers[@]}"
if [ -n "${AB_EXTRA:-}" ]; then
  IFS=';' read -r -a extras <<< "$AB_EXTRA"
  for extra in "${extras[@]}"; do
    if [[ $extra != *:*=* ]]; then
      echo "AB_EXTRA: expected 'label:VAR=value ...' entries, got '$extra'" | tee -a "$OUT/session.log" >&2
      continue
    fi
    # shellcheck disable=SC2086
    (export ${extra#*:}; run_side "${extra%%:*}" "${AB_NEW:-src}" "${AB_NEW_S:-240}")
  done
fi
# at most 8 files come back: more travel as one archive
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/ab_out.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/ab_out.tgz "$OUT/ab_out.tgz"
fi
