"""Decoded answers cut before their first repeated word (``--stop-at-repeated-word``).

A copy-head reader that has copied an answer out of a passage can go on copying past the
answer's end instead of stopping: "kelly reno ( reno", "merry clayton, clayton",
"toby keith. keith keith ' s keith". On nq-mini dev, 24 of the quickstart reader's 422 answers
repeat a word, and 8 of them are right up to the repeat. Short gold answers almost never repeat
a word: 9 of nq-mini train's 3,229 do. So the answer is cut where its first repeated word
starts. Punctuation left hanging at the cut goes too. A word is a run of pieces: a piece that
does not continue a word starts one. Two words are the same when their pieces are the same. A
word made only of punctuation pieces never counts as a repeat.
"""

from __future__ import annotations

import string

import torch

_PUNCTUATION = set(string.punctuation) | {"\u2581"}  # and SentencePiece's word-start mark: no content


def punctuation_ids(tok) -> frozenset:
    """Ids of the pieces made only of punctuation (``"("``, ``","``; SentencePiece ``"▁("`` and a
    bare ``"▁"``, which starts a word whose content comes in the next pieces), cached."""
    if not hasattr(tok, "_punctuation_ids"):
        ids = set()
        for i in range(tok.vocab_size):
            piece = tok.id_to_token(i)
            body = piece[2:] if piece.startswith("##") else piece
            if body and all(c in _PUNCTUATION for c in body):
                ids.add(i)
        tok._punctuation_ids = frozenset(ids)
    return tok._punctuation_ids


def _words(body: list[int], continuation_ids) -> list[tuple[int, tuple[int, ...]]]:
    """(start, pieces) of each word of an answer body."""
    words: list[tuple[int, list[int]]] = []
    for i, t in enumerate(body):
        if words and t in continuation_ids:
            words[-1][1].append(t)
        else:
            words.append((i, [t]))
    return [(start, tuple(pieces)) for start, pieces in words]


def cut_at_repeated_word(body: list[int], continuation_ids, punctuation) -> list[int]:
    """An answer body (no eos, no pad) up to its first repeated word, hanging punctuation dropped."""
    seen = set()
    words = _words(body, continuation_ids)
    for n, (start, pieces) in enumerate(words):
        if all(p in punctuation for p in pieces):
            continue
        if pieces in seen:
            kept = words[:n]
            while kept and all(p in punctuation for p in kept[-1][1]):
                kept.pop()
            return body[:start if not kept else kept[-1][0] + len(kept[-1][1])]
        seen.add(pieces)
    return body


def stop_at_repeated_word(answers: torch.Tensor, continuation_ids, punctuation, eos_id: int,
                          pad_id: int) -> torch.Tensor:
    """answers [B, L] (each through its eos, then pad) -> [B, L] with every answer cut before its
    first repeated word and ended there."""
    out = []
    for row in answers.tolist():
        body = row[:row.index(eos_id)] if eos_id in row else [t for t in row if t != pad_id]
        cut = cut_at_repeated_word(body, continuation_ids, punctuation)
        out.append(row if len(cut) == len(body) else cut + [eos_id])
    width = answers.size(1)
    padded = [r + [pad_id] * (width - len(r)) for r in out]
    return torch.tensor(padded, dtype=answers.dtype, device=answers.device)
