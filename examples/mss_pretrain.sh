#!/usr/bin/env bash
# Masked-salient-span (MSS) pre-training with the seed's settings (Appendix C.1): retriever from an
# ICT checkpoint, reader from T5, 82k steps, batch 64, Adam lr 2e-5, 5% warm-up, linear decay,
# weight decay 0.1, clip 1.0; EMDR² objective; evidence re-embedded every 500 steps by 8 of 16 GPUs.
# The sentence file is tools/annotate_entities.py's output or the original release's MSS file:
#   python tools/annotate_entities.py --evidence $EVIDENCE --output $SENTENCES --workers 32
# Run:   bash examples/mss_pretrain.sh          (one node, one process per GPU: on 8 GPUs 4 train, 4 index)
#        sbatch examples/slurm/mss_pretrain.sbatch                             (SLURM, 2 nodes: 8 + 8)
# INDEXERS (default: half of the launched ranks) sets how many re-embed the evidence.
# Its checkpoint ($SAVE) is the --retriever-load/--reader-load of examples/emdr2_*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch.sh
resolve_ranks  # WORLD: the ranks this launch starts (before anything loads)

DATA_DIR=${DATA_DIR:-data}
EVIDENCE=${EVIDENCE:-$DATA_DIR/wikipedia-split/psgs_w100.tsv}   # or a tools/preprocess_evidence.py prefix
SENTENCES=${SENTENCES:-$DATA_DIR/mss/psgs_w100-sentences.jsonl}
RETRIEVER_INIT=${RETRIEVER_INIT:-checkpoints/ict-base}  # examples/ict_pretrain.sh's SAVE ("biencoder")
# tools/convert_hf_t5.py output; set it empty (READER_INIT=) for a randomly initialised reader
# (no colon in the expansion: an empty value is kept, not replaced by the default).
READER_INIT=${READER_INIT-checkpoints/t5-base.pt}
SAVE=${SAVE:-checkpoints/mss}
INDEX_DIR=${INDEX_DIR:-$SAVE/index}
TOP_K=${TOP_K:-50}
INDEXERS=${INDEXERS:-$(( WORLD / 2 ))}   # half of the launched ranks re-embed the evidence (the paper: 8 of 16)

READER_FLAGS=()
if [[ -n "$READER_INIT" ]]; then READER_FLAGS=(--reader-load "$READER_INIT"); fi

launch tasks.openqa.mss \
  --mss-data "$SENTENCES" --mss-dev-sentences 2000 --mss-max-spans 1 \
  --evidence "$EVIDENCE" --index-dir "$INDEX_DIR" \
  --retriever-load "$RETRIEVER_INIT" ${READER_FLAGS[@]+"${READER_FLAGS[@]}"} \
  --top-k "$TOP_K" --index-reload-interval 500 --num-indexer-ranks "$INDEXERS" \
  --retriever-objective emdr2 --marginalisation sequence \
  --global-batch-size 64 --micro-batch-size 1 --train-iters 82000 \
  --lr 2e-5 --lr-warmup-fraction 0.05 --lr-decay-style linear --weight-decay 0.1 --clip-grad 1.0 \
  --retriever-hidden-dropout 0.1 --reader-hidden-dropout 0.1 \
  --query-max-len 256 --reader-max-len 512 --answer-max-len 32 \
  --bf16 --checkpoint-activations --save "$SAVE" --load "$SAVE" --save-interval 2000 --keep-last 3 \
  --eval-interval 2000 --eval-max-questions 2000 --eval-batch-size 16 \
  --predictions-file "$SAVE/predictions-{iteration}.jsonl" --tensorboard-dir "$SAVE/tensorboard" "$@"
