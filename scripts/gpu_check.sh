#!/usr/bin/env bash
# Every CUDA path of drm_lightning on a lent GPU, in one command that ends within 8 minutes on one H100/H200:
#   setup                    the Python packages the GPU machine lacks, from carried wheels (no internet there)
#   gpu tests                the `gpu`-marked tests (per-test limit 60 s where pytest-timeout is installed)
#   merge speed              benchmarks/merge_speed.py, full Llama-3.1-8B layer shapes, T = 5, the library's rows
#                            (TA, TIES, Iso-C/CTS, DRM-V, WUDI-closed, TSV-M, DRM-H: cheapest first), their floors,
#                            kthvalue vs topk
#   merge speed (data-aware) the same for RegMean, WUDI's Adam loop (3 steps), the coefficient learner (both forms),
#                            with the float64 reference and the float32 baselines (cheap for these methods)
#   merge memory             benchmarks/merge_memory.py: working memory per method on q, down, gate and embed
#   vs mergekit              benchmarks/vs_mergekit.py --cuda, when mergekit is there (else: skipped, one line)
#   merge speed (baselines)  the authors' float32 SVD code for the rows of `merge speed`, cheapest first, in
#                            whatever time is left (at most 90 s): the slow ones (DRM-H ~1.5 min a layer) may not fit
# Each step runs under `timeout`; its output goes to its own file; merge_speed and merge_memory rewrite their JSON
# after every row, so a step stopped at its limit keeps the rows it finished, and the next step still runs; with
# --keep-going a method that raises (a CUDA-only bug, out of memory) is reported and the next method still runs. A step
# never gets more than what is left of DRM_GPU_CHECK_BUDGET_S (470 s; the dry run 1200 s), so the script ends in
# time even when a step overruns. summary.md has one line per step: ran / failed (exit N) / timed out / skipped
# (why), wall seconds and limit; then every step's output. Exit status 1 when a step failed, timed out or had no
# time left; a step skipped by design (no mergekit) is not a failure.
#
#   usage: bash scripts/gpu_check.sh                      # on the GPU machine; files into $OUT, else runs/gpu_check
#          bash scripts/gpu_check.sh --device cpu --quick # the dry run the test suite does: every step, tiny shapes
#
# Budget (estimates, nothing here has been measured on a GPU yet). Assumed: H100 FP64 ~60 TFLOP/s (tensor-core
# DGEMM), FP32 ~50 TFLOP/s (no TF32: PyTorch's default), float64 eigh ~0.3 s at side 4096 and ~5 s at side 14336
# (cuSOLVER syevd: the tridiagonal reduction is bandwidth-bound, ~n³/3 × 8 bytes read at ~3 TB/s, plus ~5 kernel
# launches per column), the authors' float32 SVD code 54 / 89 / 72 / 6 s per layer for DRM-V / DRM-H / Iso-CTS /
# Iso-C (the issue's H100 figures, at T = 5). One layer holds 218 M weights (q, o 4096×4096; k, v 1024×4096; gate,
# up 14336×4096; down 4096×14336): 4.4 GB of float32 deltas at T = 5.
#   step                     estimate  limit  why
#   setup                        15 s    60   pip install --no-index of 6 small wheels (1.9 MB), imports
#   gpu tests                    45 s    90   58 small CUDA tests, two tiny Lightning fits, one FSDP run
#   merge speed                 ~95 s   180   one call per method (1 s+ calls are their own warm-up): DRM-V ~8 s
#                                             (Grams 1.5e13 flop, 6 eigh 4096 + 1 eigh 14336), DRM-H ~12 s (2 eigh
#                                             14336), TSV-M ~8 s (35 eigh 4096), WUDI-closed ~9 s, Iso-C/CTS ~5 s;
#                                             floors ~28 s (rows, columns, sum, each); top-k ~5 s; start-up ~10 s
#   merge speed (data-aware)    ~35 s    60   Grams 6.7e13 flop fp32 (~2 s), RegMean solves 1.5e13 flop, WUDI
#                                             1.5e13 flop per step × 3 (naive autograd ~3×), learner 6.7e12 per step
#   merge memory                ~50 s    60   11 methods × 4 shapes, one call each (--no-warmup), embed 10.5 GB in
#   vs mergekit                 ~70 s    90   llama-30m, 4 experts, TA and TIES, 1 run: ~8 s of start-up per CLI
#   merge speed (baselines)     rest     90   TA, TIES, Iso-C, WUDI-closed, DRM-V (54 s), TSV-M, Iso-CTS, DRM-H
#   total                     ~420 s  ≤470   the budget stops it: if eigh is 4x slower than assumed, DRM-H's row
#                                             (last of merge speed) and the baselines are what is lost; the device
#                                             call needs ~1-2 min more to start the machine and copy files
#                                             (timeout_s 560 leaves room)
#
# What the GPU machine needs (this workplace's nvidia-h100-x1/nvidia-h200: Python 3.12 with torch, lightning,
# transformers, peft, safetensors, torchmetrics, pytest, pytest-timeout, psutil; no internet, so nothing can be
# pip-installed there). The rest travels as wheels in .gpu_wheels/ (git-ignored; 5 MB of the call's 64 MiB):
#   bash scripts/gpu_wheels.sh                  # here, with PyPI: .gpu_wheels/{project,mergekit}/*.whl for cp312
#   device run: command "bash scripts/gpu_check.sh", carry [".gpu_wheels"], timeout_s 560
# Run gpu_wheels.sh in the checkout the device call sends (the session's own, with this commit checked out): what
# travels is its tracked and untracked-not-ignored files (~4 MB; runs/ and .venv are ignored and stay here) plus the
# carried .gpu_wheels (~5 MB), far under the 64 MiB limit. Nothing else is needed there: no .venv, no .git.
# .gpu_wheels/project (jsonargparse, docstring-parser, typeshed-client, datasets, dill, multiprocess) is installed
# with pip --no-index --no-deps into a folder on PYTHONPATH; the repository itself is imported from its root (never
# pip-installed). .gpu_wheels/mergekit (mergekit 0.1.5, pydantic, immutables, ...) goes into a folder of its own
# behind a bin/mergekit-yaml wrapper (mergekit never shares the project's environment). With OUT set, the files end
# as summary.md and gpu_check.tar.gz (the device call returns at most 8 files; DRM_GPU_CHECK_PACK=0/1 overrides).
#
# Environment: DRM_GPU_CHECK_SETUP=auto (default: wheels when .gpu_wheels/project has some, else the current
# python as it is when it imports torch: the benchmarks and gpu tests need no more, the mergekit step's CLI does;
# else scripts/setup.sh, which needs PyPI) | wheels | venv | 0 (the current python as it is). DRM_GPU_CHECK_WHEELS (.gpu_wheels), DRM_GPU_CHECK_BUDGET_S,
# DRM_GPU_CHECK_MERGEKIT=0 skips the mergekit step, MERGEKIT_VENV (a folder with bin/mergekit-yaml, used first).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

device=cuda
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:-}; shift 2 || shift ;;
    --quick) quick=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done
if [ "$device" != cuda ] && [ "$device" != cpu ]; then
  echo "gpu_check.sh: --device must be cuda or cpu, got '$device'" >&2
  exit 2
fi
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
pack=${DRM_GPU_CHECK_PACK:-$([ -n "${OUT:-}" ] && echo 1 || echo 0)}
wheels=${DRM_GPU_CHECK_WHEELS:-.gpu_wheels}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
py=${DRM_PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

if [ "$quick" = 1 ]; then
  budget=${DRM_GPU_CHECK_BUDGET_S:-1200}
  shape=(--scale 128 --tasks 3 --threads 1)
  memory=(--scale 64 --tasks 3 --threads 1 --in-process --no-warmup --keep-going)
  vsmk=(--quick)
  limit_setup=120 limit_tests=120 limit_speed=120 limit_data=120 limit_memory=120 limit_vs=300 limit_base=120
else
  budget=${DRM_GPU_CHECK_BUDGET_S:-470}
  shape=(--scale 1 --tasks 5)
  memory=(--scale 1 --tasks 5 --no-warmup --keep-going)
  vsmk=(--sizes llama-30m --experts 4 --runs 1 --methods task_arithmetic ties)
  limit_setup=60 limit_tests=90 limit_speed=180 limit_data=60 limit_memory=60 limit_vs=90 limit_base=90
fi
timing=(--repeats 1 --slow-call-s 1 --keep-going)
svd_methods=(task-arithmetic ties iso-c iso-cts drm-v wudi-closed tsv-m drm-h)  # cheapest first
base_methods=(task-arithmetic ties iso-c wudi-closed drm-v tsv-m iso-cts drm-h)  # cheapest first
data_methods=(regmean wudi learn-layer learn-task)
deadline=$((SECONDS + budget))

summary="$out/summary.md"
{
  echo "# gpu_check ($device$([ "$quick" = 1 ] && echo ', quick'))"
  echo
  commit=$(git rev-parse --short HEAD 2>/dev/null || cat "$wheels/commit" 2>/dev/null || echo '?')
  echo "$(date -u +%FT%TZ), commit $commit, budget ${budget} s; the environment and each step's output below"
  echo
  echo "| step | status | seconds | limit s | output |"
  echo "|---|---|---:|---:|---|"
} > "$summary"
files=()
failed=0
step_rc=0

row() {  # row NAME STATUS SECONDS LIMIT FILE
  echo "| $1 | $2 | $3 | $4 | $5 |" >> "$summary"  # as each step ends: a script stopped early keeps its rows
}

step() {  # step NAME LIMIT OUTPUT_FILE COMMAND...: runs COMMAND under min(LIMIT, time left), output into the file
  local name=$1 limit=$2 file=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    row "$name" "skipped (no time left)" 0 - -
    failed=1
    return
  fi
  local start=$SECONDS
  echo "gpu_check: $name (limit ${limit}s) -> $out/$file" >&2
  timeout --kill-after=5 "$limit" "$@" > "$out/$file" 2>&1
  local rc=$? status=ran
  step_rc=$rc
  case "$rc" in
    0) ;;
    124|137) status="timed out"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  files+=("$file")
  row "$name" "$status" $((SECONDS - start)) "$limit" "$file"
}

skip() {  # skip NAME WHY: a step left out by design (not a failure)
  row "$1" "skipped ($2)" 0 - -
}

# -- setup: the packages the GPU machine lacks, without the internet
mode=${DRM_GPU_CHECK_SETUP:-auto}
deps_ok() { "$py" -c "import torch, lightning, transformers, jsonargparse, datasets, safetensors, peft" 2>/dev/null; }
why="DRM_GPU_CHECK_SETUP=0"
if [ "$mode" = auto ]; then
  if compgen -G "$wheels/project/*.whl" > /dev/null; then mode=wheels
  elif deps_ok; then mode=0 why="its packages are there"
  elif "$py" -c "import torch" 2>/dev/null; then
    # torch but not all the rest, and no wheels: most likely a GPU machine without internet whose call carried no
    # .gpu_wheels. The benchmarks and the gpu tests need torch alone; what needs the CLI fails in its own step.
    mode=0 why="no wheels in $wheels; the packages it lacks are MISSING in environment.txt"
  else mode=venv
  fi
fi
case "$mode" in
  0|none) skip setup "$why: $(command -v "$py")" ;;
  wheels)
    site="$scratch/site"
    step "setup (wheels)" "$limit_setup" setup.txt \
      "$py" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/project/*.whl
    export PYTHONPATH=$root:$site${PYTHONPATH#"$root"}
    ;;
  venv)
    step "setup (scripts/setup.sh, needs PyPI)" "$limit_setup" setup.txt bash scripts/setup.sh test,demo
    # shellcheck disable=SC1091
    [ "$step_rc" = 0 ] && . "${DRM_VENV:-.venv}/bin/activate" && py=python  # else: the python there was
    ;;
  *) echo "gpu_check.sh: DRM_GPU_CHECK_SETUP must be auto, wheels, venv or 0, got '$mode'" >&2; exit 2 ;;
esac
files+=(environment.txt)
timeout 120 "$py" - > "$out/environment.txt" 2>&1 <<'PY'
from importlib import metadata

import torch

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
versions = []
for name in ("lightning", "transformers", "peft", "safetensors", "jsonargparse", "datasets", "pytest"):
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print(", ".join(versions))
PY

# -- the steps, most important first
if [ "$device" = cuda ]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 && files+=(nvidia-smi.txt)
fi
mapfile -t gpu_files < <(grep -rl "mark.gpu" tests --include '*.py' | sort)
if [ "$device" = cuda ]; then
  per_test=()
  "$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
  step "gpu tests" "$limit_tests" gpu_tests.txt "$py" -m pytest -q -p no:cacheprovider -m gpu -rfEs \
    --continue-on-collection-errors --durations 10 "${per_test[@]}" "${gpu_files[@]}"
else
  # No GPU: the gpu-marked tests are collected (they skip without CUDA), so a renamed marker or import breaks here.
  step "gpu tests (collected)" "$limit_tests" gpu_tests.txt \
    "$py" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${gpu_files[@]}"
fi
step "merge speed" "$limit_speed" merge_speed.md \
  "$py" benchmarks/merge_speed.py --device "$device" "${shape[@]}" "${timing[@]}" --impls drm_lightning \
  --no-reference --methods "${svd_methods[@]}" --json "$out/merge_speed.json"
step "merge speed (data-aware)" "$limit_data" merge_speed_data.md \
  "$py" benchmarks/merge_speed.py --device "$device" "${shape[@]}" "${timing[@]}" --wudi-steps 3 --no-topk \
  --methods "${data_methods[@]}" --json "$out/merge_speed_data.json"
step "merge memory" "$limit_memory" merge_memory.md \
  "$py" benchmarks/merge_memory.py --device "$device" "${memory[@]}" --json "$out/merge_memory.json"

# mergekit: a folder with bin/mergekit-yaml ($MERGEKIT_VENV), else one made from carried wheels, else skipped.
mk=${MERGEKIT_VENV:-/work/mkvenv}
if [ "${DRM_GPU_CHECK_MERGEKIT:-1}" = 0 ]; then
  skip "vs mergekit" "DRM_GPU_CHECK_MERGEKIT=0"
elif [ ! -x "$mk/bin/mergekit-yaml" ] && ! compgen -G "$wheels/mergekit/mergekit-*.whl" > /dev/null; then
  skip "vs mergekit" "no mergekit: neither $mk/bin/mergekit-yaml nor $wheels/mergekit/*.whl"
else
  if [ ! -x "$mk/bin/mergekit-yaml" ]; then
    mk="$scratch/mergekit"
    mkdir -p "$mk/bin"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$mk/site" \
      "$wheels"/mergekit/*.whl > "$out/mergekit_setup.txt" 2>&1 && files+=(mergekit_setup.txt)
    cat > "$mk/bin/mergekit-yaml" <<EOF
#!/bin/sh
PYTHONPATH="$mk/site\${PYTHONPATH:+:\$PYTHONPATH}" exec "$(command -v "$py")" -c \
  'import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = "mergekit-yaml"; sys.exit(main())' "\$@"
EOF
    chmod +x "$mk/bin/mergekit-yaml"
  fi
  cuda_flag=()
  [ "$device" = cuda ] && cuda_flag=(--cuda)
  step "vs mergekit" "$limit_vs" vs_mergekit.md \
    "$py" benchmarks/vs_mergekit.py "${cuda_flag[@]}" "${vsmk[@]}" --mergekit_venv "$mk" --json "$out/vs_mergekit.json"
fi
step "merge speed (baselines)" "$limit_base" merge_speed_baselines.md \
  "$py" benchmarks/merge_speed.py --device "$device" "${shape[@]}" "${timing[@]}" --impls naive --no-reference \
  --no-floors --no-topk --methods "${base_methods[@]}" --json "$out/merge_speed_baselines.json"

# -- summary.md: the step table, then each step's output (the tail of long ones)
rows=$(grep '^| ' "$summary" | tail -n +2)
{
  for file in "${files[@]}"; do
    echo
    echo "## $file"
    echo
    echo '```'
    tail -n 200 "$out/$file"
    echo '```'
  done
} >> "$summary"
if [ "$pack" = 1 ]; then
  (cd "$out" && for f in *; do [ "$f" != summary.md ] && [ "$f" != gpu_check.tar.gz ] && echo "$f"; done) \
    > "$scratch/packed"
  tar -czf "$scratch/gpu_check.tar.gz" -C "$out" summary.md -T "$scratch/packed" \
    && (cd "$out" && xargs -r -d '\n' rm -rf < "$scratch/packed") && mv "$scratch/gpu_check.tar.gz" "$out/"
fi
echo "$rows" >&2
exit "$failed"
