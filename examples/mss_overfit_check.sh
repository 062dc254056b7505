#!/usr/bin/env bash
# Sanity check that MSS can learn at all (docs/mss.md): 8 annotated nq-mini sentences are both the
# training data and the held-out data, with 300 passages of evidence, top-k 2 and lr 3e-3, small
# models from random weights, 200 steps. Held-out EM must rise well above 0: targets, sentinels,
# decoding and scoring are wired correctly. A few minutes on 2 CPU cores.
#   RUN=<dir> (default runs/mss-overfit-<time>), SENTENCES=<annotated jsonl> (default: the test
#   fixture tests/fixtures/mss/nq_mini_first80.jsonl, whose first 8 lines are used)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/mss-overfit-$(date +%Y%m%d-%H%M%S)}
SENTENCES=${SENTENCES:-tests/fixtures/mss/nq_mini_first80.jsonl}
mkdir -p "$RUN"
export PYTHONWARNINGS=ignore
head -n 301 data/nq-mini/evidence.tsv > "$RUN/evidence.tsv"
head -n 8 "$SENTENCES" > "$RUN/sentences.jsonl"
python -m tasks.openqa.mss \
  --retriever-num-layers 2 --retriever-hidden-size 128 --retriever-num-attention-heads 4 --retriever-seq-length 128 \
  --reader-num-layers 2 --reader-hidden-size 128 --reader-num-attention-heads 4 --reader-seq-length 256 \
  --reader-hidden-dropout 0 --reader-attention-dropout 0 --shared-towers \
  --query-max-len 48 --context-max-len 96 --reader-max-len 160 --answer-max-len 12 \
  --evidence "$RUN/evidence.tsv" --index-dir "$RUN/index" --top-k 2 --index-reload-interval 0 \
  --mss-data "$RUN/sentences.jsonl" --mss-dev-data "$RUN/sentences.jsonl" \
  --global-batch-size 8 --micro-batch-size 8 --lr 3e-3 --lr-warmup-fraction 0.05 --train-iters 200 \
  --eval-interval 100 --log-interval 50 --seed 1234 --no-progress-bar --save "$RUN/mss" > "$RUN/mss.log" 2>&1 \
  || { tail -n 5 "$RUN/mss.log" >&2; exit 1; }
grep -a -o "evaluation at iteration.*" "$RUN/mss.log"
