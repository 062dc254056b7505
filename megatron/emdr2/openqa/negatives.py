"""Hard negatives for DPR training: BM25 (as DPR did) or the project's own dense index.

A hard negative of a question is a highly ranked passage that is not one of its gold passages
and does not contain any of its answers (DPR's ``has_answer`` string match). Both miners return,
per question, up to ``depth`` evidence ids in rank order; training samples N of them per epoch.

BM25 is ``bm25s`` (Lucene-style scoring, k1=0.9, b=0.4 as in Pyserini/Anserini, which DPR used),
over "title text" with English stop words removed; it also serves as the retrieval baseline
(``tools/mine_negatives.py bm25-eval``).

The mined-negatives file (``save_negatives``/``load_negatives``) is JSON:
``{"method": ..., "depth": ..., "questions": [{"question": ..., "negatives": [id, ...]}, ...]}``
in the order of the QA file it was mined for.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from megatron.emdr2.data.answers import has_answer
from megatron.emdr2.data.errors import DataError


def _bm25_tokens(texts: Sequence[str], show_progress: bool = False):
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", show_progress=show_progress)


class BM25Retriever:
    """BM25 over the evidence passages (``bm25s``); ``search`` returns evidence ids."""

    def __init__(self, evidence, k1: float = 0.9, b: float = 0.4, show_progress: bool = False):
        import bm25s

        self.evidence = evidence
        self.show_progress = show_progress
        texts = [f"{evidence.title(r)} {evidence.text(r)}" for r in range(len(evidence))]
        self.model = bm25s.BM25(k1=k1, b=b)
        self.model.index(_bm25_tokens(texts, show_progress), show_progress=show_progress)

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], evidence ids [Q, k]) by BM25 score; k is capped at the corpus size."""
        import bm25s

        k = min(k, len(self.evidence))
        # Query words unseen in the corpus are dropped by bm25s (tokenised as strings).
        tokens = bm25s.tokenize(list(questions), stopwords="en", return_ids=False, show_progress=False)
        tokens = [t if t else ["[empty]"] for t in tokens]
        rows, scores = self.model.retrieve(tokens, k=k, show_progress=self.show_progress, n_threads=1)
        return np.asarray(scores, dtype=np.float32), self.evidence.ids[np.asarray(rows, dtype=np.int64)]


def filter_negatives(examples, candidate_ids: np.ndarray, evidence, depth: int,
                     match: str = "string") -> list[list[int]]:
    """Per question, the first ``depth`` candidates that are not gold and hold no answer."""
    out = []
    for ex, line in zip(examples, np.asarray(candidate_ids)):
        gold = set(ex.gold_passage_ids or ())
        line = line[line >= 0]
        keep = []
        for pid, row in zip(line.tolist(), evidence.row_of(line).tolist()):
            if pid in gold:
                continue
            if has_answer(ex.answers, evidence.text(row), match):
                continue
            keep.append(int(pid))
            if len(keep) == depth:
                break
        out.append(keep)
    return out


def mine_bm25(examples, evidence, depth: int = 20, search_depth: int = 100,
              retriever: Optional[BM25Retriever] = None) -> list[list[int]]:
    """DPR's BM25 hard negatives: top BM25 passages without an answer."""
    retriever = retriever or BM25Retriever(evidence)
    _, ids = retriever.search([e.question for e in examples], max(search_depth, depth))
    return filter_negatives(examples, ids, evidence, depth)


def mine_dense(examples, evidence, search, depth: int = 20, search_depth: int = 100,
               batch_size: int = 256) -> list[list[int]]:
    """Hard negatives from a dense index: ``search(questions, k) -> (scores, ids)`` (a tensor or
    array of evidence ids), e.g. a retriever's query tower over a ShardedIndex."""
    lines = []
    for a in range(0, len(examples), batch_size):
        _, ids = search([e.question for e in examples[a:a + batch_size]], max(search_depth, depth))
        lines.append(ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids))
    if not lines:
        return []
    return filter_negatives(examples, np.concatenate(lines), evidence, depth)


def save_negatives(path: str, examples, negatives: list[list[int]], method: str, depth: int) -> None:
    """Write the mined negatives (atomically: a temporary name, then rename)."""
    if len(examples) != len(negatives):
        raise ValueError(f"{len(examples)} questions but {len(negatives)} negative lists")
    doc = {"method": method, "depth": depth,
           "questions": [{"question": e.question, "negatives": n} for e, n in zip(examples, negatives)]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    os.replace(tmp, path)


def load_negatives(path: str, examples) -> list[list[int]]:
    """Negatives mined for exactly these questions (same order), checked question by question."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        items = doc["questions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(path, None, f"not a mined-negatives file ({type(e).__name__}: {e})") from None
    if len(items) != len(examples):
        raise DataError(path, None, f"has {len(items)} questions, the training data has {len(examples)} "
                                    f"(mined for another file?)")
    for i, (item, ex) in enumerate(zip(items, examples)):
        if not isinstance(item, dict) or item.get("question") != ex.question:
            got = item.get("question") if isinstance(item, dict) else item
            raise DataError(path, f"question {i}", f"is {got!r}, the training data has {ex.question!r} "
                                                   f"(mined for another file?)")
    return [[int(x) for x in item.get("negatives", [])] for item in items]
