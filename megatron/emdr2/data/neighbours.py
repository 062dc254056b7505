"""Neighbouring passages of the same article: the reader context of the original EMDR².

The original's reader does not read a retrieved passage alone: `postprocess` in its
megatron/model/emdr2_model.py asks `WikiTitleDocMap.get_neighbour_paragraphs` (its
tools/inverted_title_index.py) for the passage's window in its article and fills the reader's
512 tokens from that window (`query_extended_context_t5_format`). Both are mirrored here:

* An *article* is every evidence passage with the same title string (the original's
  `title2ids[title].append(doc_id)` over psgs_w100.tsv: same title anywhere in the file, not
  only in consecutive rows), its passages ordered by id (the original appends in file order and
  bisects, which assumes ascending ids, as psgs_w100.tsv has).
* The window of the passage at position i of an article of n passages (its doc_row), with the
  index of the passage itself in the window ("main"):
    i == 0            doc_row[0:3]           main 0   (the passage and the next two)
    i == n-1 (n > 1)  doc_row[i-2:i+1]       main -1  (the two before it and the passage);
                      for n == 2 Python's doc_row[-1:2] is [the passage] alone, so the last
                      passage of a two-passage article gets no neighbour (mirrored as is)
    otherwise         doc_row[i-1:i+2]       main 1   (one before, the passage, one after)
* `extend_context` is `prepare_context_ids` of `query_extended_context_t5_format`, line for line,
  off-by-ones included (a cut-from-the-left neighbour keeps room - 1 tokens).

The map is held in arrays, never in per-passage Python objects (the evidence has 21M rows):
``starts`` (int64, one entry per article plus one: where each article begins in the article
order), and, only when the evidence is not already in article order, ``order`` (rows in article
order) and ``rank`` (each row's position in it), int32 for N < 2**31. For DPR's psgs_w100.tsv,
whose articles are runs of consecutive rows in id order, the map is ``starts`` alone (about
3.2M entries). Titles are compared as exact strings for in-memory evidence; for a memory-mapped
store as a 64-bit hash of the stored title (raw UTF-8 bytes when the store has them, else the
title's token ids), computed vectorised: two different titles share a hash with probability
about n^2 / 2^65 (3e-7 for the 3.2M titles of Wikipedia).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

READER_CONTEXTS = ("passage", "neighbours")

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash's base
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def extend_context(window: Sequence[Sequence[int]], main: int, maxlen: int) -> list[int]:
    """`prepare_context_ids` of the original's `query_extended_context_t5_format`
    (megatron/model/emdr2_model.py): the passage ``window[main]`` extended with its neighbours in
    ``window`` to at most ``maxlen`` tokens (a left neighbour cut from the left keeps maxlen - 1 -
    len(passage) of its tokens, as the original's ``offset = len - extra_len + 1`` does)."""
    context_ids = list(window[main])
    if len(context_ids) > maxlen or len(window) == 1:
        return context_ids[0:maxlen]
    extra_len = maxlen - len(context_ids)
    if main == 0:
        extra = [t for item in window[1:] for t in item]
        if len(extra) > extra_len:
            extra = extra[0:extra_len]
        return context_ids + extra
    if main == -1:
        extra = [t for item in window[:-1] for t in item]
        if len(extra) > extra_len:
            extra = extra[len(extra) - extra_len + 1:]
        return extra + context_ids
    left = list(window[0])  # main == 1
    if len(left) > extra_len:
        return left[len(left) - extra_len + 1:] + context_ids
    context_ids = left + context_ids
    if len(window) == 3:
        right = list(window[2])
        remaining = extra_len - len(left)
        if len(right) > remaining:
            right = right[:remaining]
        context_ids = context_ids + right
    return context_ids


# ---------------------------------------------------------------------- title keys
def _powers(n: int) -> np.ndarray:
    out = np.empty(max(n, 1), np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        for i in range(1, len(out)):
            out[i] = out[i - 1] * _MULT
    return out


def sequence_hashes(reader, seqs: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """64-bit polynomial hash (mod 2**64) of the given sequences of a megatron indexed dataset
    (an ``indexed.IndexedReader``), mixed with their length; vectorised in chunks."""
    data = np.frombuffer(reader._bin, dtype=reader.dtype) if len(reader._bin) else np.zeros(0, reader.dtype)
    lengths_all = reader.lengths[seqs].astype(np.int64)
    pows = _powers(int(lengths_all.max()) if len(lengths_all) else 1)
    out = np.empty(len(seqs), np.uint64)
    with np.errstate(over="ignore"):
        for a in range(0, len(seqs), chunk):
            s = seqs[a:a + chunk]
            lens = lengths_all[a:a + chunk]
            first = reader.pointers[s].astype(np.int64) // reader.dtype.itemsize
            ends = np.cumsum(lens)
            starts = ends - lens
            within = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(starts, lens)
            vals = data[np.repeat(first, lens) + within].astype(np.uint64) + np.uint64(1)
            csum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(vals * pows[within], dtype=np.uint64)])
            out[a:a + chunk] = (csum[ends] - csum[starts]) * _MIX + lens.astype(np.uint64)
    return out


def title_groups(evidence) -> np.ndarray:
    """Article number of every evidence row (int64), numbered by first appearance in row order."""
    from .evidence import InMemoryEvidence, MmapEvidence

    if isinstance(evidence, MmapEvidence):
        n = len(evidence)
        if evidence._raw is not None:  # exact title bytes: sequence 2*row of the raw store
            keys = sequence_hashes(evidence._raw, 2 * np.arange(n, dtype=np.int64))
        else:  # the original release's store: the title's token ids (one sequence per title)
            reader = evidence._title
            keys = sequence_hashes(reader, reader.doc_index[:-1].astype(np.int64)) \
                if reader.num_sequences == n else \
                np.array([hash(evidence.title_tokens(r).tobytes()) for r in range(n)], np.int64).view(np.uint64)
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        by_first = np.empty(len(first), np.int64)
        by_first[np.argsort(first, kind="stable")] = np.arange(len(first))
        return by_first[inverse.reshape(-1)]
    titles = evidence._titles if isinstance(evidence, InMemoryEvidence) else \
        (evidence.title(r) for r in range(len(evidence)))
    numbers: dict[str, int] = {}
    return np.fromiter((numbers.setdefault(t, len(numbers)) for t in titles), np.int64, count=len(evidence))


class NeighbourMap:
    """Each evidence row's window of same-article passages, as the original computed it."""

    def __init__(self, starts: np.ndarray, order: np.ndarray | None = None, rank: np.ndarray | None = None):
        self.starts = starts  # [articles + 1] positions in the article order
        self.order, self.rank = order, rank  # None: rows are already in article order

    @classmethod
    def build(cls, evidence) -> "NeighbourMap":
        t0 = time.perf_counter()
        group = title_groups(evidence)
        n = len(group)
        ids = np.asarray(evidence.ids, dtype=np.int64)
        in_order = n == 0 or bool(np.all((group[1:] > group[:-1]) |
                                         ((group[1:] == group[:-1]) & (ids[1:] > ids[:-1]))))
        order = rank = None
        if not in_order:
            itype = np.int32 if n < 2 ** 31 else np.int64
            order = np.lexsort((ids, group)).astype(itype)
            rank = np.empty(n, itype)
            rank[order] = np.arange(n, dtype=itype)
            group = group[order]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(group)) + 1, [n]]).astype(np.int64)
        m = cls(starts, order, rank)
        logger.info("neighbour map of %s: %d passages in %d articles%s (%.1f s)", evidence.path, n,
                    len(starts) - 1, "" if in_order else " (not in article order: with a row permutation)",
                    time.perf_counter() - t0)
        return m

    @property
    def num_articles(self) -> int:
        return len(self.starts) - 1

    def _rows(self, positions) -> list[int]:
        return [int(self.order[p]) for p in positions] if self.order is not None else [int(p) for p in positions]

    def window(self, row: int) -> tuple[list[int], int]:
        """(rows of the passage's window in article order, index of the passage in it: 0, 1 or
        -1), as `WikiTitleDocMap.get_neighbour_paragraphs` returns them."""
        p = int(self.rank[row]) if self.rank is not None else int(row)
        a = int(np.searchsorted(self.starts, p, side="right")) - 1
        s, e = int(self.starts[a]), int(self.starts[a + 1])
        i, n = p - s, e - s
        if i == 0:
            return self._rows(range(s, min(s + 3, e))), 0
        if i == n - 1:
            return self._rows(range(max(p - 2, s), p + 1) if n > 2 else [p]), -1
        return self._rows(range(p - 1, p + 2)), 1


def neighbour_windows(evidence, tok, passages: Sequence[Sequence]) -> list[list[tuple[list[list[int]], int]]]:
    """Per question, per passage: (token ids of each passage of its window, main index), for
    ``encode_reader_inputs(windows=...)``. ``passages`` are `evidence.Passage` objects (they carry
    their evidence row); each needed passage is tokenised once per call."""
    nmap = evidence.neighbour_map()
    wins = []
    for ps in passages:
        wins.append([])
        for p in ps:
            row = getattr(p, "row", None)
            if row is None:
                raise ValueError("--reader-context neighbours needs passages that know their evidence row "
                                 "(read through Evidence.passages)")
            wins[-1].append(nmap.window(row))
    needed = sorted({r for ws in wins for rows, _ in ws for r in rows})
    tokens = dict(zip(needed, tok.encode_batch([evidence.text(r) for r in needed])))
    return [[([tokens[r] for r in rows], main) for rows, main in ws] for ws in wins]
