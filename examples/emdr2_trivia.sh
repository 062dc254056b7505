#!/usr/bin/env bash
# EMDR² fine-tuning on TriviaQA with the paper's settings (Table 7): 16 GPUs, 8 training
# and 8 re-embedding the evidence; top-50 passages; index refreshed every 500 steps; Adam lr 2e-5,
# 1% warm-up, linear decay, weight decay 0.1, clip 1.0, dropout 0.1, batch 64, 10 epochs.
# Run:   bash examples/emdr2_trivia.sh        (one node, one process per GPU: on 8 GPUs 4 train, 4 index)
#        sbatch examples/slurm/emdr2.sbatch examples/emdr2_trivia.sh   (SLURM: 2 nodes x 8 GPUs, 8 + 8)
# INDEXERS (default: half of the launched ranks) sets how many re-embed the evidence.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data}
# Training answers: the human-annotated ones (the original's trivia-train-human-answers.csv; the
# official TriviaQA json is reduced to them automatically), and answers longer than 5 words are
# dropped (the paper's rule) whatever the file's format: --max-train-answer-words 5 below.
TRAIN=${TRAIN:-$DATA_DIR/qas/trivia-train.tsv}
DEV=${DEV:-$DATA_DIR/qas/trivia-dev.tsv}
SAVE=${SAVE:-checkpoints/emdr2-trivia}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-78785}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
EPOCHS=${EPOCHS:-10}
source examples/emdr2_common.sh --max-train-answer-words 5 "$@"
