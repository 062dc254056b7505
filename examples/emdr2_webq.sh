#!/usr/bin/env bash
# EMDR² fine-tuning on WebQuestions with the paper's settings (Table 7): 16 GPUs, 8 training
# and 8 re-embedding the evidence; top-50 passages; index refreshed every 500 steps; Adam lr 2e-5,
# 1% warm-up, linear decay, weight decay 0.1, clip 1.0, dropout 0.1, batch 16, 20 epochs.
# Run:   NPROC_PER_NODE=16 bash examples/emdr2_webq.sh        (one node)
#        sbatch examples/slurm/emdr2.sbatch examples/emdr2_webq.sh   (SLURM)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data}
TRAIN=${TRAIN:-$DATA_DIR/qas/webq-train.json}
DEV=${DEV:-$DATA_DIR/qas/webq-test.json}
SAVE=${SAVE:-checkpoints/emdr2-webq}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-3417}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
EPOCHS=${EPOCHS:-20}
source examples/emdr2_common.sh "$@"
