#!/usr/bin/env bash
# Every accelerator measurement of the train step and the samplers, in sequence, within a time
# budget (default 540 s: one 10-minute command on a lent GPU machine).
#
#   bash bench/gpu.sh                  # all steps, in this order:
#   bash bench/gpu.sh STEP...          # train_bf16 train_f32 sampler profile digits accumulate
#                                      # max_batch
#
# Installs the wheels in .whl/ first, if any (bench/fetch_gpu_wheels.sh; the image lacks
# ml-collections, grain, tensorflow-datasets, tensorboardX and some of their dependencies).
# Each step runs under `timeout`: at most its own cap, and never past the budget
# (BENCH_BUDGET_S); a step with under 15 s left is skipped. Output, in $OUT if set, else
# ./bench_out:
#   results.jsonl            the JSON lines of every step, and a "gpu_sh" line per step with
#                            its exit status (124: timed out) and seconds
#   log.txt                  everything else the steps printed, under a header per step
#   profile.txt              the bf16 train step's time by kind of op (bench/profile_train.py)
#   profile.trace.json.gz    its raw trace (Perfetto UI or chrome://tracing)
#   digits.txt               the loss curves of the digits quick start in float32 and bfloat16
#
# A smoke run on a CPU, tiny networks and short runs (the defaults are the real measurement):
#   BENCH_NET="--ch 16 --ch_mult 1 --num_res_blocks 1 --image_size 8" BENCH_BATCH=2 \
#     SAMPLER_BATCH=2 SAMPLER_STEPS=10 DIGITS_STEPS=20 MAX_BATCH=8 \
#     bash bench/gpu.sh train_bf16 train_f32 sampler profile digits max_batch
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out="${OUT:-bench_out}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
deadline=$((SECONDS + ${BENCH_BUDGET_S:-540}))
read -ra net <<<"${BENCH_NET:-}"
batch="${BENCH_BATCH:-128}"
mkdir -p "$out"

log() { echo "$*" | tee -a "$out/log.txt"; }

# step NAME CAP_S COMMAND...: stdout to $work/NAME.out (its JSON lines also to results.jsonl),
# stderr to log.txt.
step() {
  local name=$1 cap=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
  shift 2
  if ((left < 15)); then
    log "=== $name: skipped, ${left}s of the budget left"
    echo "{\"bench\": \"gpu_sh\", \"step\": \"$name\", \"rc\": null, \"skipped\": true}" \
      >>"$out/results.jsonl"
    return
  fi
  ((cap > left)) && cap=$left
  log "=== $name (at most ${cap}s): $*"
  timeout -k 10 "$cap" "$@" >"$work/$name.out" 2>>"$out/log.txt"
  rc=$?
  grep '^{' "$work/$name.out" >>"$out/results.jsonl"
  grep -v '^{' "$work/$name.out" >>"$out/log.txt"
  echo "{\"bench\": \"gpu_sh\", \"step\": \"$name\", \"rc\": $rc, \"s\": $((SECONDS - start))}" \
    >>"$out/results.jsonl"
  log "=== $name: exit status $rc after $((SECONDS - start))s"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  python3 -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__,
    "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
} >>"$out/log.txt" 2>&1

steps=" $* "
run() { [[ $steps == "  " || $steps == *" $1 "* ]]; } # no arguments: every step

if run train_bf16; then
  step train_bf16 120 python3 bench/train.py --dtype bfloat16 --batch "$batch" --steps 20 \
    "${net[@]}"
fi
if run train_f32; then
  step train_f32 100 python3 bench/train.py --dtype float32 --batch "$batch" --steps 20 \
    "${net[@]}"
fi
if run sampler; then
  step sampler 200 python3 bench/sampler.py --dtype bfloat16 --batch "${SAMPLER_BATCH:-256}" \
    --steps "${SAMPLER_STEPS:-1000}" --respaced_steps 100 --guidance_steps 100 --repeats 1 \
    "${net[@]}"
fi
if run profile; then
  step profile 100 python3 bench/profile_train.py --dtype bfloat16 --batch "$batch" \
    --logdir "$work/profile" "${net[@]}"
  grep -v '^{' "$work/profile.out" >"$out/profile.txt"
  trace=$(find "$work/profile" -name '*trace.json.gz' | head -1)
  [[ -n $trace ]] && cp "$trace" "$out/profile.trace.json.gz"
fi
if run digits; then
  for dtype in float32 bfloat16; do
    step "digits_$dtype" 75 python3 -m diffusion_jax.train --config=configs/digits.py \
      --workdir="$work/digits_$dtype" --config.training.compute_dtype="$dtype" \
      ${DIGITS_STEPS:+--config.training.num_steps=$DIGITS_STEPS --config.training.log_every=5}
  done
  step digits_compare 30 python3 bench/compare_runs.py \
    float32="$work/digits_float32" bfloat16="$work/digits_bfloat16"
  cp "$work/digits_compare.out" "$out/digits.txt"
fi
if run accumulate; then
  step accumulate 60 python3 bench/accumulate.py
fi
if run max_batch; then
  # JAX takes 75% of the GPU's memory by default; the search may use nearly all of it.
  step max_batch 600 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 bench/train.py \
    --dtype bfloat16 --batch $((2 * batch)) --steps 3 --max_batch "${MAX_BATCH:-16384}" \
    "${net[@]}"
fi
log "=== done in ${SECONDS}s; output in $out"
cat "$out/profile.txt" "$out/digits.txt" 2>/dev/null
