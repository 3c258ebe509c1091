#!/usr/bin/env bash
# scripts/stress_distributed.sh N: every multi-process test (pytest -m multiprocess) N times under each launch style
# (DRM_TEST_LAUNCH: torchrun --standalone, the static several-node form; see tests/helpers/launch.py), rounds
# interleaved (round i runs every test under every style before round i+1), so a run cut short still covers every
# test about equally. Prints one line per test and style: runs, failures, slowest seconds.
#
#   bash scripts/stress_distributed.sh 50                       # every multi-process test, 50 times per style
#   DRM_STRESS_K=failing_group bash scripts/stress_distributed.sh 50    # only tests matching -k
#   DRM_STRESS_PATHS="tests/distributed" ...                    # where to collect them (default: tests)
#   DRM_STRESS_STYLES="standalone static srun" ...              # the styles (default: standalone static)
#   DRM_STRESS_PARALLEL=1 ...                                   # the styles' rounds side by side, one loop each
#   DRM_STRESS_SEPARATE=1 ...                                   # one pytest process per test run (default: per round)
#   bash scripts/stress_distributed.sh --summary runs/stress/results.tsv   # the summary of a run so far
#
# A run cut short (a killed loop, a machine given back) goes on where it stopped when started again with the same
# DRM_STRESS_DIR and N: each style starts after its last finished round. The folder records the commit it tests
# (DIR/commit); another commit, or uncommitted changes to tracked files, is refused in one line.
#
# By default a round of one style is one pytest process (every test in it; its seconds are pytest's own per test,
# without the process's start-up), which saves a pytest start per test. Each test's result goes to
# runs/stress/results.tsv (DRM_STRESS_DIR), the output of a round (or run) with a failure to runs/stress/fail-*.log.
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
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then COMMIT="$COMMIT+uncommitted"; fi
if [[ -s "$RESULTS" ]]; then
    if [[ "$(cat "$DIR/commit" 2>/dev/null || echo 'no record')" != "$COMMIT" ]]; then
        echo "stress: $DIR holds a run of commit $(cat "$DIR/commit" 2>/dev/null || echo '(no record)'), this checkout is $COMMIT; give another DRM_STRESS_DIR" >&2
        exit 2
    fi
else
    echo "$COMMIT" >"$DIR/commit"
fi
# shellcheck disable=SC1091
. "${DRM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD

select=(-m multiprocess)
if [[ -n "${DRM_STRESS_K:-}" ]]; then select+=(-k "$DRM_STRESS_K"); fi
# shellcheck disable=SC2086
mapfile -t TESTS < <(python -m pytest -q -p no:cacheprovider --collect-only "${select[@]}" ${DRM_STRESS_PATHS:-tests} | grep '::')
echo "stress: ${#TESTS[@]} test(s) x styles [$STYLES] x $N round(s); results in $RESULTS" >&2

# last_round STYLE: the highest round of STYLE in the results so far (0 for none).
last_round() {
    awk -F'\t' -v style="$1" '$1 == style && $5 > last { last = $5 } END { print last + 0 }' "$RESULTS" 2>/dev/null || echo 0
}

# one_test STYLE ROUND TEST: one pytest process for one test (unless a resumed run already has its result).
one_test() {
    local style=$1 round=$2 test=$3 log start rc seconds
    if awk -F'\t' -v s="$style" -v t="$test" -v r="$round" '$1 == s && $2 == t && $5 == r { found = 1 } END { exit !found }' \
        "$RESULTS" 2>/dev/null; then return; fi
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
}

# one_round STYLE ROUND: one pytest process for every test; one line per test from its JUnit XML.
one_round() {
    local style=$1 round=$2 log xml failed
    log=$(mktemp "$DIR/round-XXXXXX.log")
    xml="$log.xml"
    DRM_TEST_LAUNCH=$style timeout $((900 * ${#TESTS[@]})) python -m pytest -q -p no:cacheprovider \
        --junitxml="$xml" "${TESTS[@]}" >"$log" 2>&1
    # stderr (the failed tests' names) into $failed, stdout (one line per test) onto the results; the order matters
    failed=$(python - "$xml" "$style" "$round" "${TESTS[@]}" 2>&1 >>"$RESULTS" <<'PY'
import sys
import xml.etree.ElementTree as ET

xml, style, rnd, tests = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    cases = list(ET.parse(xml).getroot().iter("testcase"))
except (OSError, ET.ParseError):  # the process died before writing it
    cases = []
results = {}  # (classname, name) -> (failed, seconds, skipped)
for case in cases:
    tags = {child.tag for child in case}
    results[case.get("classname"), case.get("name")] = (bool(tags & {"failure", "error"}), float(case.get("time", 0)),
                                                         "skipped" in tags)
for test in tests:
    path, *parts = test.split("::")
    key = (".".join([path.removesuffix(".py").replace("/", "."), *parts[:-1]]), parts[-1])
    failed, seconds, skipped = results.get(key, (True, 0.0, False))  # a test missing from the XML failed
    if skipped and not failed:
        continue
    print(f"{style}\t{test}\t{int(failed)}\t{seconds:.1f}\t{rnd}")
    if failed:
        print(test, file=sys.stderr)
PY
    )
    if [[ -n "$failed" ]]; then
        mv "$log" "$DIR/fail-$style-$round.log"
        echo "FAILED ($style, round $round): $failed" >&2
    else
        rm -f "$log"
    fi
    rm -f "$xml"
}

# style_rounds STYLE...: rounds up to N of the styles, interleaved, each style after its last finished round (a round
# of one pytest process writes its results only when it ends; a separate-process round is taken up where it stopped).
style_rounds() {
    local round style test first=$N
    for style in "$@"; do
        round=$(last_round "$style")
        if ((round > 0)); then echo "stress: $style resumes after round $round" >&2; fi
        if [[ -z "${DRM_STRESS_SEPARATE:-}" ]]; then round=$((round + 1)); fi
        if ((round < first)); then first=$round; fi
    done
    if ((first < 1)); then first=1; fi
    for ((round = first; round <= N; round++)); do
        for style in "$@"; do
            if [[ -z "${DRM_STRESS_SEPARATE:-}" ]] && ((round <= $(last_round "$style"))); then continue; fi
            if [[ -n "${DRM_STRESS_SEPARATE:-}" ]]; then
                for test in "${TESTS[@]}"; do one_test "$style" "$round" "$test"; done
            else
                one_round "$style" "$round"
            fi
        done
    done
}

if [[ -n "${DRM_STRESS_PARALLEL:-}" ]]; then
    for style in $STYLES; do style_rounds "$style" & done
    wait
else
    # shellcheck disable=SC2086
    style_rounds $STYLES
fi
summary "$RESULTS"
