#!/usr/bin/env bash
# A finished quickstart run's ICT, MSS and EMDR² checkpoints on the second dev set: the NQ-open
# dev questions outside nq-mini's train and dev (tools/heldout_questions.py). It is a *second dev
# set*, not a held-out test: the quickstart's --retriever-anchor-weight was chosen on it.
#   bash examples/quickstart_second_dev.sh RUN [NQ_OPEN_DEV_JSONL]
# Writes RUN/second_dev.tsv and RUN/<stage>.second_dev.json; prints one line per stage.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: quickstart_second_dev.sh RUN [NQ-open.dev.jsonl]}
NQ_OPEN=${2:-../shared/data/nq-open/NQ-open.dev.jsonl}
for f in "$RUN/index" "$RUN/emdr2" "$NQ_OPEN"; do
  [[ -e "$f" ]] || { echo "quickstart_second_dev: error: $f: no such file or directory" >&2; exit 2; }
done
export PYTHONWARNINGS=ignore
python tools/heldout_questions.py --nq-open "$NQ_OPEN" --output "$RUN/second_dev.tsv" >&2
for s in ict mss emdr2; do
  # The context tower is ICT's in every stage (MSS and EMDR² freeze it): one index serves all three.
  python -m tasks.openqa.evaluate --load "$RUN/$s" --index-dir "$RUN/index" --evidence data/nq-mini/evidence.tsv \
    --qa-file "$RUN/second_dev.tsv" --seed 1234 --metrics-out "$RUN/$s.second_dev.json" > "$RUN/$s.second_dev.log" 2>&1 \
    || { tail -n 5 "$RUN/$s.second_dev.log" >&2; exit 1; }
  echo "$s: $(cat "$RUN/$s.second_dev.json")"
done
