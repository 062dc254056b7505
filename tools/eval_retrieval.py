"""Evaluate retrieval: top-k answer accuracy of an index on a QA file, DPR style.

    python tools/eval_retrieval.py --checkpoint PATH --index runs/index --evidence data/nq-mini/evidence.tsv \
        --qa-file data/nq-mini/dev.tsv --metrics-out metrics.json --output retrieved.json
    torchrun --nproc-per-node 4 tools/eval_retrieval.py ...   # the index sharded over 4 ranks

A question counts as answered at k when one of its first k passages contains an answer
(the shared ``has_answer``: DPR's tokenised string match, or --match regex), on the passage text
as DPR does. --metrics-out writes {"top1", "top5", "top20", "top50", "top100", "questions"} (with
--topk K below 100: only the k <= K, and top{K});
--output writes, per question, {"question", "answers", "ctxs": [{"id", "title", "text", "score",
"has_answer"}]} (DPR's retriever output). The query tower comes from --checkpoint (the same
formats as tools/build_index.py); --backend faiss searches a FAISS file instead (one process).
An index whose manifest says another context tower embedded it is refused (exit 2) unless
--allow-index-mismatch; one without a recorded fingerprint is searched with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.build_index import RetrieverLoadError, add_retriever_args, load_retriever  # noqa: E402

KS = (1, 5, 20, 50, 100)


def embed_questions(model, tok, questions, max_len: int, batch_size: int, device) -> torch.Tensor:
    from megatron.emdr2.data.inputs import encode_query

    out = []
    with torch.inference_mode():
        for a in range(0, len(questions), batch_size):
            ids, mask = encode_query(tok, questions[a:a + batch_size], max_len, pad_to="longest")
            out.append(model.embed_queries(ids.to(device), mask.to(device)).float())
    return torch.cat(out) if out else torch.empty(0, model.query_tower.hidden_size, device=device)


def hit_matrix(examples, ids: np.ndarray, evidence, mode: str) -> np.ndarray:
    """[Q, k] bool: does retrieved passage j of question i contain one of its answers."""
    from megatron.emdr2.data.answers import has_answer

    rows = evidence.row_of(ids.reshape(-1)).reshape(ids.shape)
    return np.array([[has_answer(ex.answers, evidence.text(int(r)), mode) for r in line]
                     for ex, line in zip(examples, rows)], dtype=bool).reshape(ids.shape)


def report_ks(depth: int, ks=KS) -> tuple[int, ...]:
    """The k reported for a search of ``depth`` passages: only k <= depth (a top-100 read off a
    top-5 search would just repeat top-5), plus the depth itself."""
    return tuple(sorted({k for k in ks if k <= depth} | {depth}))


def accuracy(hits: np.ndarray, ks=KS) -> dict:
    """top{k}: fraction of questions with a hit among the first k; every k must be <= the
    search depth (hits.shape[1]) when there are questions."""
    if len(hits) and max(ks) > hits.shape[1]:
        raise ValueError(f"top{max(ks)} asked of a search {hits.shape[1]} deep")
    first = np.where(hits.any(1), hits.argmax(1) + 1, 0)
    out = {f"top{k}": float(np.mean((first > 0) & (first <= k))) if len(first) else 0.0 for k in ks}
    out["questions"] = int(len(first))
    return out


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def dpr_records(examples, ids, scores, hits, evidence) -> list[dict]:
    rows = evidence.row_of(ids.reshape(-1)).reshape(ids.shape)
    return [{"question": ex.question, "answers": ex.answers,
             "ctxs": [{"id": str(int(i)), "title": evidence.title(int(r)), "text": evidence.text(int(r)),
                       "score": float(s), "has_answer": bool(h)}
                      for i, r, s, h in zip(id_line, row_line, s_line, h_line)]}
            for ex, id_line, row_line, s_line, h_line in zip(examples, ids, rows, scores, hits)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_retriever_args(p)
    p.add_argument("--index", required=True, help="index root (its LATEST) or version directory")
    p.add_argument("--evidence", required=True)
    p.add_argument("--qa-file", required=True, help="DPR/EMDR2 tsv, NQ-open jsonl, DPR/FiD json, ...")
    p.add_argument("--topk", type=int, default=100, help="passages retrieved per question")
    p.add_argument("--match", choices=["string", "regex"], default="string")
    p.add_argument("--metrics-out", default=None)
    p.add_argument("--output", default=None, help="DPR-style per-question results (json)")
    p.add_argument("--backend", choices=["sharded", "faiss"], default="sharded")
    p.add_argument("--faiss-index", default=None, help="FAISS file (default: INDEX_VERSION/faiss.index)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip shard checksums (sizes still checked)")
    p.add_argument("--allow-index-mismatch", action="store_true",
                   help="search the index even if another context tower embedded it (warning only)")
    args = p.parse_args(argv)
    from megatron.emdr2.arguments import fail

    if args.topk < 1:
        fail(f"--topk must be >= 1, got {args.topk}", "eval_retrieval")
    if args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}", "eval_retrieval")
    if args.max_seq_length < 1:
        fail(f"--max-seq-length must be >= 1, got {args.max_seq_length}", "eval_retrieval")
    if args.threads:
        torch.set_num_threads(args.threads)

    import torch.distributed as dist

    from megatron.emdr2 import initialize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.index import ShardedIndex, fingerprint, shard_store

    launch = initialize.initialize(tensor_parallel=1, seed=args.seed)
    try:
        device = initialize.device()
        model, tok, _ = load_retriever(args.checkpoint, args.config, args.random_init, args.seed)
        model = model.to(device)
        # Was the index embedded by this retriever's context tower? (before any search)
        fingerprint.check(shard_store.read_manifest(args.index), fingerprint.tower_fingerprint(model.context_encoder),
                          f"checkpoint {args.checkpoint}", args.allow_index_mismatch)
        examples = load_qa(args.qa_file)
        evidence = load_evidence(args.evidence)
        world, rank = launch.world_size, launch.rank
        lo, hi = len(examples) * rank // world, len(examples) * (rank + 1) // world  # my questions
        max_len = min(args.max_seq_length, model.query_tower.max_sequence_length)
        q = embed_questions(model, tok, [e.question for e in examples[lo:hi]], max_len, args.batch_size, device)
        if args.backend == "faiss":
            from megatron.emdr2.index.faiss_backend import FaissIndex

            if world > 1:
                raise ValueError("--backend faiss runs in one process")
            path = args.faiss_index or shard_store.resolve(args.index) / "faiss.index"
            scores, ids = FaissIndex.load(path, args.nprobe).search(q, args.topk)
        else:
            index = ShardedIndex.load(args.index, device=device, verify=not args.no_verify)
            if index.dim != q.shape[1]:
                raise ValueError(f"{args.index}: index dim {index.dim} != query tower width {q.shape[1]}")
            scores, ids = index.search(q, args.topk)  # collective: each rank its own questions
        parts = [(scores.cpu(), ids.cpu())]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (scores.cpu(), ids.cpu()))
        if rank == 0:
            scores = torch.cat([s for s, _ in parts]).numpy()
            ids = torch.cat([i for _, i in parts]).numpy()
            hits = hit_matrix(examples, ids, evidence, args.match)
            depth = ids.shape[1] if len(ids) else args.topk  # fewer when the index has fewer rows
            metrics = accuracy(hits, report_ks(depth))
            print(json.dumps(metrics))
            if args.metrics_out:
                _atomic_json(args.metrics_out, metrics)
            if args.output:
                _atomic_json(args.output, dpr_records(examples, ids, scores, hits, evidence))
    except (RetrieverLoadError, shard_store.IndexStoreError, ValueError, FileNotFoundError) as e:
        print(f"eval_retrieval: error: {e}", file=sys.stderr)
        return 2
    finally:
        initialize.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
