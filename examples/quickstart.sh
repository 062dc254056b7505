#!/usr/bin/env bash
# The whole EMDR² pipeline on the bundled nq-mini data, with small models, on a CPU (~15 minutes on
# 2 cores, no GPU, no network):
#   1. ICT pre-training of the retriever on the nq-mini evidence
#   2. named-entity annotation of the evidence (spaCy, offline) for masked salient spans
#   3. MSS pre-training of retriever and reader (EMDR² objective, index refreshed during training)
#   4. EMDR² fine-tuning on nq-mini train (index refreshed during training), dev evaluation
#   5. final dev evaluation (EM, top-k retrieval accuracy) and a few answered questions
#   6. PNG plots of the losses and of retrieval accuracy
# The last line printed is the path of a JSON file with the final dev metrics and the run time.
# Everything goes to a new directory runs/quickstart-<time> (RUN=<dir> to choose; an existing
# non-empty one is refused rather than overwritten). QUICK=1 makes the run ~5x shorter.
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

scale() { if [[ -n "${QUICK:-}" ]]; then echo $(( ($1 + 4) / 5 )); else echo "$1"; fi; }
ICT_STEPS=$(scale 1200); MSS_STEPS=$(scale 400); EMDR2_STEPS=$(scale 900); REFRESH=$(scale 150)

stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

# Small models. From random initialisation the retriever learns much faster with one shared tower
# and no dropout (at initialisation every [CLS] state is nearly the same vector, and dropout noise
# swamps the content); with BERT weights the paper's separate towers and dropout 0.1 apply.
RETRIEVER=(--retriever-num-layers 2 --retriever-hidden-size 128 --retriever-num-attention-heads 4
           --retriever-seq-length 256 --retriever-hidden-dropout 0 --retriever-attention-dropout 0
           --shared-towers --query-max-len 48 --context-max-len 128)
READER=(--reader-num-layers 2 --reader-hidden-size 128 --reader-num-attention-heads 4 --reader-seq-length 256
        --reader-hidden-dropout 0.1 --reader-attention-dropout 0 --reader-max-len 192 --answer-max-len 16)
COMMON=(--seed 1234 --log-interval 25 --embed-batch-size 64)

stage "1/6 ICT pre-training of the retriever ($ICT_STEPS steps)"
python -m tasks.openqa.ict "${RETRIEVER[@]}" "${COMMON[@]}" --evidence "$DATA/evidence.tsv" \
  --dev-data "$DATA/dev.tsv" --global-batch-size 32 --micro-batch-size 32 --lr 1e-3 \
  --lr-warmup-fraction 0.05 --weight-decay 0.01 --train-iters "$ICT_STEPS" --eval-interval "$ICT_STEPS" \
  --save "$RUN/ict"

stage "2/6 named entities in the evidence (spaCy OntoNotes model)"
if [[ ! -s "$RUN/sentences.jsonl" ]]; then
  python tools/annotate_entities.py --evidence "$DATA/evidence.tsv" --output "$RUN/sentences.jsonl" --workers 2
fi

stage "3/6 masked-salient-span pre-training of retriever and reader ($MSS_STEPS steps)"
python -m tasks.openqa.mss "${RETRIEVER[@]}" "${READER[@]}" "${COMMON[@]}" --mss-data "$RUN/sentences.jsonl" \
  --evidence "$DATA/evidence.tsv" --retriever-load "$RUN/ict" --index-dir "$RUN/mss/index" \
  --top-k 4 --index-reload-interval "$REFRESH" --global-batch-size 8 --micro-batch-size 8 --lr 1e-3 \
  --lr-warmup-fraction 0.05 --weight-decay 0.1 --train-iters "$MSS_STEPS" --eval-interval "$MSS_STEPS" \
  --eval-max-questions 100 --save "$RUN/mss"

stage "4/6 EMDR² fine-tuning on nq-mini train ($EMDR2_STEPS steps)"
python -m tasks.openqa.emdr2 "${RETRIEVER[@]}" "${READER[@]}" "${COMMON[@]}" \
  --train-data "$DATA/train.tsv" --dev-data "$DATA/dev.tsv" --evidence "$DATA/evidence.tsv" \
  --retriever-load "$RUN/mss" --reader-load "$RUN/mss" --index-dir "$RUN/emdr2/index" \
  --top-k 4 --index-reload-interval "$REFRESH" --global-batch-size 8 --micro-batch-size 8 --lr 5e-4 \
  --lr-warmup-fraction 0.01 --weight-decay 0.1 --train-iters "$EMDR2_STEPS" \
  --eval-interval $(( EMDR2_STEPS / 3 > 0 ? EMDR2_STEPS / 3 : 1 )) --eval-max-questions 100 --save "$RUN/emdr2"

stage "5/6 dev evaluation and a few answered questions"
python -m tasks.openqa.evaluate --load "$RUN/emdr2" --index-dir "$RUN/emdr2/eval-index" --rebuild-index \
  --evidence "$DATA/evidence.tsv" --qa-file "$DATA/dev.tsv" --top-k 4 --seed 1234 \
  --metrics-out "$RUN/dev_metrics.json" --predictions-file "$RUN/dev_predictions.jsonl" | tail -n 2
head -n 3 "$DATA/dev.tsv" | cut -f1 > "$RUN/questions.txt"
python tools/answer.py --load "$RUN/emdr2" --index-dir "$RUN/emdr2/eval-index" --evidence "$DATA/evidence.tsv" \
  --top-k 4 --questions-file "$RUN/questions.txt" --show-passages 1 --json "$RUN/answers.jsonl"

stage "6/6 plots"
python tools/plot_metrics.py --run "ict=$RUN/ict/metrics.jsonl" --run "mss=$RUN/mss/metrics.jsonl" \
  --run "emdr2=$RUN/emdr2/metrics.jsonl" --out "$RUN/plots"

SECONDS_TOTAL=$(( $(date +%s) - START ))
python - "$RUN" "$SECONDS_TOTAL" <<'EOF'
import json, os, sys
run, seconds = sys.argv[1], int(sys.argv[2])
dev = json.load(open(os.path.join(run, "dev_metrics.json")))
final = {k: dev[k] for k in ("em", "top1", "top5", "top20", "questions")}
final["run_seconds"] = seconds
path = os.path.join(run, "final_metrics.json")
with open(path + ".tmp", "w") as f:
    json.dump(final, f, indent=1)
os.replace(path + ".tmp", path)
print()
print(f"nq-mini dev ({final['questions']} questions): EM {final['em']:.3f} | top-1 {final['top1']:.3f} | "
      f"top-5 {final['top5']:.3f} | top-20 {final['top20']:.3f} | {seconds // 60} min {seconds % 60} s")
print(f"checkpoints: {run}/{{ict,mss,emdr2}}   plots: {run}/plots   predictions: {run}/dev_predictions.jsonl")
print(path)
EOF
