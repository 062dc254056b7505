#!/usr/bin/env bash
# Inference only: exact match and top-k retrieval accuracy of a trained EMDR² checkpoint on a QA
# file (the index is built with the checkpoint's context tower if INDEX_DIR holds none).
#   LOAD=checkpoints/emdr2-nq QA_FILE=data/qas/nq-test.csv NPROC_PER_NODE=8 bash examples/emdr2_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch.sh

LOAD=${LOAD:-checkpoints/emdr2-nq}
QA_FILE=${QA_FILE:-data/qas/nq-test.csv}
EVIDENCE=${EVIDENCE:-data/wikipedia-split/psgs_w100.tsv}
INDEX_DIR=${INDEX_DIR:-$LOAD/eval-index}
OUT=${OUT:-$LOAD/eval}

launch tasks.openqa.evaluate --load "$LOAD" --qa-file "$QA_FILE" --evidence "$EVIDENCE" \
  --index-dir "$INDEX_DIR" --top-k 50 --eval-batch-size 16 \
  --metrics-out "$OUT/metrics.json" --predictions-file "$OUT/predictions.jsonl" "$@"
