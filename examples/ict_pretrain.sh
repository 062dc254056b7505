#!/bin/bash
# ICT pre-training of the dual-encoder retriever with the paper's settings (Table 6):
# BERT-base initialisation, global batch 4096, lr 1e-4, 100k steps, 1% warm-up, weight decay 0.01.
# One node (torchrun, NPROC_PER_NODE GPUs) or several: sbatch examples/slurm/retriever.sbatch examples/ict_pretrain.sh
set -euo pipefail

# ---- paths -----------------------------------------------------------------------------
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
EVIDENCE=${EVIDENCE:-data/wikipedia-split/psgs_w100.tsv}   # DPR passages (id, text, title)
DEV_DATA=${DEV_DATA:-data/nq/nq-dev.tsv}                    # dev questions for top-k accuracy
BERT=${BERT:-checkpoints/bert-base-uncased-megatron}      # tools/convert_hf_bert.py import --hf bert-base-uncased
SAVE=${SAVE:-checkpoints/ict-base}                        # examples/mss_pretrain.sh's RETRIEVER_INIT
cd "$REPO"
source examples/launch.sh
resolve_ranks  # WORLD: the data-parallel ranks this launch starts (8-16 GPUs)

# ---- settings (Table 6) --------------------------------------------------------------
GLOBAL_BATCH=4096
MICRO_BATCH=$((GLOBAL_BATCH / WORLD))   # in-batch negatives: MICRO_BATCH x WORLD = the global batch
# Memory: a micro-batch of 512 contexts x 256 tokens (8 GPUs) keeps ~75 GB of activations in
# BERT-base; full recompute (--checkpoint-activations) stores each layer's input only (~2.4 GB, plus
# one layer's activations while it is recomputed) and keeps every in-batch negative, which gradient
# accumulation over smaller micro-batches would not.
launch tasks.openqa.ict \
    --bert-load "$BERT" --retriever-post-layernorm \
    --retriever-num-layers 12 --retriever-hidden-size 768 --retriever-num-attention-heads 12 \
    --retriever-seq-length 512 --query-max-len 64 --context-max-len 256 --query-in-block-prob 0.1 \
    --evidence "$EVIDENCE" --dev-data "$DEV_DATA" --eval-max-questions 2000 --eval-score-k 20 \
    --global-batch-size "$GLOBAL_BATCH" --micro-batch-size "$MICRO_BATCH" \
    --lr 1e-4 --lr-warmup-fraction 0.01 --lr-decay-style linear --weight-decay 0.01 --clip-grad 1.0 \
    --train-iters 100000 --fp16 --checkpoint-activations \
    --save "$SAVE" --save-interval 5000 --keep-last 3 --eval-interval 5000 --log-interval 100 "$@"
