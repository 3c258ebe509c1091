#!/usr/bin/env bash
# Set up (or reuse) .venv with the test extras, then run the whole test suite. Extra args go to pytest.
# Two xdist workers (DRM_TEST_WORKERS to change; 0 runs in this process), one test file per worker at a time
# (--dist loadfile: a module's fixtures, e.g. its trained tiny experts, are built once), and the 15 slowest tests
# listed at the end, so a test that grows is seen.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,demo
# shellcheck disable=SC1091
. "${DRM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest -q -p no:cacheprovider -n "${DRM_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
