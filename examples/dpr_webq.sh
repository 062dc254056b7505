#!/bin/bash
# DPR retriever training on WebQuestions: 3,417 training questions, 100 epochs (DPR's setting for the small sets).
# Batch 128, lr 2e-5, 1 hard negative + in-batch negatives over all GPUs (DPR's settings).
# Without hard_negative_ctxs in TRAIN_DATA, set NEGATIVES=bm25 (mined here) or dense (our index).
export TRAIN_DATA=${TRAIN_DATA:-data/webq/webq-train.json}   # DPR biencoder json (positive_ctxs, hard_negative_ctxs)
export DEV_DATA=${DEV_DATA:-data/webq/webq-dev.tsv}
export SAVE=${SAVE:-checkpoints/dpr-webq}
export TRAIN_QUESTIONS=${TRAIN_QUESTIONS:-3417}
export EPOCHS=${EPOCHS:-100}
exec "$(dirname "$0")/dpr_common.sh" "$@"
