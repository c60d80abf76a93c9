#!/usr/bin/env bash
# Every measurement that needs a GPU, in one script meant to finish in under 8 minutes on one H100:
#
#     bash bench/gpu.sh [--dry-run] [DIR]          # DIR defaults to $OUT
#
#   extract  bench/extract.py --large --workers 1   real-size WavLM-large, Whisper-large, RoBERTa-large (random
#            weights): audio hours per GPU-hour, encoder share, GPU utilisation, speed-up over the naive loop
#   tune     bench/tune.py --model paper --device auto   paper-size members: member-steps/s fused vs one after
#            another, data-wait fraction, cohort_speedup
#   loader   bench/loader.py --model paper          loader vs raw reads, data-wait fraction of a paper-size run
#   timeline bench/timeline.py --device auto        `predict --timeline` (length-bucketed batches) against the naive
#            per-segment loop on the GPU (timeline_vs_naive; goal >= 2 there), segmentation, class agreement
#
# Writes DIR/gpu.jsonl: a first line on the device, then one line per bench ({"bench", "command", "seconds",
# "dry_run", "result": the bench's own last JSON line}); each bench's full output in DIR/NAME.log. A bench that
# fails or runs past its time budget stops the script (exit 1) naming it.
# --dry-run: the same steps with tiny sizes (--tiny) on whatever device there is (the CPU in the test suite:
# tests/test_gpu_script.py), so the script cannot rot; it checks the steps and measures nothing.
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry=0
if [[ ${1:-} == --dry-run ]]; then
    dry=1
    shift
fi
out=${1:-${OUT:-}}
if [[ -z $out || $# -gt 1 ]]; then
    echo "usage: bash bench/gpu.sh [--dry-run] [DIR]   (DIR defaults to \$OUT)" >&2
    exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$root/.venv/bin/python
    [[ -x $PYTHON ]] || PYTHON=python3
fi
mkdir -p "$out"
: > "$out/gpu.jsonl"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# seconds each bench may take on the H100 (480 in all; the dry run's only guard against a hang) and its sizes
if (( dry )); then
    budget=(600 600 600 600)
    extract_size=(--tiny) tune_size=(--tiny) loader_size=(--tiny)
    timeline_size=(--quick --segment-minutes 0.5 --encode-minutes 0.25 --rounds 1)
else
    budget=(180 180 60 60)
    extract_size=(--large) tune_size=(--epochs 2) loader_size=()
    timeline_size=(--quick --encode-minutes 2)
fi

"$PYTHON" - "$dry" >> "$out/gpu.jsonl" <<'EOF'
import json, sys, torch
cuda = torch.cuda.is_available()
print(json.dumps({"bench": "device", "dry_run": sys.argv[1] == "1", "result": {
    "device": "cuda" if cuda else "cpu", "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
    "gpus": torch.cuda.device_count(), "torch": torch.__version__}}))
EOF

run() {  # NAME BUDGET SCRIPT ARGS...: one line of gpu.jsonl from the script's last JSON line
    local name=$1 limit=$2 script=$3
    shift 3
    local log=$out/$name.log start=$SECONDS status=0
    echo "gpu.sh: $name: $script $* (budget ${limit} s)" >&2
    timeout "$limit" "$PYTHON" "$root/bench/$script" "$@" > "$log" 2>&1 || status=$?
    if (( status == 124 )); then
        echo "gpu.sh: $name ran past its budget of $limit s; see $log" >&2
        exit 1
    elif (( status != 0 )); then
        echo "gpu.sh: $name failed (exit $status); the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    local result
    result=$(grep '^{' "$log" | tail -n 1)
    if [[ -z $result ]]; then
        echo "gpu.sh: $name printed no JSON line; see $log" >&2
        exit 1
    fi
    printf '{"bench": "%s", "command": "bench/%s %s", "seconds": %d, "dry_run": %s, "result": %s}\n' \
        "$name" "$script" "$*" $((SECONDS - start)) "$( (( dry )) && echo true || echo false)" "$result" \
        >> "$out/gpu.jsonl"
}

run extract "${budget[0]}" extract.py "${extract_size[@]}" --workers 1
run tune "${budget[1]}" tune.py --model paper --device auto "${tune_size[@]}"
run loader "${budget[2]}" loader.py --model paper "${loader_size[@]}"
run timeline "${budget[3]}" timeline.py --device auto --workdir "$out/timeline-work" "${timeline_size[@]}"
echo "gpu.sh: done in $SECONDS s; results in $out/gpu.jsonl" >&2
