"""torch Datasets for the tasks, built from the loaders and the input builders.

  EvidenceContextDataset  row -> retriever context inputs (for embedding the evidence); uses the
                          pre-tokenised ids of a MmapEvidence, so indexing 21M passages does not
                          tokenise anything
  QADataset               question index -> query inputs, answer labels (one gold answer picked
                          deterministically from (seed, epoch, index)), and the gold answers

Both return dicts of tensors without a batch dimension; `collate` stacks them (lists for strings).
"""

from __future__ import annotations

import numpy as np
import torch

from .evidence import Evidence, MmapEvidence
from .inputs import (ANSWER_MAX_LEN, RETRIEVER_MAX_LEN, context_ids, encode_answers, encode_query,
                     pad_rows)
from .qa import QAExample


class EvidenceContextDataset(torch.utils.data.Dataset):
    def __init__(self, evidence: Evidence, tokenizer, max_len: int = RETRIEVER_MAX_LEN):
        self.evidence, self.tokenizer, self.max_len = evidence, tokenizer, max_len
        self._pretokenised = isinstance(evidence, MmapEvidence)
        if self._pretokenised and evidence.meta is not None:
            made_by = evidence.meta.get("tokenizer")
            if made_by is not None and made_by != getattr(tokenizer, "name", made_by):
                raise ValueError(f"{evidence.prefix} was tokenised by {made_by}, not by {tokenizer.name}")

    def __len__(self) -> int:
        return len(self.evidence)

    def __getitem__(self, row: int) -> dict:
        if self._pretokenised:
            title = self.evidence.title_tokens(row).tolist()
            text = self.evidence.text_tokens(row)[: self.max_len].tolist()
        else:
            title = self.tokenizer.encode(self.evidence.title(row))
            text = self.tokenizer.encode(self.evidence.text(row))
        ids, mask = pad_rows([context_ids(self.tokenizer, title, text, self.max_len)],
                             self.tokenizer.pad_id, self.max_len)
        return {"row": torch.tensor(row), "id": torch.tensor(int(self.evidence.ids[row])),
                "ids": ids[0], "mask": mask[0]}


class QADataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[QAExample], tokenizer, query_max_len: int = RETRIEVER_MAX_LEN,
                 answer_max_len: int = ANSWER_MAX_LEN, seed: int = 1234, reader_tokenizer=None):
        self.examples, self.tokenizer = examples, tokenizer
        self.reader_tokenizer = reader_tokenizer or tokenizer
        self.query_max_len, self.answer_max_len = query_max_len, answer_max_len
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Training picks another gold answer each epoch (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict:
        ex = self.examples[idx]
        pick = int(np.random.default_rng([self.seed, self.epoch, idx]).integers(len(ex.answers)))
        q_ids, q_mask = encode_query(self.tokenizer, [ex.question], self.query_max_len)
        labels, a_mask = encode_answers(self.reader_tokenizer, [ex.answers[pick]], self.answer_max_len)
        return {"index": torch.tensor(idx), "query_ids": q_ids[0], "query_mask": q_mask[0],
                "answer_labels": labels[0], "answer_mask": a_mask[0],
                "question": ex.question, "answers": ex.answers}


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep other values (strings, answer lists) as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
