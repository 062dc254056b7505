"""Masked salient spans (MSS): evidence sentences whose named entities are masked out.

An example is one annotated sentence (``ner.py`` layout) with some of its entities masked:

  question  the sentence with the i-th masked span replaced by the placeholder ``<extra_id_i>``
            (a printable form; the token builders below turn each placeholder into the reader's
            sentinel id, or into one ``[MASK]`` for the retriever query: one mask per span, so
            the query does not reveal the span's length);
  target    T5 style, ``<extra_id_0> span0 <extra_id_1> span1 ... [EOS]``;
  answers   ``[" ".join(spans)]``, what exact match and retrieval hits are scored against (the
            reader's decoded output drops the sentinels);
  doc_id    the passage the sentence comes from: retrieval must skip it.

Which entities are masked is drawn from (seed, epoch, index) alone: 1..max_spans of them (the
paper masks salient spans; default one per sentence, as REALM). ``min_entity_passages`` N > 1
keeps only entities that the annotations find in at least N passages: retrieval skips the source
passage, so an entity named nowhere else cannot be recovered from the evidence and teaches the
reader only priors (on nq-mini's 3.6k passages, about half of the entities; for the rest, the
entity is among the top-4 retrieved passages twice as often). Spans are located by their
character offsets (``sent_text[start:end] == text``), falling back to the first occurrence of the
entity's text: offsets do not depend on any WordPiece convention.

The sentence file is indexed by line offsets and parsed lazily, so the released 20M-sentence
file needs ~160 MB of offsets in memory, not the parsed records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .answers import normalize_answer
from .errors import DataError
from .inputs import pad_rows
from .ner import SentenceRecord, parse_record

SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
MAX_FALLBACK = 64  # sentences without a usable entity: look this far ahead for one


@dataclass
class MaskedSentence:
    question: str
    answers: list[str]
    spans: list[str]
    doc_id: int
    sent_text: str


# ---------------------------------------------------------------------------- the sentence file
class SentenceFile:
    """Random access to the records of an annotated-sentence file (blank lines ignored)."""

    def __init__(self, path):
        self.path = str(path)
        starts, ends = [], []
        pos = 0
        with open(self.path, "rb") as f:
            tail = b""
            while block := f.read(1 << 24):
                data = tail + block
                nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
                line_starts = np.concatenate([[0], nl[:-1] + 1]) if len(nl) else np.zeros(0, np.int64)
                starts.append(line_starts + pos)
                ends.append(nl + pos)
                cut = int(nl[-1]) + 1 if len(nl) else 0
                tail, pos = data[cut:], pos + cut
            if tail:
                starts.append(np.array([pos]))
                ends.append(np.array([pos + len(tail)]))
        starts = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        ends = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, np.int64)
        self._line_no = np.arange(1, len(starts) + 1, dtype=np.int64)
        keep = (ends - starts) > 1  # more than a lone "\r"
        self._starts, self._ends, self._line_no = starts[keep], ends[keep], self._line_no[keep]
        if not len(self._starts):
            raise DataError(self.path, None, "no sentences (empty file)")
        self._file = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def line_number(self, i: int) -> int:
        return int(self._line_no[i])

    def record(self, i: int) -> SentenceRecord:
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(int(self._starts[i]))
        raw = self._file.read(int(self._ends[i] - self._starts[i]))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(self.path, self.line_number(i), f"invalid UTF-8 at byte {e.start} of the line") from None
        if not line.strip():
            raise DataError(self.path, self.line_number(i), "blank line")
        return parse_record(line, self.path, self.line_number(i))


EAGER_CHECK_LIMIT = 2_000_000  # sentences: above this, records are checked as they are drawn


def check_sentences(sentences: SentenceFile, evidence=None, limit: int = EAGER_CHECK_LIMIT) -> bool:
    """Parse every record once before training, so a bad line is reported at start-up (with its
    line number) rather than when the sampler first draws it, and (given the evidence) check
    that every ``doc_id`` is a passage of it: sentences annotated on another evidence file
    would otherwise train with the wrong passage excluded. A file longer than ``limit`` (the
    20M-sentence release: minutes per rank) is left to the per-draw checks; returns whether the
    whole file was checked."""
    if len(sentences) > limit:
        return False
    doc_ids = np.fromiter((sentences.record(i).doc_id for i in range(len(sentences))), np.int64,
                          count=len(sentences))
    if evidence is not None:
        unique, first = np.unique(doc_ids, return_index=True)
        try:
            evidence.row_of(unique)
        except KeyError:
            for doc_id, i in zip(unique.tolist(), first.tolist()):
                try:
                    evidence.row_of([doc_id])
                except KeyError:
                    raise DataError(sentences.path, sentences.line_number(i),
                                    f"doc_id {doc_id} is not a passage id of the evidence {evidence.path} "
                                    "(sentences annotated on another evidence file?)") from None
    return True


def split_tail(sentences: SentenceFile, n_dev: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): the last ~n_dev sentences, moved to a passage boundary so no
    passage has sentences on both sides."""
    n = len(sentences)
    if not 0 < n_dev < n:
        raise ValueError(f"held-out size {n_dev} must be between 1 and {n - 1} (the file has {n} sentences)")
    cut = n - n_dev
    while 0 < cut < n and sentences.record(cut).doc_id == sentences.record(cut - 1).doc_id:
        cut += 1
    if cut >= n:
        raise ValueError(f"{sentences.path}: the last {n_dev} sentences belong to one passage; "
                         "choose another held-out size or pass a held-out file")
    return np.arange(cut, dtype=np.int64), np.arange(cut, n, dtype=np.int64)


# ---------------------------------------------------------------------------- masking
def entity_passage_counts(*files: SentenceFile) -> dict[str, int]:
    """Normalised entity text -> how many distinct passages the files' annotations name it in
    (one pass; for the 20M-sentence release, minutes and a dictionary of its distinct entities)."""
    passages: dict[str, set[int]] = {}
    for sentences in files:
        for i in range(len(sentences)):
            rec = sentences.record(i)
            for e in rec.entities:
                passages.setdefault(normalize_answer(e.text), set()).add(rec.doc_id)
    return {text: len(ids) for text, ids in passages.items()}


def usable_spans(rec: SentenceRecord, entity_types: Optional[set[str]] = None,
                 passage_counts: Optional[dict[str, int]] = None, min_passages: int = 1
                 ) -> list[tuple[int, int, str]]:
    """Character spans (start, end, text) of the record's entities that can be masked: located in
    the sentence, of an allowed type, named in at least ``min_passages`` passages (by
    ``passage_counts``), not overlapping an earlier one."""
    text = rec.sent_text
    if SENTINEL_RE.search(text):
        return []  # a literal placeholder in the text would be read as a mask
    spans = []
    for e in rec.entities:
        if entity_types is not None and e.type not in entity_types:
            continue
        if min_passages > 1 and passage_counts.get(normalize_answer(e.text), 0) < min_passages:
            continue
        start, end = e.start, e.end
        if text[start:end] != e.text:
            start = text.find(e.text)
            if start < 0:
                continue
            end = start + len(e.text)
        if not e.text.strip():
            continue
        spans.append((start, end, e.text.strip()))
    spans.sort()
    kept: list[tuple[int, int, str]] = []
    for s in spans:
        if not kept or s[0] >= kept[-1][1]:
            kept.append(s)
    return kept


def mask_sentence(rec: SentenceRecord, spans: Sequence[tuple[int, int, str]]) -> MaskedSentence:
    """Replace the given (sorted, disjoint) spans by <extra_id_0>, <extra_id_1>, ..."""
    text, out, pos = rec.sent_text, [], 0
    for i, (start, end, _) in enumerate(spans):
        out.append(text[pos:start])
        out.append(f"<extra_id_{i}>")
        pos = end
    out.append(text[pos:])
    masked = [s for _, _, s in spans]
    return MaskedSentence(" ".join("".join(out).split()), [" ".join(masked)], masked, rec.doc_id, text)


class MSSDataset:
    """Masked sentences of the given rows of a SentenceFile; ``example(i, epoch)`` is
    deterministic in (seed, epoch, i)."""

    def __init__(self, sentences: SentenceFile, rows: Optional[np.ndarray] = None, seed: int = 1234,
                 max_spans: int = 1, entity_types: Optional[Sequence[str]] = None,
                 min_entity_passages: int = 1, passage_counts: Optional[dict[str, int]] = None):
        if max_spans < 1:
            raise ValueError(f"max_spans must be >= 1, got {max_spans}")
        if min_entity_passages < 1:
            raise ValueError(f"min_entity_passages must be >= 1, got {min_entity_passages}")
        self.sentences = sentences
        self.rows = np.arange(len(sentences), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.seed, self.max_spans = seed, max_spans
        self.entity_types = set(entity_types) if entity_types else None
        self.min_entity_passages = min_entity_passages
        self.passage_counts = passage_counts
        if min_entity_passages > 1:
            if self.passage_counts is None:
                self.passage_counts = entity_passage_counts(sentences)
            # Only sentences left with a maskable entity (a pass over the rows, once).
            self.rows = self.rows[[bool(self._spans(sentences.record(int(r)))) for r in self.rows]]
            if not len(self.rows):
                raise DataError(sentences.path, None, f"no sentence has an entity named in at least "
                                                      f"{min_entity_passages} passages")

    def _spans(self, rec: SentenceRecord) -> list[tuple[int, int, str]]:
        return usable_spans(rec, self.entity_types, self.passage_counts, self.min_entity_passages)

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, epoch: int = 0) -> MaskedSentence:
        # A sentence left without a maskable entity (e.g. by the type filter) is replaced by the
        # next usable one, deterministically.
        for step in range(min(MAX_FALLBACK, len(self.rows))):
            row = int(self.rows[(index + step) % len(self.rows)])
            rec = self.sentences.record(row)
            spans = self._spans(rec)
            if spans:
                rng = np.random.default_rng([self.seed, epoch, index])
                n = int(rng.integers(1, min(self.max_spans, len(spans)) + 1))
                chosen = sorted(rng.choice(len(spans), size=n, replace=False).tolist())
                return mask_sentence(rec, [spans[c] for c in chosen])
        raise DataError(self.sentences.path, self.sentences.line_number(int(self.rows[index % len(self.rows)])),
                        f"no maskable entity in this sentence or the {MAX_FALLBACK - 1} after it")

    def examples(self, epoch: int = 0, limit: Optional[int] = None) -> list[MaskedSentence]:
        n = len(self) if limit is None else min(limit, len(self))
        return [self.example(i, epoch) for i in range(n)]


# ---------------------------------------------------------------------------- token inputs
def encode_masked(tok, text: str, placeholder_id: Callable[[int], int]) -> list[int]:
    """WordPiece ids of ``text`` with each ``<extra_id_i>`` turned into ``placeholder_id(i)``."""
    ids: list[int] = []
    pos = 0
    for m in SENTINEL_RE.finditer(text):
        if text[pos:m.start()].strip():
            ids.extend(tok.encode(text[pos:m.start()]))
        ids.append(placeholder_id(int(m.group(1))))
        pos = m.end()
    if text[pos:].strip():
        ids.extend(tok.encode(text[pos:]))
    return ids


def _window(ids: list[int], keep: int, size: int) -> list[int]:
    """At most ``size`` ids, a window that contains position ``keep``."""
    if len(ids) <= size:
        return ids
    start = min(max(0, keep - size // 2), len(ids) - size)
    return ids[start:start + size]


def mss_query_inputs(rtok, questions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Retriever queries: [CLS] sentence-with-[MASK]-per-span [SEP], cut around the first mask."""
    rows = []
    for q in questions:
        ids = encode_masked(rtok, q, lambda i: rtok.mask_id)
        first = ids.index(rtok.mask_id) if rtok.mask_id in ids else 0
        rows.append([rtok.cls_id, *_window(ids, first, max_len - 2), rtok.sep_id])
    return pad_rows(rows, rtok.pad_id, max_len, pad_to="longest")


def mss_reader_inputs(tok, question: str, passages: Sequence[tuple[str, str]], max_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """FiD rows "question: <masked sentence with sentinels> title: t context: c" -> [K, S]."""
    q_ids = encode_masked(tok, f"question: {question}", tok.sentinel)
    bodies = tok.encode_batch([f"title: {t} context: {x}" for t, x in passages])
    rows = [([tok.cls_id, *q_ids, *b])[: max_len - 1] + [tok.sep_id] for b in bodies]
    return pad_rows(rows, tok.pad_id, max_len, pad_to="longest")


def mss_targets(tok, span_lists: Sequence[Sequence[str]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder labels <extra_id_0> span0 <extra_id_1> span1 ... [EOS] -> (ids, mask)."""
    rows = []
    for spans in span_lists:
        ids: list[int] = []
        for i, s in enumerate(spans):
            ids.append(tok.sentinel(i))
            ids.extend(tok.encode(s))
        rows.append(ids[: max_len - 1] + [tok.eos_id])
    return pad_rows(rows, tok.pad_id, max_len, pad_to="longest")
