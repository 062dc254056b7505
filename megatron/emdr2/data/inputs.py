"""Token-level model inputs as torch tensors: (ids, mask) pairs, padded, mask 1 on real tokens.

  retriever context  [CLS] title [SEP] text [SEP]           (256 tokens; the original's layout)
  retriever query    [CLS] question [SEP]                   (256 tokens)
  reader (FiD)       "question: q title: t context: c"      one row per passage, [K, S], S <= 512;
                     BERT vocab: wrapped as [CLS] ... [SEP]; SentencePiece (T5): ends with </s>;
                     layout "original" (converted original checkpoints): [CLS] q [SEP] t [SEP] c [SEP];
                     with --reader-context neighbours c is the passage extended with its
                     article neighbours up to S tokens (data/neighbours.py)
  answers            answer tokens + [EOS] (the decoder's labels; 32 tokens); `decoder_inputs`
                     shifts them right behind [BOS] (T5: behind the pad token) for teacher forcing

Truncation keeps the beginning: the question is never cut for a long passage. `pad_to='max'`
pads to max_len (fixed shapes for tensor parallelism and CUDA graphs); 'longest' pads to the
longest row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

RETRIEVER_MAX_LEN = 256
READER_MAX_LEN = 512
ANSWER_MAX_LEN = 32
READER_LAYOUTS = ("prompt", "original")


def _require(tok, name: str) -> int:
    value = getattr(tok, name, None)
    if value is None:
        raise ValueError(f"{type(tok).__name__} has no {name}; use a BERT tokenizer "
                         f"(with t5_extras=True for [BOS]/[EOS]) or a SentencePiece one")
    return value


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None,
             pad_to: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into (ids, mask) LongTensors [N, L]; rows longer than max_len are cut."""
    if pad_to not in ("max", "longest"):
        raise ValueError(f"pad_to must be 'max' or 'longest', got {pad_to!r}")
    if max_len is not None:
        rows = [r[:max_len] for r in rows]
    longest = max((len(r) for r in rows), default=0)
    width = max_len if (pad_to == "max" and max_len is not None) else longest
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def context_ids(tok, title_ids: Sequence[int], text_ids: Sequence[int], max_len: int = RETRIEVER_MAX_LEN) -> list[int]:
    """[CLS] title [SEP] text [SEP], cut to max_len keeping the final [SEP] (as the original)."""
    cls, sep = _require(tok, "cls_id"), _require(tok, "sep_id")
    body = [cls, *title_ids, sep, *text_ids][: max_len - 1]
    return body + [sep]


def encode_context(tok, passages: Sequence[tuple[str, str]], max_len: int = RETRIEVER_MAX_LEN,
                   pad_to: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Retriever context inputs for (title, text) pairs -> (ids, mask) [N, max_len]."""
    titles = tok.encode_batch([t for t, _ in passages])
    texts = tok.encode_batch([x for _, x in passages])
    rows = [context_ids(tok, a, b, max_len) for a, b in zip(titles, texts)]
    return pad_rows(rows, tok.pad_id, max_len, pad_to)


def encode_context_tokens(tok, title_tokens, text_tokens, max_len: int = RETRIEVER_MAX_LEN,
                          pad_to: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Same as encode_context from pre-tokenised ids (e.g. MmapEvidence.title_tokens/text_tokens)."""
    rows = [context_ids(tok, [int(x) for x in a], [int(x) for x in b], max_len)
            for a, b in zip(title_tokens, text_tokens)]
    return pad_rows(rows, tok.pad_id, max_len, pad_to)


def encode_query(tok, questions: Sequence[str], max_len: int = RETRIEVER_MAX_LEN,
                 pad_to: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Retriever query inputs: [CLS] question [SEP] -> (ids, mask) [N, max_len]."""
    cls, sep = _require(tok, "cls_id"), _require(tok, "sep_id")
    rows = [[cls, *q[: max_len - 2], sep] for q in tok.encode_batch(list(questions))]
    return pad_rows(rows, tok.pad_id, max_len, pad_to)


def _reader_wrap(tok) -> tuple[list[int], list[int]]:
    if getattr(tok, "cls_id", None) is not None:  # BERT vocabulary (the paper's reader)
        return [tok.cls_id], [tok.sep_id]
    return [], [_require(tok, "eos_id")]  # T5 SentencePiece: text </s>


def encode_reader_inputs(tok, question: str, passages: Sequence[tuple[str, str]],
                         max_len: int = READER_MAX_LEN, pad_to: str = "max", layout: str = "prompt",
                         windows: Optional[Sequence[tuple[Sequence[Sequence[int]], int]]] = None,
                         question_max_len: int = RETRIEVER_MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """FiD encoder inputs for one question and its K (title, text) passages -> (ids, mask) [K, S].

    ``windows`` (``--reader-context neighbours``): per passage, the token ids of the passages of
    its article window and the passage's index in it (`neighbours.neighbour_windows`); the
    context is then the passage extended with its neighbours up to the row's length, as the
    original's `query_extended_context_t5_format` (`neighbours.extend_context`). Without it the
    passage alone. ``layout``:
      prompt    "question: q title: t context: c" (see the module doc)
      original  the original's rows: [CLS] q [SEP] t [SEP] c [SEP], q cut to question_max_len
                with its [CLS]/[SEP] (the original's question ids are the retriever query's,
                --seq-length-ret tokens); a row whose question and title fill it is cut to
                max_len - 1 and ends with [SEP] (the original's single-passage rule)
    """
    from .neighbours import extend_context

    if layout not in READER_LAYOUTS:
        raise ValueError(f"reader layout must be one of {READER_LAYOUTS}, got {layout!r}")
    if windows is not None and len(windows) != len(passages):
        raise ValueError(f"{len(windows)} neighbour windows for {len(passages)} passages")
    if layout == "prompt" and windows is None:
        head, tail = _reader_wrap(tok)
        q_ids = tok.encode(f"question: {question}")  # tokenised once, shared by the K rows
        bodies = tok.encode_batch([f"title: {t} context: {x}" for t, x in passages])
        room = max_len - len(tail)
        rows = [([*head, *q_ids, *b])[:room] + tail for b in bodies]
        return pad_rows(rows, tok.pad_id, max_len, pad_to)
    if windows is None:
        windows = [([x], 0) for x in tok.encode_batch([x for _, x in passages])]
    if layout == "original":
        cls, sep = _require(tok, "cls_id"), _require(tok, "sep_id")
        q = [cls, *tok.encode(question)[: max(question_max_len - 2, 0)], sep]
        prefixes = [[*q, *t, sep] for t in tok.encode_batch([t for t, _ in passages])]
        tail = [sep]
    else:
        head, tail = _reader_wrap(tok)
        q = [*head, *tok.encode(f"question: {question}")]
        prefixes = [[*q, *t] for t in tok.encode_batch([f"title: {t} context:" for t, _ in passages])]
    rows = []
    for prefix, (window, main) in zip(prefixes, windows):
        room = max_len - len(tail) - len(prefix)
        body = prefix + extend_context(window, main, room) if room > 0 else prefix[: max_len - len(tail)]
        rows.append(body + tail)
    return pad_rows(rows, tok.pad_id, max_len, pad_to)


def encode_answers(tok, answers: Sequence[str], max_len: int = ANSWER_MAX_LEN,
                   pad_to: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder labels: answer tokens cut to max_len-1, then [EOS] -> (ids, mask) [N, max_len]."""
    eos = _require(tok, "eos_id")
    rows = [a[: max_len - 1] + [eos] for a in tok.encode_batch(list(answers))]
    return pad_rows(rows, tok.pad_id, max_len, pad_to)


def decoder_inputs(labels: torch.Tensor, mask: torch.Tensor, bos_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: labels shifted right behind bos_id ([BOS] a1 .. aT for
    labels a1 .. aT [EOS]); positions without a label are pad_id, so `mask` serves both."""
    out = torch.full_like(labels, pad_id)
    out[:, 0] = bos_id
    out[:, 1:] = labels[:, :-1]
    return torch.where(mask.bool(), out, torch.full_like(out, pad_id))
