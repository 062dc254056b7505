#!/bin/bash
# DPR retriever training on TriviaQA: 60,413 training questions (DPR's filtered set), 40 epochs.
# Batch 128, lr 2e-5, 1 hard negative + in-batch negatives over all GPUs (DPR's settings).
# Without hard_negative_ctxs in TRAIN_DATA, set NEGATIVES=bm25 (mined here) or dense (our index).
export TRAIN_DATA=${TRAIN_DATA:-data/retriever/trivia-train.json}   # DPR biencoder json (positive_ctxs, hard_negative_ctxs)
export DEV_DATA=${DEV_DATA:-data/triviaqa/trivia-dev.tsv}
export SAVE=${SAVE:-checkpoints/dpr-trivia}
export TRAIN_QUESTIONS=${TRAIN_QUESTIONS:-60413}
export EPOCHS=${EPOCHS:-40}
exec "$(dirname "$0")/dpr_common.sh" "$@"
