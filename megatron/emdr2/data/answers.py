"""Answer normalisation, exact match, and retrieval hits: the one implementation every scorer uses.

Exact match (EM) follows the NQ-open / SQuAD normalisation (Unicode NFD, lower case, ASCII
punctuation removed, articles a/an/the removed, whitespace collapsed), applied *identically* to
the prediction and to every gold answer. By default accents are removed too, on both sides: the
BERT-uncased reader cannot produce accents, and the original EMDR² code stripped them from
predictions only (so "Röntgen" could never match). `strip_accents=False` gives the published
NQ-open (ORQA) normalisation exactly.

Retrieval hits follow DPR (`has_answer`): in 'string' mode the answer's token sequence must occur
in the passage's token sequence, both NFD-normalised and tokenised by DPR's simple tokenizer
(runs of letters/digits/marks, or single non-space symbols), compared lower-cased; in 'regex'
mode the answer is a case-insensitive regular expression searched in the NFD passage (CuratedTREC).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable

import regex

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# DPR's SimpleTokenizer: a token is a run of letters/numbers/marks, or one other non-space,
# non-control character.
_SIMPLE_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                              flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
_REGEX_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE


def remove_accents(text: str) -> str:
    """NFD, then drop combining marks (category Mn): 'Röntgen' -> 'Rontgen'."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def normalize_answer(text: str, strip_accents: bool = True) -> str:
    text = remove_accents(text) if strip_accents else unicodedata.normalize("NFD", text)
    text = text.lower()
    text = "".join(c for c in text if c not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return list(answers)


def exact_match(prediction: str, gold_answers: Iterable[str] | str, strip_accents: bool = True) -> bool:
    """True if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction, strip_accents)
    return any(pred == normalize_answer(g, strip_accents) for g in _as_list(gold_answers))


def simple_tokens(text: str) -> list[str]:
    """DPR's simple tokenisation of NFD text, lower-cased (its `words(uncased=True)`)."""
    return [m.group().lower() for m in _SIMPLE_TOKEN.finditer(unicodedata.normalize("NFD", text))]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and haystack[i:i + n] == needle:
            return True
    return False


def has_answer(answers: Iterable[str] | str, text: str, mode: str = "string") -> bool:
    """DPR's retrieval hit: does `text` (a passage; include its title if you want it searched)
    contain any of `answers`?

    One deliberate difference from DPR: an answer with no tokens (empty or only spaces) matches
    nothing, where DPR's loop would count it as found in every passage.
    """
    answers = _as_list(answers)
    if mode == "string":
        passage = simple_tokens(text)
        for answer in answers:
            tokens = simple_tokens(answer)
            if tokens and _contains(passage, tokens):
                return True
        return False
    if mode == "regex":
        passage = unicodedata.normalize("NFD", text)
        for pattern in answers:
            try:
                compiled = regex.compile(unicodedata.normalize("NFD", pattern), flags=_REGEX_FLAGS)
            except regex.error as e:
                # DPR silently scores a broken pattern as a miss; a typo in an answer file
                # should be fixed, not hidden.
                raise ValueError(f"answer {pattern!r} is not a valid regular expression: {e}") from None
            if compiled.search(passage) is not None:
                return True
        return False
    raise ValueError(f"has_answer mode must be 'string' or 'regex', got {mode!r}")


def best_exact_match(predictions: Iterable[str], gold_answers: Iterable[str] | str) -> list[bool]:
    """EM for several predictions against the same gold answers (normalises the gold once)."""
    gold = {normalize_answer(g) for g in _as_list(gold_answers)}
    return [normalize_answer(p) in gold for p in predictions]
