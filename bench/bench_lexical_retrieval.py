"""How far retrievers that use no labels and no trained model get on nq-mini: TF-IDF and LSA.

Both are built from the evidence alone (BERT WordPiece tokens, the bundled vocab), so they show
what an unsupervised retriever of this corpus can reach without any training on questions:

  tfidf        sparse TF-IDF vectors, cosine similarity
  lsa-<d>      the TF-IDF matrix cut to d dimensions by a truncated SVD; a text is the
               idf-weighted (or plain) mean of its tokens' d-dimensional vectors, scored by
               cosine or by dot product; "normed idf" first centres and normalises each token
               vector, as the LayerNorm of tools/init_lexical_retriever.py's tower does

A hit is a passage among the first k that contains an answer string (the project's
`has_answer`, as every top-k here). Prints one row per retriever.

    python bench/bench_lexical_retrieval.py --qa-file data/nq-mini/dev.tsv --dims 256
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.emdr2.data.answers import has_answer  # noqa: E402
from megatron.emdr2.data.tokenizer import default_vocab_file  # noqa: E402


def bag_of_tokens(encodings, vocab_size: int) -> sp.csr_matrix:
    rows, cols = [], []
    for i, e in enumerate(encodings):
        rows.extend([i] * len(e.ids))
        cols.extend(e.ids)
    return sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(encodings), vocab_size))


def l2_rows(m):
    if sp.issparse(m):
        norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel()) + 1e-9
        return sp.diags(1 / norms) @ m
    return m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-9)


def l1_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    return sp.diags(1 / (np.asarray(m.sum(1)).ravel() + 1e-9)) @ m


def top_k_accuracy(scores, texts, answers, ks=(1, 5, 20)) -> dict:
    order = np.argsort(-np.asarray(scores), axis=1)[:, :max(ks)]
    hits = np.array([[has_answer(answers[q], texts[j]) for j in row] for q, row in enumerate(order)])
    return {k: float(hits[:, :k].any(1).mean()) for k in ks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evidence", default=str(ROOT / "data" / "nq-mini" / "evidence.tsv"))
    p.add_argument("--qa-file", default=str(ROOT / "data" / "nq-mini" / "dev.tsv"))
    p.add_argument("--dims", type=int, nargs="+", default=[256])
    args = p.parse_args(argv)

    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(default_vocab_file(), lowercase=True)
    with open(args.evidence, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [r[1] for r in rows]
    with open(args.qa_file) as f:
        qa = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    answers = [json.loads(a) for _, a in qa]
    vocab = tok.get_vocab_size()
    X = bag_of_tokens(tok.encode_batch([r[2] + " " + r[1] for r in rows], add_special_tokens=False), vocab)
    Q = bag_of_tokens(tok.encode_batch([q for q, _ in qa], add_special_tokens=False), vocab)
    df = np.asarray((X > 0).sum(0)).ravel()
    idf = np.log((1 + X.shape[0]) / (1 + df)) + 1
    Xt, Qt = X.multiply(idf).tocsr(), Q.multiply(idf).tocsr()

    results = [("tfidf", "cosine", top_k_accuracy((l2_rows(Qt) @ l2_rows(Xt).T).toarray(), texts, answers))]
    for d in args.dims:
        _, s, vt = svds(l2_rows(Xt), k=d)
        token_vectors = vt.T * np.sqrt(s)
        for weighting, (q, x) in (("plain mean", (Q, X)), ("idf mean", (Qt, Xt))):
            qv, xv = l1_rows(q) @ token_vectors, l1_rows(x) @ token_vectors
            results.append((f"lsa-{d} {weighting}", "dot", top_k_accuracy(qv @ xv.T, texts, answers)))
            results.append((f"lsa-{d} {weighting}", "cosine",
                            top_k_accuracy(l2_rows(qv) @ l2_rows(xv).T, texts, answers)))
        # What tools/init_lexical_retriever.py's tower computes: each token vector centred and
        # normalised (its LayerNorm), then the idf-weighted mean, scored by cosine.
        centred = token_vectors - token_vectors.mean(1, keepdims=True)
        normed = l2_rows(centred)
        qv, xv = l1_rows(Qt) @ normed, l1_rows(Xt) @ normed
        results.append((f"lsa-{d} normed idf", "cosine", top_k_accuracy(l2_rows(qv) @ l2_rows(xv).T, texts, answers)))
    print(f"{len(qa)} questions, {len(rows)} passages")
    print(f"{'retriever':<22}{'score':>8}{'top1':>8}{'top5':>8}{'top20':>8}")
    for name, score, acc in results:
        print(f"{name:<22}{score:>8}" + "".join(f"{acc[k]:>8.3f}" for k in (1, 5, 20)))


if __name__ == "__main__":
    main()
