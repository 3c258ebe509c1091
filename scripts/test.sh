#!/usr/bin/env bash
# Set up (or reuse) .venv with the test extras, then run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,demo
# shellcheck disable=SC1091
. "${DRM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
