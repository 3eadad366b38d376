#!/usr/bin/env bash
# Copy the finished, evaluated runs of a reproduction that is still running (or stopped) into a results
# folder, without checkpoints, and render its REPORT.md there with this checkout's code:
#
#   scripts/copy-finished-runs.sh /work/airvae-runs/table1-caltech-paper results/table1-caltech-paper
#
# A run counts when its summary says it is over and it holds at least MIN_EVALUATIONS evaluation records
# (default 2: the table's and AIS). Rerunning `airvae reproduce` on the copied folder counts the copied
# runs as finished (tests/test_reproduce.py). The source is read only; the destination is replaced.
set -euo pipefail
SRC=${1:?usage: $0 REPRODUCTION_FOLDER RESULTS_FOLDER}
DEST=${2:?usage: $0 REPRODUCTION_FOLDER RESULTS_FOLDER}
MIN_EVALUATIONS=${MIN_EVALUATIONS:-2}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cp "$SRC/manifest.json" "$STAGE/"
[ -f "$SRC/sweep.jsonl" ] && cp "$SRC/sweep.jsonl" "$STAGE/"
for run in "$SRC"/runs/*/*/*/seed*; do
  [ -d "$run" ] || continue
  status=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status"))' "$run/summary.json" \
           2>/dev/null || echo none)
  n=$( (find "$run/evaluations" -maxdepth 1 -name '*.json' 2>/dev/null || true) | wc -l)
  if { [ "$status" = early-stopped ] || [ "$status" = completed ]; } && [ "$n" -ge "$MIN_EVALUATIONS" ]; then
    rel=${run#"$SRC"/}
    mkdir -p "$STAGE/$rel"
    # with its checkpoints while staged: the report draws the plots of a newly finished run from them
    (cd "$run" && tar --exclude=.lock -cf - .) | (cd "$STAGE/$rel" && tar -xf -)
  fi
done
airvae report "$STAGE" > /dev/null
rm -rf "$DEST"
mkdir -p "$DEST"
(cd "$STAGE" && tar --exclude=checkpoints --exclude=.lock --exclude='*.partial' -cf - .) | (cd "$DEST" && tar -xf -)
echo "copied $(find "$DEST/runs" -mindepth 4 -maxdepth 4 -type d -name 'seed*' | wc -l) finished runs to $DEST"
