#!/usr/bin/env bash
# scripts/stress_distributed.sh N: every multi-process test (pytest -m multiprocess) N times under each launch style
# (DRM_TEST_LAUNCH: torchrun --standalone, the static several-node form; see tests/helpers/launch.py), one pytest
# process per run, rounds interleaved (round i runs every test under every style before round i+1), so a run cut
# short still covers every test about equally. Prints one line per test and style: runs, failures, slowest seconds.
#
#   bash scripts/stress_distributed.sh 50                       # every multi-process test, 50 times per style
#   DRM_STRESS_K=failing_group bash scripts/stress_distributed.sh 50    # only tests matching -k
#   DRM_STRESS_STYLES="standalone static srun" ...              # the styles (default: standalone static)
#   bash scripts/stress_distributed.sh --summary runs/stress/results.tsv   # the summary of a run so far
#
# Each run's result goes to runs/stress/results.tsv (DRM_STRESS_DIR), a failed run's output to runs/stress/fail-*.log.
set -uo pipefail
cd "$(dirname "$0")/.."

summary() {
    awk -F'\t' '
        { key = $2 "\t" $1; runs[key]++; if ($3 != 0) fails[key]++; if ($4 > slow[key]) slow[key] = $4 }
        END {
            for (key in runs) {
                split(key, part, "\t")
                printf "%-100s %-10s runs %3d  failures %3d  slowest %6.1f s\n", part[1], part[2], runs[key], fails[key] + 0, slow[key]
            }
        }' "$1" | sort
}

if [[ "${1:-}" == "--summary" ]]; then
    summary "${2:-${DRM_STRESS_DIR:-runs/stress}/results.tsv}"
    exit 0
fi
N=${1:?usage: scripts/stress_distributed.sh N   (or --summary [results.tsv])}
STYLES=${DRM_STRESS_STYLES:-standalone static}
DIR=${DRM_STRESS_DIR:-runs/stress}
mkdir -p "$DIR"
RESULTS="$DIR/results.tsv"
# shellcheck disable=SC1091
. "${DRM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD

select=(-m multiprocess)
if [[ -n "${DRM_STRESS_K:-}" ]]; then select+=(-k "$DRM_STRESS_K"); fi
mapfile -t TESTS < <(python -m pytest -q -p no:cacheprovider --collect-only "${select[@]}" tests | grep '::')
echo "stress: ${#TESTS[@]} test(s) x styles [$STYLES] x $N round(s); results in $RESULTS" >&2

for ((round = 1; round <= N; round++)); do
    for style in $STYLES; do
        for test in "${TESTS[@]}"; do
            log=$(mktemp "$DIR/run-XXXXXX.log")
            start=$(date +%s.%N)
            DRM_TEST_LAUNCH=$style timeout 900 python -m pytest -q -p no:cacheprovider -x "$test" >"$log" 2>&1
            rc=$?
            seconds=$(echo "$(date +%s.%N) - $start" | bc)
            printf '%s\t%s\t%s\t%.1f\t%s\n' "$style" "$test" "$rc" "$seconds" "$round" >>"$RESULTS"
            if [[ $rc -ne 0 ]]; then
                mv "$log" "$DIR/fail-$style-$round-$(echo "$test" | tr -c 'A-Za-z0-9_\n' '_').log"
                echo "FAILED ($style, round $round): $test" >&2
            else
                rm -f "$log"
            fi
        done
    done
done
summary "$RESULTS"
