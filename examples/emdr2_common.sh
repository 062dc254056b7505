# Sourced by emdr2_{nq,trivia,webq}.sh after they set TRAIN, DEV, SAVE, TRAIN_EXAMPLES (and
# GLOBAL_BATCH/EPOCHS where they differ): the paper's Table 7 settings, shared. As in the original
# code, each draw of a question trains on one of its gold answers at random (--train-answer random).
source examples/launch.sh
resolve_ranks  # WORLD: the ranks this launch starts (before anything loads)

DATA_DIR=${DATA_DIR:-data}
EVIDENCE=${EVIDENCE:-$DATA_DIR/wikipedia-split/psgs_w100.tsv}   # or a tools/preprocess_evidence.py prefix
TRAIN=${TRAIN:?}
DEV=${DEV:?}
RETRIEVER_INIT=${RETRIEVER_INIT:-checkpoints/mss}     # MSS (or ICT/DPR) checkpoint with "biencoder"
READER_INIT=${READER_INIT:-checkpoints/mss}           # MSS checkpoint with "reader" (or a converted T5)
SAVE=${SAVE:?}
INDEX_DIR=${INDEX_DIR:-$SAVE/index}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:?}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
EPOCHS=${EPOCHS:-10}
INDEXERS=${INDEXERS:-$(( WORLD / 2 ))}   # half of the launched ranks re-embed the evidence (the paper: 8 of 16)
case "$(basename "$DEV")" in  # the best checkpoint is chosen on DEV: never on a test set
  *test*) echo "emdr2: error: DEV=$DEV looks like a test set; checkpoints are selected on DEV" >&2; exit 2 ;;
esac

launch tasks.openqa.emdr2 \
  --train-data "$TRAIN" --dev-data "$DEV" --evidence "$EVIDENCE" --index-dir "$INDEX_DIR" \
  --retriever-load "$RETRIEVER_INIT" --reader-load "$READER_INIT" \
  --top-k 50 --index-reload-interval 500 --num-indexer-ranks "$INDEXERS" \
  --retriever-objective emdr2 --marginalisation sequence --train-answer random \
  --global-batch-size "$GLOBAL_BATCH" --micro-batch-size 1 \
  --train-iters $(( TRAIN_EXAMPLES * EPOCHS / GLOBAL_BATCH )) \
  --lr 2e-5 --lr-warmup-fraction 0.01 --lr-decay-style linear --weight-decay 0.1 --clip-grad 1.0 \
  --retriever-hidden-dropout 0.1 --reader-hidden-dropout 0.1 \
  --query-max-len 256 --reader-max-len 512 --answer-max-len 32 \
  --bf16 --checkpoint-activations --save "$SAVE" --load "$SAVE" --save-interval 500 --keep-last 3 \
  --eval-interval 500 --eval-batch-size 16 --predictions-file "$SAVE/predictions-{iteration}.jsonl" \
  --tensorboard-dir "$SAVE/tensorboard" "$@"
