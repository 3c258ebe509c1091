#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that cannot reach PyPI, fetched here (with PyPI) for
# that machine: Python 3.12, x86-64, manylinux. Writes .gpu_wheels/ (git-ignored) at the repository root:
#   project/   what drm_lightning needs beyond that machine's image (torch, lightning, transformers, peft,
#              safetensors, torchmetrics, pytest, psutil are there): jsonargparse with its signature extras,
#              datasets with dill and multiprocess
#   mergekit/  mergekit 0.1.5 and what its image lacks (pydantic and its parts, immutables, typing-extensions)
#   commit     this checkout's commit (the device copy has no .git)
# The versions are those this project was tested with (pyproject.toml's lower bounds, /work/mkvenv's mergekit).
#   usage: bash scripts/gpu_wheels.sh        then carry ".gpu_wheels" in the device call (see gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${DRM_GPU_WHEELS:-.gpu_wheels}
py=${PYTHON:-python3}

project=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 datasets==5.2.0 dill==0.4.1
         multiprocess==0.70.19)
mergekit=(mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
          typing-extensions==4.16.0 immutables==0.21)

fetch() {  # fetch FOLDER SPEC...: binary wheels for CPython 3.12 on manylinux x86-64, no dependencies
  local folder=$1
  shift
  mkdir -p "$folder"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$folder" "$@"
}
rm -rf "$dest.partial"
fetch "$dest.partial/project" "${project[@]}"
fetch "$dest.partial/mergekit" "${mergekit[@]}"
git rev-parse --short HEAD > "$dest.partial/commit" 2>/dev/null || echo '?' > "$dest.partial/commit"
rm -rf "$dest"
mv "$dest.partial" "$dest"
du -sh "$dest"/project "$dest"/mergekit
