#!/usr/bin/env bash
# EMDR² fine-tuning on WebQuestions with the paper's settings (Table 7): 16 GPUs, 8 training
# and 8 re-embedding the evidence; top-50 passages; index refreshed every 500 steps; Adam lr 2e-5,
# 1% warm-up, linear decay, weight decay 0.1, clip 1.0, dropout 0.1, batch 16, 20 epochs.
# Run:   bash examples/emdr2_webq.sh        (one node, one process per GPU: on 8 GPUs 4 train, 4 index)
#        sbatch examples/slurm/emdr2.sbatch examples/emdr2_webq.sh   (SLURM: 2 nodes x 8 GPUs, 8 + 8)
# INDEXERS (default: half of the launched ranks) sets how many re-embed the evidence.
#
# WebQuestions has no official dev split, and the test set must never choose the checkpoint.
# Unless TRAIN and DEV are both given (e.g. the original release's webq-train.csv / webq-dev.csv,
# DPR's 3,417 / 361 split), a seeded 10% of the training questions in WEBQ_TRAIN is carved out as
# dev by tools/split_dev.py into SPLIT_DIR (written once; later runs reuse it).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data}
# One or more files (space-separated), e.g. brmson's trainmodel.json val.json devtest.json (3,778).
WEBQ_TRAIN=${WEBQ_TRAIN:-$DATA_DIR/qas/webq-train.json}
SPLIT_DIR=${SPLIT_DIR:-$DATA_DIR/qas/webq-split}
SPLIT_SEED=${SPLIT_SEED:-1234}
if [[ -n "${TRAIN:-}" && -n "${DEV:-}" ]]; then
  TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-3417}
elif [[ -n "${TRAIN:-}${DEV:-}" ]]; then
  echo "emdr2_webq.sh: error: set both TRAIN and DEV, or neither (then WEBQ_TRAIN is split)" >&2
  exit 2
else
  read -r -a WEBQ_TRAIN_FILES <<< "$WEBQ_TRAIN"
  SPLIT=$(python tools/split_dev.py "${WEBQ_TRAIN_FILES[@]}" --out-dir "$SPLIT_DIR" \
            --dev-fraction 0.1 --seed "$SPLIT_SEED" --get train dev train_examples)
  { read -r TRAIN; read -r DEV; read -r SPLIT_TRAIN_EXAMPLES; } <<< "$SPLIT"
  TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-$SPLIT_TRAIN_EXAMPLES}
fi
SAVE=${SAVE:-checkpoints/emdr2-webq}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
EPOCHS=${EPOCHS:-20}
source examples/emdr2_common.sh "$@"
