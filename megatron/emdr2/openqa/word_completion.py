"""Decoded answers completed to whole words of the passage they were copied from (``--complete-words``).

A reader that copies answers from its passages piece by piece can stop one piece short of a word's
end: "natasha bharad" for the passage's "Natasha Bharadwaj", "pradyum" for "Pradyumna" (seen in an earlier
quickstart reader's nq-mini dev answers, on which the rule was designed). No answer ends inside a word, so where the
answer's pieces occur in one of the passages the reader read and the next passage pieces continue
that word (WordPiece ``##`` pieces, SentencePiece pieces without ``▁``), they are appended. The
passages are searched in retrieval order and the first occurrence decides; an answer that occurs
nowhere, or ends at a word boundary where it first occurs, is left as decoded.
"""

from __future__ import annotations

import torch


def _first_occurrence(row: list[int], needle: list[int]) -> int:
    n = len(needle)
    first = needle[0]
    for i in range(len(row) - n + 1):
        if row[i] == first and row[i:i + n] == needle:
            return i
    return -1


def complete_words(answers: torch.Tensor, reader_ids: torch.Tensor, continuation_ids, eos_id: int,
                   pad_id: int) -> torch.Tensor:
    """answers [B, L] (each through its eos, then pad), reader_ids [B, K, S] (the rows the reader
    read) -> [B, L'] with every answer completed to the end of its last word (L' >= L)."""
    rows = answers.tolist()
    passages = reader_ids.tolist()
    out = []
    for b, row in enumerate(rows):
        body = row[:row.index(eos_id)] if eos_id in row else [t for t in row if t != pad_id]
        tail = []
        if body:
            for passage in passages[b]:
                at = _first_occurrence(passage, body)
                if at < 0:
                    continue
                j = at + len(body)
                while j < len(passage) and passage[j] in continuation_ids:
                    tail.append(passage[j])
                    j += 1
                break
        out.append(body + tail + [eos_id] if tail else row)
    width = max(len(r) for r in out)
    padded = [r + [pad_id] * (width - len(r)) for r in out]
    return torch.tensor(padded, dtype=answers.dtype, device=answers.device)
