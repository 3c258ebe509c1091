#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the offline quickstart: fine-tune four MiniLM experts on the demo tasks,
# merge them with every method, validate on every task, and print the report (runs/quickstart/report.md).
# Extra args go to `drm-lightning pipeline`. It prints only its own progress and the report; --debug or
# DRM_LIGHTNING_VERBOSE=1 also shows what Lightning, transformers and datasets print.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
# shellcheck disable=SC1091
. "${DRM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
drm-lightning pipeline --config recipes/quickstart.yaml "$@"
