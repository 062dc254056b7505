#!/usr/bin/env bash
# Every training method from one shared start on nq-mini, the same number of steps each, in one
# table (2-core CPU, no GPU; defaults: 9 methods x 1 seed x 300 steps, about 10-15 minutes per
# method, plus ~30 minutes to build the start when START is not given):
#   1. the start: START=<a run dir with ict/ and mss/ checkpoints> (e.g. the quickstart's, or an
#      examples/nq_mini_unsupervised_study.sh run); without it, ICT + NER + MSS exactly as
#      nq_mini_unsupervised_study.sh runs them (its stages 1-2, into RUN/start)
#   2. the start's MSS checkpoint on dev (a row of the table) and Table 8 (recall@5 after ICT vs MSS)
#   3. for each seed and method: EMDR²-task training from the start's MSS checkpoint (retriever and
#      reader), then evaluation on all dev questions (EM, top-1/5/20, reading accuracy, predictions)
#   4. tools/objectives_table.py: per method the seed-mean metrics, the median step time, and for EM
#      and top-5 the paired counts and McNemar's exact p against the frozen-retriever FiD baseline
# Methods (METHODS=<subset>, in this order by default):
#   none             FiD with a frozen retriever (--retriever-objective none): the baseline
#   emdr2            EMDR², sequence-level marginal (the paper)
#   emdr2-token      EMDR², per-token marginal (the original code)
#   kl               the paper's L_alt-2 (the original's --ret-kldiv)
#   pdist            Atlas' perplexity distillation
#   hard-em          hard EM from the first step
#   hard-em-mml      MML (EMDR²) for HARD_EM_AFTER steps (default STEPS/2), then hard EM
#   individual-topk  the reader reads each passage alone, -log sum_k p(a|q,z_k) p(z_k|q)
#   joint-topk       FiD with log p(z_k|q) added to the decoder's cross-attention logits
# Knobs: STEPS (300), SEEDS ("1"), METHODS (all), START, RUN (runs/objectives-<time>), TOP_K (4),
# HARD_EM_AFTER; CONTINUE=1 adds methods or seeds to an existing RUN (arms with results are kept,
# the table covers this call's METHODS and SEEDS; START, STEPS, TOP_K, HARD_EM_AFTER and DATA must
# be the run's, as recorded in RUN/settings); ICT_STEPS / MSS_STEPS are passed to the study when it builds the start; DATA=<dir
# with evidence.tsv, train.tsv, dev.tsv> replaces data/nq-mini (smoke tests). Model sizes and input
# lengths come from the start's MSS checkpoint; a start with one shared tower (the unsupervised
# study's) trains it and refreshes the index every 25 steps, a start with two towers (the
# quickstart's) keeps the context tower frozen, as the scripts that made them did. A method whose
# run fails is reported in the table (with its log) and makes the script exit 1 after the table.
# The last line printed is the path of the table's JSON. docs/paper_tables.md describes the output.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_METHODS="none emdr2 emdr2-token kl pdist hard-em hard-em-mml individual-topk joint-topk"
RUN=${RUN:-runs/objectives-$(date +%Y%m%d-%H%M%S)}
METHODS=${METHODS:-$ALL_METHODS}
SEEDS=${SEEDS:-1}
STEPS=${STEPS:-300}
TOP_K=${TOP_K:-4}
HARD_EM_AFTER=${HARD_EM_AFTER:-$(( STEPS / 2 ))}
D=${DATA:-data/nq-mini}
err() { echo "compare_objectives: error: $*" >&2; exit 2; }

for m in $METHODS; do
  [[ " $ALL_METHODS " == *" $m "* ]] || err "METHODS: unknown method '$m' (choose from: $ALL_METHODS)"
done
[[ " $METHODS " == *" none "* ]] || METHODS="none $METHODS"  # the baseline every method is paired with
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || err "STEPS=$STEPS: a positive number of steps"
[[ -n "${SEEDS// /}" ]] || err "SEEDS is empty"
for f in evidence.tsv train.tsv dev.tsv; do [[ -f "$D/$f" ]] || err "$D/$f: no such file"; done
if [[ -n "${START:-}" ]]; then
  [[ -f "$START/mss/latest" ]] || err "START=$START: $START/mss/latest: no such file (need a run with an MSS checkpoint)"
fi
SETTINGS="START=${START:-} STEPS=$STEPS TOP_K=$TOP_K HARD_EM_AFTER=$HARD_EM_AFTER DATA=$D"
if [[ -d "$RUN" && -n "$(ls -A "$RUN")" ]]; then
  [[ -n "${CONTINUE:-}" ]] || err "$RUN already holds a run; choose another RUN=<dir> (or CONTINUE=1 to add methods or seeds to it)"
  if [[ -f "$RUN/settings" && "$(cat "$RUN/settings")" != "$SETTINGS" ]]; then
    err "CONTINUE: $RUN was run with '$(cat "$RUN/settings")', not '$SETTINGS'"
  fi
  if [[ -z "${START:-}" && -f "$RUN/start/mss/latest" ]]; then START=$RUN/start; fi  # the start it built
fi
mkdir -p "$RUN"
[[ -f "$RUN/settings" ]] || echo "$SETTINGS" > "$RUN/settings"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} PYTHONWARNINGS=ignore
T0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

if [[ -z "${START:-}" ]]; then
  stage "1/4 the start: ICT + NER + MSS as examples/nq_mini_unsupervised_study.sh runs them"
  RUN="$RUN/start" PRETRAIN_ONLY=1 DATA="$D" PRETRAINED="" bash examples/nq_mini_unsupervised_study.sh \
    | sed -u 's/^/  [start] /'
  START=$RUN/start
  BUILT=1
else
  stage "1/4 the start: $START"
fi

# The arms' model flags, as the start's MSS checkpoint recorded its models.
ARCH_TEXT=$(python - "$START/mss" <<'EOF'
import sys

from megatron.emdr2.openqa.builders import PretrainedError, load_checkpoint_meta

path = sys.argv[1]
try:
    meta = load_checkpoint_meta(path)
except PretrainedError as e:
    sys.exit(f"compare_objectives: error: {e}")
if "retriever" not in meta or "reader" not in meta:
    sys.exit(f"compare_objectives: error: {path}: its checkpoint records no retriever and reader sizes "
             f"(START needs an MSS or EMDR² run)")
flags = []
for role in ("retriever", "reader"):
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
                "hidden_dropout", "attention_dropout"):
        if meta[role].get(key) is not None:
            flags += [f"--{role}-{key.replace('_', '-')}", str(meta[role][key])]
reader = meta["reader"]
if reader.get("decoder_num_layers"):
    flags += ["--reader-decoder-num-layers", str(reader["decoder_num_layers"])]
flags += [f for key, f in (("copy_head", "--reader-copy-head"), ("copy_continuation", "--reader-copy-continuation"))
          if reader.get(key)]
if meta.get("shared_towers"):
    flags.append("--shared-towers")
for key in ("query_max_len", "context_max_len", "reader_max_len", "answer_max_len"):
    if key in meta:
        flags += ["--" + key.replace("_", "-"), str(meta[key])]
print("\n".join(flags))
EOF
) || exit 2
mapfile -t ARCH <<< "$ARCH_TEXT"
if [[ " ${ARCH[*]} " == *" --shared-towers "* ]]; then
  RETRIEVER_TRAIN=(--retriever-lr-mult 0.1 --index-reload-interval 25)  # as nq_mini_unsupervised_study.sh
else
  RETRIEVER_TRAIN=(--freeze-context-tower --retriever-lr-mult 0.02)      # as quickstart.sh
fi
JOINT=(--log-interval 25 --embed-batch-size 64 --evidence "$D/evidence.tsv" --top-k "$TOP_K"
       --global-batch-size 8 --micro-batch-size 8 --lr 1e-3 --lr-warmup-fraction 0.05 --weight-decay 0.1
       --clip-grad 1.0 --reader-encoder-lr-mult 0.3 --autocast auto --no-progress-bar --no-repeat-ngram-size 2)
EVAL=(--evidence "$D/evidence.tsv" --qa-file "$D/dev.tsv" --top-k "$TOP_K" --no-repeat-ngram-size 2 --autocast auto)

method_flags() {
  case "$1" in
    none) echo "--retriever-objective none" ;;
    emdr2) echo "--retriever-objective emdr2 --marginalisation sequence" ;;
    emdr2-token) echo "--retriever-objective emdr2 --marginalisation token" ;;
    kl) echo "--retriever-objective kl" ;;
    pdist) echo "--retriever-objective pdist" ;;
    hard-em) echo "--retriever-objective hard-em" ;;
    hard-em-mml) echo "--retriever-objective hard-em --hard-em-after-steps $HARD_EM_AFTER" ;;
    individual-topk) echo "--reader-mode individual-topk --retriever-objective emdr2" ;;
    joint-topk) echo "--reader-mode joint-topk --retriever-objective emdr2" ;;
  esac
}

stage "2/4 the start's MSS checkpoint on dev; Table 8"
START_DEV=$START/mss.dev.json  # the study and the quickstart evaluate it
if [[ ! -f "$START_DEV" ]]; then
  START_DEV=$RUN/start.dev.json
  python -m tasks.openqa.evaluate --load "$START/mss" --index-dir "$RUN/start-dev-index" --rebuild-index "${EVAL[@]}" \
    --metrics-out "$START_DEV" > "$RUN/start.eval.log" 2>&1 || { tail -n 5 "$RUN/start.eval.log" >&2; exit 1; }
fi
TABLE8=()
if [[ -f "$START/ict/metrics.jsonl" ]]; then
  TABLE8=(python tools/stage_table.py --run "$START" --table8-only --mss-metrics "$START_DEV")
  if [[ -z "${BUILT:-}" ]]; then "${TABLE8[@]}" || TABLE8=(); fi  # (the study has just printed it)
else
  echo "(no $START/ict/metrics.jsonl: no Table 8 line)"
fi

stage "3/4 $STEPS steps per method from $START/mss; methods: $METHODS; seeds: $SEEDS"
FAILED=()
for seed in $SEEDS; do
  for m in $METHODS; do
    name=$m-seed$seed
    if [[ -n "${CONTINUE:-}" && -f "$RUN/$name.dev.json" && -f "$RUN/$name.dev_predictions.jsonl" ]]; then
      echo "$name: kept from the earlier call (CONTINUE=1)"
      continue
    fi
    t=$(date +%s)
    log=$RUN/$name.log
    # shellcheck disable=SC2046  # method_flags prints flags to split
    if python -m tasks.openqa.emdr2 "${ARCH[@]}" "${RETRIEVER_TRAIN[@]}" "${JOINT[@]}" $(method_flags "$m") \
         --seed "$seed" --retriever-load "$START/mss" --reader-load "$START/mss" --train-data "$D/train.tsv" \
         --dev-data "$D/dev.tsv" --index-dir "$RUN/$name/index" --train-iters "$STEPS" --eval-interval 0 \
         --save "$RUN/$name" > "$log" 2>&1 \
       && log=$RUN/$name.eval.log \
       && python -m tasks.openqa.evaluate --load "$RUN/$name" --index-dir "$RUN/$name/dev-index" --rebuild-index \
         "${EVAL[@]}" --metrics-out "$RUN/$name.dev.json" --predictions-file "$RUN/$name.dev_predictions.jsonl" \
         > "$log" 2>&1; then
      echo "$name ($(( $(date +%s) - t ))s): $(tail -n 2 "$log" | head -n 1)"
    else
      echo "$name: FAILED after $(( $(date +%s) - t ))s: $(grep -a -v "^\s*$" "$log" | tail -n 1 | cut -c1-300) (log: $log)" >&2
      rm -f "$RUN/$name.dev.json"
      FAILED+=("$name")
    fi
  done
done

stage "4/4 the table"
# shellcheck disable=SC2086
python tools/objectives_table.py --run "$RUN" --methods $METHODS --seeds $SEEDS --baseline none --steps "$STEPS" \
  --start "$START" --start-metrics "$START_DEV" --json-out "$RUN/objectives_table.json" | sed "s|$RUN/||g" \
  | sed '$d' || true
[[ ${#TABLE8[@]} -gt 0 ]] && "${TABLE8[@]}"
echo "logs, checkpoints and predictions: $RUN"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "compare_objectives: ${#FAILED[@]} run(s) failed: ${FAILED[*]} (their logs are in $RUN)" >&2
fi
[[ -f "$RUN/objectives_table.json" ]] || exit 1
echo "$RUN/objectives_table.json"
[[ ${#FAILED[@]} -eq 0 ]] || exit 1
