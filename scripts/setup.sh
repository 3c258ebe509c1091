#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install drm_lightning into it.
#   usage: scripts/setup.sh [EXTRAS]        e.g. scripts/setup.sh test,demo
# torch is installed first and pinned, so a CPU-only machine never resolves it to the multi-GB CUDA build.
# Elsewhere on a CPU-only machine, point DRM_TORCH_INDEX at PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu); DRM_TORCH_SPEC overrides the pin; DRM_VENV the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-demo}
venv=${DRM_VENV:-.venv}
torch_spec=${DRM_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

# Reinstall only when the requested extras or pyproject.toml changed since the last successful setup.
stamp="$venv/.drm_setup_$(echo "$extras" | tr ',' '_')"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import drm_lightning" 2>/dev/null; then
  exit 0
fi

if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${DRM_TORCH_INDEX:-}" ]; then
    python -m pip install -q "$torch_spec" --index-url "$DRM_TORCH_INDEX"
  else
    python -m pip install -q "$torch_spec"
  fi
fi
python -m pip install -q -e ".[$extras]"
echo "$want" > "$stamp"
