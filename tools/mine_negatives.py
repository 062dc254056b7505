"""Mine hard negatives for DPR training, and evaluate the BM25 retrieval baseline.

    # BM25 (bm25s), as DPR did: the top passages that hold no answer and are not gold
    python tools/mine_negatives.py bm25 --qa-file data/nq-mini/train.dpr.json \\
        --evidence data/nq-mini/evidence.tsv --output runs/negatives.bm25.json
    # with our own dense index (built by tools/build_index.py from the same retriever)
    python tools/mine_negatives.py dense --checkpoint runs/ict --config runs/ict/retriever_config.json \\
        --index runs/ict-index --qa-file data/nq-mini/train.dpr.json --evidence data/nq-mini/evidence.tsv \\
        --output runs/negatives.dense.json
    # BM25 as a retrieval baseline: top-k answer accuracy on a QA file
    python tools/mine_negatives.py bm25-eval --qa-file data/nq-mini/dev.tsv --evidence data/nq-mini/evidence.tsv

The output (one entry per question of --qa-file, in its order) is read by
``python -m tasks.openqa.dpr --hard-negatives-source file --negatives-file FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KS = (1, 5, 20, 50, 100)


def _load(args):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa

    return load_qa(args.qa_file), load_evidence(args.evidence)


def _summary(negatives) -> str:
    counts = [len(n) for n in negatives]
    return f"{len(counts)} questions, {np.mean(counts) if counts else 0:.1f} negatives each (min {min(counts, default=0)})"


def run_bm25(args) -> None:
    from megatron.emdr2.openqa import negatives as neg

    examples, evidence = _load(args)
    lists = neg.mine_bm25(examples, evidence, args.depth, args.search_depth)
    neg.save_negatives(args.output, examples, lists, "bm25", args.depth)
    print(f"wrote BM25 negatives for {_summary(lists)} to {args.output}")


def run_bm25_eval(args) -> None:
    from megatron.emdr2.openqa.negatives import BM25Retriever
    from megatron.emdr2.openqa.retrieval import first_hit_ranks, top_k_accuracy

    examples, evidence = _load(args)
    _, ids = BM25Retriever(evidence).search([e.question for e in examples], max(KS))
    passages = [evidence.passages(evidence.row_of(line)) for line in ids]
    metrics = {**top_k_accuracy(first_hit_ranks([e.answers for e in examples], passages), KS),
               "questions": len(examples)}
    print(json.dumps(metrics))
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(metrics, indent=1))


def run_dense(args) -> None:
    import torch.distributed as dist

    from megatron.emdr2 import initialize
    from megatron.emdr2.data.inputs import encode_query
    from megatron.emdr2.index import ShardedIndex
    from megatron.emdr2.openqa import negatives as neg
    from tools.build_index import load_retriever

    launch = initialize.initialize(tensor_parallel=1, seed=args.seed)
    try:
        device = initialize.device()
        model, tok, _ = load_retriever(args.checkpoint, args.config)
        model = model.to(device)
        examples, evidence = _load(args)
        index = ShardedIndex.load(args.index, device=device)
        world, rank = launch.world_size, launch.rank
        lo, hi = len(examples) * rank // world, len(examples) * (rank + 1) // world

        @torch.inference_mode()
        def search(questions, k):
            ids, mask = encode_query(tok, questions, args.max_seq_length, pad_to="longest")
            return index.search(model.embed_queries(ids.to(device), mask.to(device)).float(), k)

        # Every rank runs the same number of (collective) searches, some possibly empty.
        per_rank = -(-len(examples) // world)
        mine = list(examples[lo:hi])
        lists = []
        for a in range(0, per_rank, args.batch_size):
            part = mine[a:a + args.batch_size]
            _, ids = search([e.question for e in part] or [""], args.search_depth)
            if part:
                lists += neg.filter_negatives(part, ids.cpu().numpy()[:len(part)], evidence, args.depth)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, lists)
            lists = [x for p in parts for x in p]
        if rank == 0:
            neg.save_negatives(args.output, examples, lists, "dense", args.depth)
            print(f"wrote dense negatives for {_summary(lists)} to {args.output}")
    finally:
        initialize.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, output: bool = True):
        sp.add_argument("--qa-file", required=True, help="DPR biencoder json, or a QA file with gold passage ids")
        sp.add_argument("--evidence", required=True)
        if output:
            sp.add_argument("--output", required=True, help="mined-negatives JSON")
            sp.add_argument("--depth", type=int, default=20, help="negatives kept per question")
            sp.add_argument("--search-depth", type=int, default=100, help="passages searched per question")

    common(sub.add_parser("bm25", help="BM25 hard negatives (bm25s)"))
    dense = sub.add_parser("dense", help="hard negatives from a dense index")
    common(dense)
    dense.add_argument("--checkpoint", required=True, help="retriever (formats of tools/build_index.py)")
    dense.add_argument("--config", default=None, help="retriever_config.json for a training checkpoint")
    dense.add_argument("--index", required=True, help="index built with that retriever (root or version)")
    dense.add_argument("--max-seq-length", type=int, default=256)
    dense.add_argument("--batch-size", type=int, default=128)
    dense.add_argument("--seed", type=int, default=1234)
    ev = sub.add_parser("bm25-eval", help="top-k answer accuracy of BM25 (a retrieval baseline)")
    common(ev, output=False)
    ev.add_argument("--metrics-out", default=None)
    args = p.parse_args(argv)

    from megatron.emdr2.data.errors import DataError
    from megatron.emdr2.index.shard_store import IndexStoreError
    from tools.build_index import RetrieverLoadError

    try:
        {"bm25": run_bm25, "dense": run_dense, "bm25-eval": run_bm25_eval}[args.command](args)
    except (DataError, IndexStoreError, RetrieverLoadError, KeyError, ValueError) as e:
        print(f"mine_negatives: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
