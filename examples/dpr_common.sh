#!/bin/bash
# Shared by dpr_{nq,trivia,webq}.sh: DPR supervised retriever training (Karpukhin et al. 2020)
# from the ICT checkpoint, one BM25-or-dense hard negative per question plus in-batch negatives
# gathered over all GPUs. The caller sets TRAIN_DATA, DEV_DATA, SAVE, TRAIN_QUESTIONS, EPOCHS.
# Several nodes: sbatch examples/slurm/retriever.sbatch examples/dpr_nq.sh
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
EVIDENCE=${EVIDENCE:-data/wikipedia-split/psgs_w100.tsv}
RETRIEVER_INIT=${RETRIEVER_INIT:-checkpoints/ict-base}     # examples/ict_pretrain.sh output
NEGATIVES=${NEGATIVES:-file}   # file (the DPR json's BM25 hard negatives) | bm25 | dense
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
ITERS=$(( (TRAIN_QUESTIONS / GLOBAL_BATCH) * EPOCHS ))
cd "$REPO"
source examples/launch.sh
resolve_ranks  # WORLD: the data-parallel ranks this launch starts
MICRO_BATCH=$((GLOBAL_BATCH / WORLD))   # in-batch negatives over the whole global batch
launch tasks.openqa.dpr \
    --retriever-load "$RETRIEVER_INIT" \
    --retriever-num-layers 12 --retriever-hidden-size 768 --retriever-num-attention-heads 12 \
    --retriever-seq-length 512 --query-max-len 256 --context-max-len 256 \
    --train-data "$TRAIN_DATA" --dev-data "$DEV_DATA" --evidence "$EVIDENCE" \
    --hard-negatives 1 --hard-negatives-source "$NEGATIVES" --mine-depth 30 \
    --global-batch-size "$GLOBAL_BATCH" --micro-batch-size "$MICRO_BATCH" \
    --lr 2e-5 --lr-warmup-fraction 0.01 --lr-decay-style linear --weight-decay 0.0 --clip-grad 2.0 \
    --adam-eps 1e-8 --train-iters "$ITERS" --fp16 \
    --eval-interval $((ITERS / EPOCHS)) --eval-score-k 20 --eval-max-questions 2000 \
    --save "$SAVE" --save-interval $((ITERS / EPOCHS)) --keep-last 2 --log-interval 50 "$@"
