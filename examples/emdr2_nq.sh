#!/usr/bin/env bash
# EMDR² fine-tuning on Natural Questions with the paper's settings (Table 7): 16 GPUs, 8 training
# and 8 re-embedding the evidence; top-50 passages; index refreshed every 500 steps; Adam lr 2e-5,
# 1% warm-up, linear decay, weight decay 0.1, clip 1.0, dropout 0.1, batch 64, 10 epochs.
# Run:   bash examples/emdr2_nq.sh        (one node, one process per GPU: on 8 GPUs 4 train, 4 index)
#        sbatch examples/slurm/emdr2.sbatch examples/emdr2_nq.sh   (SLURM: 2 nodes x 8 GPUs, 8 + 8)
# INDEXERS (default: half of the launched ranks) sets how many re-embed the evidence.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data}
TRAIN=${TRAIN:-$DATA_DIR/qas/nq-train.csv}
DEV=${DEV:-$DATA_DIR/qas/nq-dev.csv}
SAVE=${SAVE:-checkpoints/emdr2-nq}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-79168}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
EPOCHS=${EPOCHS:-10}
source examples/emdr2_common.sh "$@"
