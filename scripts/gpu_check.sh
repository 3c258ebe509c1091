#!/usr/bin/env bash
# Every CUDA path of drm_lightning on a lent GPU, in one command and within ~10 minutes on one H100/H200:
#   1. the `gpu`-marked tests,
#   2. benchmarks/merge_speed.py at full Llama-3.1-8B layer shapes: the SVD and elementwise methods,
#   3. the same for the data-aware family (RegMean, WUDI's Adam loop, the coefficient learner per step),
#   4. benchmarks/merge_memory.py (working memory per method and shape),
#   5. benchmarks/vs_mergekit.py --cuda (side by side with mergekit, when its virtualenv can be made),
# each under its own time limit, every table and JSON into one folder ($OUT when set, else runs/gpu_check), with
# a summary.md listing each step's exit code and seconds.
#
#   usage: bash scripts/gpu_check.sh                      # on the GPU machine
#          bash scripts/gpu_check.sh --device cpu --quick # the dry run the test suite does: every step, tiny shapes
#
# DRM_GPU_CHECK_SETUP=0 skips scripts/setup.sh (a .venv already there); DRM_GPU_CHECK_MERGEKIT=0 skips step 5 (the
# suite runs benchmarks/vs_mergekit.py --quick in its own test). A failing step does not stop the others;
# the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done
out=${OUT:-runs/gpu_check}
mkdir -p "$out"

if [ "${DRM_GPU_CHECK_SETUP:-1}" != 0 ]; then
  bash scripts/setup.sh test,demo || exit 1
fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "${DRM_VENV:-.venv}/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "${DRM_VENV:-.venv}/bin/activate"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# merge_speed.py's rows in two steps, so that a slow first step cannot take the second's time; each rewrites its
# JSON after every method, so a step stopped at its limit keeps the rows it finished.
speed_methods=(--methods drm-v drm-h iso-c iso-cts tsv-m wudi-closed ties task-arithmetic)
data_methods=(--methods learn-layer learn-task regmean wudi --no-topk)
if [ "$quick" = 1 ]; then
  speed=(--scale 128 --tasks 3 --repeats 1 --threads 1)
  data=(--scale 128 --tasks 3 --repeats 1 --threads 1 --wudi-steps 2)
  memory=(--scale 64 --tasks 3 --threads 1 --in-process)
  vsmk=(--quick)
  limit_tests=120 limit_speed=120 limit_data=120 limit_memory=120 limit_vs=300
else
  speed=(--scale 1 --tasks 8 --repeats 2)
  data=(--scale 1 --tasks 8 --repeats 2 --wudi-steps 3)  # WUDI's float32 autograd baseline: ~100 TFLOP per step
  memory=(--scale 1 --tasks 8)
  vsmk=(--sizes llama-30m --experts 4 --runs 1 --methods task_arithmetic ties drm_v)  # fits limit_vs
  limit_tests=150 limit_speed=150 limit_data=90 limit_memory=60 limit_vs=150
fi

summary="$out/summary.md"
{
  echo "# gpu_check ($device$([ "$quick" = 1 ] && echo ', quick'))"
  echo
  echo "$(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
  echo
  echo "| step | exit | seconds | output |"
  echo "|---|---:|---:|---|"
} > "$summary"

failed=0
step() {  # step NAME LIMIT OUTPUT_FILE COMMAND...
  local name=$1 limit=$2 file=$3
  shift 3
  local start=$SECONDS
  echo "gpu_check: $name (limit ${limit}s) -> $out/$file" >&2
  timeout --kill-after=10 "$limit" "$@" > "$out/$file" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || failed=1
  echo "| $name | $rc | $((SECONDS - start)) | $file |" >> "$summary"
}

if [ "$device" = cuda ]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  step "gpu tests" "$limit_tests" gpu_tests.txt python -m pytest -q -p no:cacheprovider -m gpu -rs
else
  # No GPU: the gpu-marked tests are collected (they skip without CUDA), so a renamed marker or import breaks here.
  step "gpu tests (collected)" "$limit_tests" gpu_tests.txt \
    python -m pytest -q -p no:cacheprovider -m gpu --collect-only $(grep -rl "mark.gpu" tests --include '*.py')
fi
step "merge speed" "$limit_speed" merge_speed.md \
  python benchmarks/merge_speed.py --device "$device" "${speed[@]}" "${speed_methods[@]}" --json "$out/merge_speed.json"
step "merge speed (data-aware)" "$limit_data" merge_speed_data.md \
  python benchmarks/merge_speed.py --device "$device" "${data[@]}" "${data_methods[@]}" \
  --json "$out/merge_speed_data.json"
step "merge memory" "$limit_memory" merge_memory.md \
  python benchmarks/merge_memory.py --device "$device" "${memory[@]}" --json "$out/merge_memory.json"
if [ "${DRM_GPU_CHECK_MERGEKIT:-1}" != 0 ]; then
  cuda_flag=()
  [ "$device" = cuda ] && cuda_flag=(--cuda)
  step "vs mergekit" "$limit_vs" vs_mergekit.md \
    python benchmarks/vs_mergekit.py "${cuda_flag[@]}" "${vsmk[@]}" --json "$out/vs_mergekit.json"
fi
cat "$summary" >&2
exit "$failed"
