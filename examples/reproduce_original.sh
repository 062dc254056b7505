#!/usr/bin/env bash
# Reproduce the original EMDR² release's published test exact match with its own models:
# convert each released checkpoint and its evidence embeddings, then evaluate on the test set.
#
#   ORIG=downloads/emdr2 NPROC_PER_NODE=8 bash examples/reproduce_original.sh
#
# Expects (names as the original README's links download them; every path can be overridden):
#   $EVIDENCE          psgs_w100.tsv (DPR's 21M passages), or a prefix made by tools/preprocess_evidence.py
#   $QAS/{nq,trivia,webq}-test.csv                         the original's qas.tar.gz
#   $NQ_CKPT     iter_0009896/   $NQ_EMB     nq-ssm-step9000.pkl
#   $TRIVIA_CKPT iter_0003250/   $TRIVIA_EMB trivia-ssm-step3250.pkl
#   $WEBQ_CKPT   iter_0003408/   $WEBQ_EMB   webq-ssm-step2500.pkl
# (a checkpoint is an iter_* directory, a root with latest_checkpointed_iteration.txt, or the
# model_optim_rng.pt file). DATASETS="nq webq" runs a subset; EVAL_ARGS are passed to
# tasks.openqa.evaluate (e.g. "--eval-max-questions 100" for a quick look).
#
# Each step is skipped when its output exists (<OUT>/<dataset>/test.json for the evaluation), so
# an interrupted run resumes. The converted
# checkpoints read each passage extended with its article neighbours, in the original's row
# layout (recorded in their meta by tools/convert_original_emdr2.py), and search the released
# embeddings as they are (NQ's and WebQ's were computed at earlier steps than their checkpoints,
# as the original evaluated them). Memory: unpickling one 32 GB embedding file takes ~40 GB RAM.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the tools/ scripts import the package from here

ORIG=${ORIG:-data/original}
EVIDENCE=${EVIDENCE:-$ORIG/psgs_w100.tsv}
QAS=${QAS:-$ORIG/qas}
NQ_CKPT=${NQ_CKPT:-$ORIG/iter_0009896}
TRIVIA_CKPT=${TRIVIA_CKPT:-$ORIG/iter_0003250}
WEBQ_CKPT=${WEBQ_CKPT:-$ORIG/iter_0003408}
NQ_EMB=${NQ_EMB:-$ORIG/nq-ssm-step9000.pkl}
TRIVIA_EMB=${TRIVIA_EMB:-$ORIG/trivia-ssm-step3250.pkl}
WEBQ_EMB=${WEBQ_EMB:-$ORIG/webq-ssm-step2500.pkl}
VOCAB_FILE=${VOCAB_FILE:-}          # bert-large-uncased-vocab.txt (= the bundled bert-base-uncased vocab)
OUT=${OUT:-runs/reproduce-original}
DATASETS=${DATASETS:-nq trivia webq}
NUM_SHARDS=${NUM_SHARDS:-${NPROC_PER_NODE:-1}}
WORKERS=${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
EVAL_ARGS=${EVAL_ARGS:-}
vocab=(); [[ -n "$VOCAB_FILE" ]] && vocab=(--vocab-file "$VOCAB_FILE")

mkdir -p "$OUT"
# 1. the evidence, pre-tokenised once (memory-mapped; keeps the raw titles the neighbour map groups by)
if [[ -f "$EVIDENCE" ]]; then
  base=$(basename "$EVIDENCE"); prefix="$OUT/evidence/${base%%.*}"
  if [[ ! -f "${prefix}_meta.json" ]]; then
    echo "== pre-tokenising $EVIDENCE -> $prefix"
    python tools/preprocess_evidence.py --input "$EVIDENCE" --output-prefix "$prefix" --workers "$WORKERS" \
      ${vocab[@]+"${vocab[@]}"} --quiet
  fi
  EVIDENCE=${prefix}_meta.json  # (the commands take a prefix's file, not the bare prefix)
elif [[ -f "${EVIDENCE}_meta.json" ]]; then
  EVIDENCE=${EVIDENCE}_meta.json
elif [[ -f "${EVIDENCE}_text_document.idx" ]]; then  # the original's evidence-wikipedia-indexed-mmap
  EVIDENCE=${EVIDENCE}_text_document.idx
fi

for d in $DATASETS; do
  case $d in
    nq) ckpt=$NQ_CKPT; emb=$NQ_EMB ;;
    trivia) ckpt=$TRIVIA_CKPT; emb=$TRIVIA_EMB ;;
    webq) ckpt=$WEBQ_CKPT; emb=$WEBQ_EMB ;;
    *) echo "unknown dataset '$d' (nq, trivia, webq)" >&2; exit 2 ;;
  esac
  dir=$OUT/$d
  # 2. the checkpoint (retriever towers + reader, sizes and reading recorded in its meta)
  if [[ ! -f "$dir/checkpoint/latest" ]]; then  # written last
    echo "== $d: converting $ckpt"
    python tools/convert_original_emdr2.py --load "$ckpt" --out "$dir/checkpoint" --overwrite ${vocab[@]+"${vocab[@]}"}
  fi
  # 3. the released evidence embeddings as our sharded fp16 index (model step from the file name)
  if [[ ! -e "$dir/index/LATEST" ]]; then
    step=$(basename "$emb" | sed -n 's/.*step\([0-9][0-9]*\).*/\1/p'); step=${step:-0}
    echo "== $d: converting $emb (step $step)"
    python tools/convert_original_embeddings.py --pickle "$emb" --num-shards "$NUM_SHARDS" --model-step "$step" \
      --out "$dir/index/$(printf 'step-%08d' "$step")" --overwrite
  fi
  # 4. test exact match and retrieval accuracy (top-50 read, greedy decoding: from the checkpoint's meta)
  if [[ -f "$dir/test.json" ]]; then
    echo "== $d: $dir/test.json exists (delete it to evaluate again)"
    continue
  fi
  echo "== $d: evaluating on $QAS/$d-test.csv"
  # shellcheck disable=SC2086
  launch tasks.openqa.evaluate --load "$dir/checkpoint" --evidence "$EVIDENCE" --index-dir "$dir/index" \
    --qa-file "$QAS/$d-test.csv" --metrics-out "$dir/test.json" --predictions-file "$dir/test.predictions.jsonl" \
    --eval-top-k-list 1 5 20 50 ${vocab[@]+"${vocab[@]}"} $EVAL_ARGS
done

# 5. ours beside the published numbers (test EM: the original README's table; the paper rounds
#    them to 52.5 / 71.4 / 48.7 in its Table 2)
python - "$OUT" $DATASETS <<'EOF'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
published = {"nq": ("NQ", 52.49), "trivia": ("TriviaQA", 71.43), "webq": ("WebQuestions", 48.67)}
rows = [("dataset", "questions", "published EM", "our EM", "difference", "top-1", "top-5", "top-20", "top-50")]
for d in names:
    m = json.load(open(os.path.join(out, d, "test.json")))
    name, ref = published[d]
    em = 100 * m["em"]
    rows.append((name, str(m["questions"]), f"{ref:.2f}", f"{em:.2f}", f"{em - ref:+.2f}",
                 *(f"{100 * m[k]:.1f}" if k in m else "-" for k in ("top1", "top5", "top20", "top50"))))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
print("\n".join(lines))
with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
EOF
