"""The retriever's confidence before and after fine-tuning (the paper's Table 10).

    python tools/retrieval_confidence.py --before $RUN/mss --after $RUN/emdr2 \
        --evidence data/nq-mini/evidence.tsv --qa-file data/nq-mini/dev.tsv --questions 5
    python tools/retrieval_confidence.py ... --question "who got the first nobel prize in physics"

For each question, each checkpoint retrieves its top-K passages (exact search of an index its own
context tower embedded) and scores them as training does: p(z|q) = softmax over the K of the
scaled inner products of the query and the re-embedded passages (``BiEncoder.score``). Printed per
question: each checkpoint's top-1 passage (title, a snippet, whether it contains an answer) with
its probability, the other checkpoint's probability of that passage when it is in its top-K, and
the probability mass on the passages that contain an answer. A closing line averages p(top-1)
and that mass over the questions. --json-out writes every question's K ids, probabilities and
answer hits (atomically).

Checkpoints are anything tools/build_index.py reads (a training run's directory, a BiEncoder .pt,
a Hugging Face BERT directory). Each needs an index of the evidence embedded by its own context
tower: --before-index / --after-index name built ones (checked by fingerprint); otherwise they are
built with tools/build_index.py under --work-dir (kept and reused when given; a temporary
directory otherwise). --top-k and the query/passage lengths default to what the --after run
recorded (its top_k, query_max_len, context_max_len), else 50 and 256.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "retrieval_confidence"


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="retriever checkpoint before fine-tuning (e.g. the MSS run)")
    p.add_argument("--after", required=True, help="retriever checkpoint after fine-tuning (e.g. the EMDR² run)")
    p.add_argument("--evidence", required=True)
    p.add_argument("--qa-file", required=True, help="questions with gold answers (any QA format the loaders read)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--questions", type=int, default=None, help="the first N questions of --qa-file (default 5)")
    which.add_argument("--question", action="append", default=None,
                       help="a question (repeatable); its answers are taken from --qa-file when it is there")
    p.add_argument("--top-k", type=int, default=None, help="passages p(z|q) is over (default: the --after run's)")
    p.add_argument("--before-index", default=None, help="an index the --before tower embedded (else built)")
    p.add_argument("--after-index", default=None, help="an index the --after tower embedded (else built)")
    p.add_argument("--work-dir", default=None, help="where to build (and later reuse) the indexes")
    p.add_argument("--query-max-len", type=int, default=None)
    p.add_argument("--context-max-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--snippet", type=int, default=100, help="characters of each passage shown")
    p.add_argument("--allow-index-mismatch", action="store_true")
    p.add_argument("--json-out", default=None)
    return p


def checkpoint_meta(path: str) -> dict:
    """The run's recorded settings (top_k, query/context lengths), {} for a file or foreign dir."""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "latest")):
        return {}
    from megatron.emdr2.openqa.builders import PretrainedError, load_checkpoint_meta

    try:
        return load_checkpoint_meta(path)
    except PretrainedError as e:
        fail(str(e))


def select_questions(args) -> list:
    from megatron.emdr2.data.qa import QAExample, load_qa

    examples = list(load_qa(args.qa_file))
    if args.question:
        by_text = {e.question.strip().lower(): e for e in examples}
        return [by_text.get(q.strip().lower(), QAExample(q, [])) for q in args.question]
    n = 5 if args.questions is None else args.questions
    return examples[:n]


def ensure_index(checkpoint: str, given: str | None, root: Path, name: str, args, context_len: int) -> str:
    """The index to search for ``checkpoint``: ``given``, or one built (once) under ``root``."""
    from megatron.emdr2.index import shard_store
    from tools import build_index

    if given:
        return given
    out = root / f"{name}-index"
    try:
        shard_store.resolve(out)
        return str(out)  # built by an earlier call with this --work-dir (the fingerprint check vets it)
    except shard_store.IndexStoreError:
        pass
    argv = ["--checkpoint", checkpoint, "--evidence", args.evidence, "--output", str(out), "--no-progress-bar",
            "--max-seq-length", str(context_len), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    with contextlib.redirect_stdout(sys.stderr):  # its "published ..." is a log line, not the table
        status = build_index.main(argv)
    if status != 0:  # it printed the one-line reason
        sys.exit(2)
    return str(out)


@torch.no_grad()
def retrieve(checkpoint: str, index_path: str, examples, evidence, k: int, query_len: int, context_len: int,
             args) -> dict:
    """Top-k ids [Q, k], p(z|q) [Q, k] and answer hits [Q, k] of one checkpoint (megatron initialised)."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.data.inputs import encode_context
    from megatron.emdr2.index import ShardedIndex, fingerprint, shard_store
    from tools.build_index import load_retriever
    from tools.eval_retrieval import embed_questions, hit_matrix

    device = initialize.device()
    model, tok, _ = load_retriever(checkpoint, None, False, args.seed)
    model = model.to(device)
    fingerprint.check(shard_store.read_manifest(index_path), fingerprint.tower_fingerprint(model.context_encoder),
                      f"checkpoint {checkpoint}", args.allow_index_mismatch)
    index = ShardedIndex.load(index_path, device=device)
    q = embed_questions(model, tok, [e.question for e in examples],
                        min(query_len, model.query_tower.max_sequence_length), args.batch_size, device)
    if index.dim != q.shape[1]:
        raise ValueError(f"{index_path}: index dim {index.dim} != query tower width {q.shape[1]}")
    _, ids = index.search(q, k)
    ids = ids.cpu().numpy()
    rows = evidence.row_of(ids.reshape(-1))
    # p(z|q) as training scores the retrieved passages: re-embedded by the context tower, fp32 scores
    c_ids, c_mask = encode_context(tok, [(evidence.title(int(r)), evidence.text(int(r))) for r in rows],
                                   min(context_len, model.context_encoder.max_sequence_length), pad_to="longest")
    bs = args.batch_size
    c = torch.cat([model.embed_contexts(c_ids[a:a + bs].to(device), c_mask[a:a + bs].to(device))
                   for a in range(0, len(rows), bs)])
    probs = torch.softmax(model.score(q, c.view(len(examples), ids.shape[1], -1)), dim=-1).cpu().numpy()
    hits = hit_matrix(examples, ids, evidence, "string")
    return {"checkpoint": checkpoint, "index": index_path, "ids": ids, "probs": probs, "hits": hits}


def question_records(examples, evidence, before: dict, after: dict) -> list[dict]:
    out = []
    for i, ex in enumerate(examples):
        rec = {"question": ex.question, "answers": list(ex.answers)}
        for name, res, other in (("before", before, after), ("after", after, before)):
            top = int(res["ids"][i, 0])
            row = int(evidence.row_of([top])[0])
            in_other = np.nonzero(other["ids"][i] == top)[0]
            rec[name] = {
                "top1": {"id": top, "title": evidence.title(row), "text": evidence.text(row),
                         "p": float(res["probs"][i, 0]), "has_answer": bool(res["hits"][i, 0]),
                         "p_other": float(other["probs"][i, in_other[0]]) if len(in_other) else None,
                         "rank_other": int(in_other[0]) + 1 if len(in_other) else None},
                "ids": [int(x) for x in res["ids"][i]], "probs": [float(x) for x in res["probs"][i]],
                "has_answer": [bool(x) for x in res["hits"][i]],
                "p_answer": float(res["probs"][i][res["hits"][i]].sum())}
        out.append(rec)
    return out


def print_records(records: list[dict], before: str, after: str, k: int, snippet: int) -> None:
    width = max(len("before"), len("after"))
    print(f"Table 10: the retriever's top-1 passage and p(z|q) over its top-{k}, before ({before}) and "
          f"after ({after})")
    for n, r in enumerate(records, 1):
        answers = "; ".join(r["answers"][:3]) if r["answers"] else "no gold answers"
        print(f"\nQ{n}: {r['question']}   [{answers}]")
        for name, other in (("before", "after"), ("after", "before")):
            t = r[name]["top1"]
            text = " ".join(t["text"].split())
            text = text if len(text) <= snippet else text[:snippet].rstrip() + "..."
            cross = (f"under {other}: p={t['p_other']:.3f} (its rank {t['rank_other']})" if t["p_other"] is not None
                     else f"not in {other}'s top-{k}")
            print(f"  {name:<{width}}  p={t['p']:.3f}  {'answer' if t['has_answer'] else 'no answer':<9}  "
                  f"[{t['id']}] {t['title']}: {text}")
            print(f"  {'':<{width}}  {cross}; p(passages with an answer) {r[name]['p_answer']:.3f}")
    if records:
        mean = {name: (np.mean([r[name]["top1"]["p"] for r in records]),
                       np.mean([r[name]["p_answer"] for r in records])) for name in ("before", "after")}
        print(f"\nmean over {len(records)} questions: p(top-1) {mean['before'][0]:.3f} -> {mean['after'][0]:.3f}; "
              f"p(passages with an answer) {mean['before'][1]:.3f} -> {mean['after'][1]:.3f}")


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, path in (("--before", args.before), ("--after", args.after), ("--evidence", args.evidence),
                       ("--qa-file", args.qa_file), ("--before-index", args.before_index),
                       ("--after-index", args.after_index)):
        if path and not os.path.exists(path):
            fail(f"{flag} {path}: no such file or directory")
    for flag, value in (("--questions", args.questions), ("--top-k", args.top_k), ("--batch-size", args.batch_size),
                        ("--query-max-len", args.query_max_len), ("--context-max-len", args.context_max_len)):
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = checkpoint_meta(args.after)
    k = args.top_k or int(meta.get("top_k", 50))
    query_len = args.query_max_len or int(meta.get("query_max_len", 256))
    context_len = args.context_max_len or int(meta.get("context_max_len", 256))

    from megatron.emdr2 import initialize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.index import shard_store
    from megatron.emdr2.training.launch import _user_errors
    from tools.build_index import RetrieverLoadError

    errors = (RetrieverLoadError, shard_store.IndexStoreError, ValueError, KeyError, OSError, *_user_errors())
    try:
        examples = select_questions(args)
        if not examples:
            fail(f"--qa-file {args.qa_file}: no questions selected")
        evidence = load_evidence(args.evidence)
    except errors as e:
        fail(str(e))
    with tempfile.TemporaryDirectory(prefix="retrieval-confidence-") as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        indexes = {"before": ensure_index(args.before, args.before_index, root, "before", args, context_len),
                   "after": ensure_index(args.after, args.after_index, root, "after", args, context_len)}
        initialize.initialize(tensor_parallel=1, seed=args.seed)
        try:
            results = {name: retrieve(getattr(args, name), indexes[name], examples, evidence, k, query_len,
                                      context_len, args) for name in ("before", "after")}
        except errors as e:
            fail(str(e))
        finally:
            initialize.shutdown()
    records = question_records(examples, evidence, results["before"], results["after"])
    print_records(records, args.before, args.after, min(k, results["after"]["ids"].shape[1]), args.snippet)
    if args.json_out:
        _atomic_json(args.json_out, {"before": args.before, "after": args.after, "top_k": k, "questions": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
