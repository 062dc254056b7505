"""Masked-salient-span (MSS) pre-training of the reader and retriever with the EMDR² objective.

The EMDR² fine-tuning task with other examples: the query is an evidence sentence whose salient
spans are masked (``data/mss.py``), the reader generates the masked spans in sentinel format,
and retrieval skips the passage the sentence was taken from (``exclude_ids``). ``source`` changes
that for training sentences: "retrieve" lets retrieval find it, "read" puts it among the K passages
the reader reads (in place of the lowest-ranked one), so a reader that starts beside a weak retriever
sees the masked span and learns to copy it; held-out sentences always skip it. Retrieval,
re-scoring, the joint objective and the index refresh (synchronous, or by indexer ranks) are
OpenQATask's, unchanged.

Evaluation on held-out masked sentences (one span each):
  em        exact match of the generated span(s) with the masked span(s);
  top{k}    "source-related recall": the fraction of held-out sentences for which one of the
            top-k retrieved passages, the source passage excluded, contains the masked span —
            i.e. retrieval finds *other* evidence for the hidden entity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron.emdr2.data.inputs import decoder_inputs
from megatron.emdr2.data.mss import (MaskedSentence, MSSDataset, mss_query_inputs, mss_reader_inputs,
                                     mss_targets)
from megatron.emdr2.openqa.emdr2_task import OpenQAConfig, OpenQATask, QABatch


SOURCE_MODES = ("skip", "retrieve", "read")  # what training sentences do with their own passage


class MSSTask(OpenQATask):
    def __init__(self, qa_cfg: OpenQAConfig, cfg, train: MSSDataset, dev_examples: Sequence[MaskedSentence],
                 evidence, retriever_tok, reader_tok, refresh, source: str = "skip"):
        super().__init__(qa_cfg, cfg, train, list(dev_examples), evidence, retriever_tok, reader_tok, refresh)
        if source not in SOURCE_MODES:
            raise ValueError(f"source must be one of {SOURCE_MODES}, got {source!r}")
        self.source = source
        self._iteration = 0  # optimizer steps done: gives the sampler's epoch (masks change per epoch)

    # ------------------------------------------------------------------ data
    def num_train_samples(self) -> int:
        return len(self.train_examples)

    def epoch(self) -> int:
        """The training sampler's epoch for the next batch (it drops the last partial batch)."""
        g = self.cfg.batch.global_batch_size
        per_epoch = max(len(self.train_examples) // g * g, 1)
        return self._iteration * g // per_epoch

    def make_batch(self, indices: Sequence[int]) -> QABatch:
        epoch = self.epoch()
        return self._qa_batch([self.train_examples.example(int(i), epoch) for i in indices], source=self.source)

    def _qa_batch(self, examples: Sequence[MaskedSentence], targets=None, source: str = "skip") -> QABatch:
        # `targets` (the answer strings OpenQATask would train on) is unused: MSS trains on the
        # sentinel-formatted spans of each example.
        q_ids, q_mask = mss_query_inputs(self.rtok, [e.question for e in examples], self.qa.query_max_len)
        labels, label_mask = mss_targets(self.tok, [e.spans for e in examples], self.qa.answer_max_len)
        dec = decoder_inputs(labels, label_mask, self.tok.bos_id, self.tok.pad_id)
        doc_ids = torch.tensor([e.doc_id for e in examples], dtype=torch.long)
        return QABatch([e.question for e in examples], [e.answers for e in examples], q_ids, q_mask,
                       labels, label_mask, dec, exclude_ids=doc_ids[:, None] if source == "skip" else None,
                       include_ids=doc_ids if source == "read" else None)

    def reader_inputs(self, questions: list[str], passages: list[list[tuple[str, str]]]):
        pairs = [mss_reader_inputs(self.tok, q, ps, self.qa.reader_max_len) for q, ps in zip(questions, passages)]
        width = max(ids.size(1) for ids, _ in pairs)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.size(1)), value=v)
        return (torch.stack([pad(i, self.tok.pad_id) for i, _ in pairs]),
                torch.stack([pad(m, 0) for _, m in pairs]))

    # ------------------------------------------------------------------ hooks
    def on_step_end(self, models, iteration: int) -> None:
        self._iteration = iteration
        super().on_step_end(models, iteration)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "iteration": self._iteration}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # the run's id and accepted indexes too
        self._iteration = int(state.get("iteration", 0))

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "task": "mss"}


def masked_dev_examples(dataset: MSSDataset, limit: Optional[int] = None) -> list[MaskedSentence]:
    """Held-out examples, fixed once (epoch 0)."""
    return dataset.examples(epoch=0, limit=limit)
