"""Held-out NQ questions for nq-mini: NQ-open questions that nq-mini neither trains nor selects on.

    python tools/heldout_questions.py --nq-open NQ-open.dev.jsonl --output heldout.tsv

nq-mini's 2,248 train and dev questions are all NQ-open dev questions. This keeps the other
NQ-open questions whose answer (any gold string, DPR's token match) occurs in at least 1 and at
most --max-passages of the nq-mini evidence passages: the answer is then in a specific passage of
the corpus, not a common word or number that many passages happen to contain. The result is a
proxy for the held-out split that nq-mini's README mentions (same evidence, same QA layout as
data/nq-mini/dev.tsv), for judging a run on questions it never saw. Written atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from megatron.emdr2.data.answers import simple_tokens

NQ_MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "nq-mini")


def fail(message: str) -> None:
    print(f"heldout_questions: error: {message}", file=sys.stderr)
    sys.exit(2)


def _padded(text: str) -> str:
    return " " + " ".join(simple_tokens(text)) + " "


def seen_questions(paths) -> set[str]:
    seen = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen.add(line.split("\t", 1)[0].strip().lower())
    return seen


def claimed_passages(paths) -> set[str]:
    """Evidence ids that are the gold passage of a question in ``paths``."""
    out = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.add(str(json.loads(line)["gold_passage_id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    fail(f"{path}:{n}: expected a JSON object with \"gold_passage_id\"")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="heldout_questions", description=__doc__.split("\n")[0])
    parser.add_argument("--nq-open", required=True, help="NQ-open jsonl ({question, answer: [...]} per line)")
    parser.add_argument("--evidence", default=os.path.join(NQ_MINI, "evidence.tsv"))
    parser.add_argument("--exclude", nargs="+",
                        default=[os.path.join(NQ_MINI, "train.tsv"), os.path.join(NQ_MINI, "dev.tsv")],
                        help="QA tsv files whose questions are left out")
    parser.add_argument("--max-passages", type=int, default=3)
    parser.add_argument("--unclaimed-only", action="store_true",
                        help="look for the answer only in passages that are not the gold passage of a "
                             "--claimed question: nq-mini's splits are made by gold passage, so the held-out "
                             "split's gold passages are among these")
    parser.add_argument("--claimed", nargs="+",
                        default=[os.path.join(NQ_MINI, "train.jsonl"), os.path.join(NQ_MINI, "dev.jsonl")],
                        help="jsonl files with gold_passage_id (for --unclaimed-only)")
    parser.add_argument("--output", required=True, help="QA tsv: question<TAB>[answers]")
    args = parser.parse_args(argv)
    for path in [args.nq_open, args.evidence, *args.exclude, *(args.claimed if args.unclaimed_only else [])]:
        if not os.path.isfile(path):
            fail(f"{path}: no such file")
    if args.max_passages < 1:
        fail("--max-passages must be >= 1")

    seen = seen_questions(args.exclude)
    csv.field_size_limit(1 << 30)
    with open(args.evidence, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows, None)  # header
        table = [row for row in rows if len(row) >= 2]
    claimed = claimed_passages(args.claimed) if args.unclaimed_only else set()
    passages = [_padded(row[1]) for row in table if row[0].strip() not in claimed]
    kept = []
    with open(args.nq_open, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answers = record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                fail(f"{args.nq_open}:{n}: expected a JSON object with \"question\" and \"answer\"")
            if not isinstance(answers, list) or not question.strip():
                fail(f"{args.nq_open}:{n}: \"answer\" must be a list and \"question\" non-empty")
            if question.strip().lower() in seen:
                continue
            golds = [g for g in (_padded(a) for a in answers) if g.strip()]
            hits = sum(1 for p in passages if any(g in p for g in golds))
            if 1 <= hits <= args.max_passages:
                kept.append((question, answers))
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for question, answers in kept:
            f.write(f"{question}\t{json.dumps(answers, ensure_ascii=False)}\n")
    os.replace(tmp, args.output)
    print(f"{len(kept)} held-out questions -> {args.output}")


if __name__ == "__main__":
    main()
