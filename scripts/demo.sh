#!/usr/bin/env bash
# The README demo (`make demo` runs it after set-up): demo encoders and corpus -> extract -> tune (configs/demo-grid.yaml)
# -> ensemble (Development and Test3) -> report, then the final metrics table.
#
# Idempotent: finished steps are reused. Encoders and corpus are kept once built, extraction resumes (committed shards
# are kept), the search resumes with --resume (only unfinished trials run), ensemble and report are redone (seconds).
# `bash scripts/demo.sh --clean` deletes $DEMO_DIR first and starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled
DEMO_DIR=demo                      # configs/demo.yaml points at demo/encoders, relative to the repository root
MTSER=.venv/bin/mtser
[ -x "$MTSER" ] || MTSER=mtser
[ "${1:-}" = "--clean" ] && rm -rf "$DEMO_DIR"
start=$(date +%s)
step() { echo; echo "== demo: $* ($(( $(date +%s) - start )) s elapsed)"; }

step "small random-init encoders"
if [ -f "$DEMO_DIR/encoders/roberta/config.json" ]; then echo "reusing $DEMO_DIR/encoders"
else rm -rf "$DEMO_DIR/encoders"; $MTSER make-test-encoders "$DEMO_DIR/encoders"; fi

step "demo corpus"
if [ -f "$DEMO_DIR/corpus/Labels/labels_consensus.csv" ]; then echo "reusing $DEMO_DIR/corpus"
else $MTSER demo-corpus "$DEMO_DIR/corpus" --size 400 --seed 0 --overwrite; fi

step "extract (resumes: committed shards are kept)"
rc=0
$MTSER extract "$DEMO_DIR/corpus" --config configs/demo.yaml --store "$DEMO_DIR/store" --workers 2 --no-progress || rc=$?
if [ "$rc" = 1 ]; then echo "demo: some utterances failed to extract (listed above); continuing with the rest"
elif [ "$rc" != 0 ]; then exit "$rc"; fi

step "tune (stage 1: alpha x beta x pooling; stage 2: fine-tuning)"
resume=""
configs_sum=$(cat configs/demo-grid.yaml configs/demo.yaml | sha256sum | cut -c1-16)
if [ -f "$DEMO_DIR/run/search.json" ]; then
    if [ "$(cat "$DEMO_DIR/run/.demo-configs" 2>/dev/null)" = "$configs_sum" ]; then resume="--resume"
    else echo "configs/demo-grid.yaml or configs/demo.yaml changed since $DEMO_DIR/run was made: starting the search over"
         rm -rf "$DEMO_DIR/run"; fi
fi
mkdir -p "$DEMO_DIR/run" && echo "$configs_sum" > "$DEMO_DIR/run/.demo-configs"
$MTSER tune --search configs/demo-grid.yaml --store "$DEMO_DIR/store" --out "$DEMO_DIR/run" $resume > "$DEMO_DIR/tune.log" 2>&1 \
    || { tail -n 40 "$DEMO_DIR/tune.log"; exit 1; }
sed -n '/^ stage /,$p' "$DEMO_DIR/tune.log"

step "ensemble: Test3 predictions"
$MTSER ensemble --run "$DEMO_DIR/run" --store "$DEMO_DIR/store" --split Test3

step "ensemble: Development metrics"
$MTSER ensemble --run "$DEMO_DIR/run" --store "$DEMO_DIR/store" --split Development

step "report"
$MTSER report "$DEMO_DIR/run"
echo
echo "demo: done in $(( $(date +%s) - start )) s. Predict on new audio with:"
echo "  $MTSER predict $DEMO_DIR/corpus/Audios/MSP-PODCAST_test3_0001.wav --ensemble $DEMO_DIR/run/ensemble"
echo "and emotion over time in a long recording made of demo utterances with:"
echo "  $MTSER demo-recording $DEMO_DIR/corpus $DEMO_DIR/episode.wav"
echo "  $MTSER predict $DEMO_DIR/episode.wav --timeline --ensemble $DEMO_DIR/run/ensemble --out $DEMO_DIR/timeline"
