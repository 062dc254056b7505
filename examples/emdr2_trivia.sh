#!/usr/bin/env bash
# EMDR² fine-tuning on TriviaQA with the paper's settings (Table 7): 16 GPUs, 8 training
# and 8 re-embedding the evidence; top-50 passages; index refreshed every 500 steps; Adam lr 2e-5,
# 1% warm-up, linear decay, weight decay 0.1, clip 1.0, dropout 0.1, batch 64, 10 epochs.
# Run:   NPROC_PER_NODE=16 bash examples/emdr2_trivia.sh        (one node)
#        sbatch examples/slurm/emdr2.sbatch examples/emdr2_trivia.sh   (SLURM)
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch.sh

DATA_DIR=${DATA_DIR:-data}
EVIDENCE=${EVIDENCE:-$DATA_DIR/wikipedia-split/psgs_w100.tsv}   # or a tools/preprocess_evidence.py prefix
TRAIN=${TRAIN:-$DATA_DIR/qas/trivia-train.tsv}
DEV=${DEV:-$DATA_DIR/qas/trivia-dev.tsv}
RETRIEVER_INIT=${RETRIEVER_INIT:-checkpoints/mss}     # MSS (or ICT/DPR) checkpoint with "biencoder"
READER_INIT=${READER_INIT:-checkpoints/mss}           # MSS checkpoint with "reader" (or a converted T5)
SAVE=${SAVE:-checkpoints/emdr2-trivia}
INDEX_DIR=${INDEX_DIR:-$SAVE/index}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-78785}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
EPOCHS=${EPOCHS:-10}
INDEXERS=${INDEXERS:-8}

launch tasks.openqa.emdr2 \
  --train-data "$TRAIN" --dev-data "$DEV" --evidence "$EVIDENCE" --index-dir "$INDEX_DIR" \
  --retriever-load "$RETRIEVER_INIT" --reader-load "$READER_INIT" \
  --top-k 50 --index-reload-interval 500 --num-indexer-ranks "$INDEXERS" \
  --retriever-objective emdr2 --marginalisation sequence \
  --global-batch-size "$GLOBAL_BATCH" --micro-batch-size 1 \
  --train-iters $(( TRAIN_EXAMPLES * EPOCHS / GLOBAL_BATCH )) \
  --lr 2e-5 --lr-warmup-fraction 0.01 --lr-decay-style linear --weight-decay 0.1 --clip-grad 1.0 \
  --retriever-hidden-dropout 0.1 --reader-hidden-dropout 0.1 \
  --query-max-len 256 --reader-max-len 512 --answer-max-len 32 \
  --bf16 --save "$SAVE" --load "$SAVE" --save-interval 500 --keep-last 3 \
  --eval-interval 500 --eval-batch-size 16 --predictions-file "$SAVE/predictions-{iteration}.jsonl" \
  --tensorboard-dir "$SAVE/tensorboard" "$@"
