"""DPR supervised retriever training (Karpukhin et al. 2020), as the EMDR² paper's optional stage.

Each question brings its positive passage and N hard negatives; the contexts of all
data-parallel ranks are gathered, so every question is scored against the positives and hard
negatives of the whole (micro-)batch: the in-batch softmax of ``inbatch.py``.

Training data: a DPR biencoder json (``positive_ctxs``, ``hard_negative_ctxs``), or any QA file
whose examples carry gold passage ids (nq-mini's jsonl ``gold_passage_id``). Hard negatives come
from the file, from a mined-negatives file (``tools/mine_negatives.py``), or are mined here with
BM25 or with the retriever's own dense index (top passages without an answer), optionally
re-mined with the current model every few epochs; or are random evidence passages ('random').
Each epoch samples N of a question's mined negatives (DPR shuffled them); a question with too
few gets random evidence passages. ``hard_negatives=0`` trains on in-batch negatives only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.config import TrainingConfig
from megatron.emdr2.data.errors import DataError
from megatron.emdr2.openqa import negatives as neg
from megatron.emdr2.openqa.ict_task import RetrieverTaskConfig, RetrieverTrainingTask, _world

logger = logging.getLogger(__name__)

NEGATIVE_SOURCES = ("file", "bm25", "dense", "random")
PassageRef = Union[int, tuple]  # an evidence id, or an inline (title, text)


@dataclass
class DPRConfig:
    hard_negatives: int = 1  # N per question (DPR: 1)
    source: str = "file"  # file | bm25 | dense | random (N random evidence passages)
    negatives_file: Optional[str] = None  # mined-negatives JSON (else the training file's own)
    mine_depth: int = 20  # mined negatives kept per question (N are sampled from them per epoch)
    search_depth: int = 100  # passages searched per question while mining
    remine_every_epochs: int = 0  # dense: re-mine with the current model every K epochs (0: never)
    sample_negatives: bool = True  # sample N of the mined per epoch; False: always the top N


@dataclass
class DPRBatch:
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    context_ids: torch.Tensor  # [B x (1 + N), S]: per question its positive, then its negatives
    context_mask: torch.Tensor
    positives: torch.Tensor  # [B]: i x (1 + N)


def _ctx_ref(ctx: dict, evidence) -> Optional[PassageRef]:
    """A DPR ctx as an evidence id when the evidence has it, else its inline (title, text)."""
    pid = ctx.get("passage_id", ctx.get("id"))
    if pid is not None:
        try:
            pid = int(str(pid).split(":")[-1])
            evidence.row_of([pid])
            return pid
        except (ValueError, KeyError):
            pass
    if isinstance(ctx.get("text"), str):
        return (str(ctx.get("title", "")), ctx["text"])
    return None


class DPRTask(RetrieverTrainingTask):
    def __init__(self, rcfg: RetrieverTaskConfig, cfg: TrainingConfig, dpr: DPRConfig, tokenizer, evidence,
                 train_examples, dev_examples):
        super().__init__(rcfg, cfg, tokenizer, evidence, dev_examples)
        if dpr.source not in NEGATIVE_SOURCES:
            raise ValueError(f"hard-negative source must be one of {NEGATIVE_SOURCES}, got {dpr.source!r}")
        self.dpr = dpr
        self.train_file = getattr(train_examples, "path", "training data")
        self.kept, self.positives = self._with_positives(train_examples)
        self.examples = [train_examples[j] for j in self.kept]
        self.negatives: list[list[PassageRef]] = [[] for _ in self.examples]
        self._mined_epoch = -1
        self._biencoder = None
        if dpr.hard_negatives > 0 and dpr.source in ("file", "bm25"):
            self.negatives = self._load_or_mine(train_examples)

    # ------------------------------------------------------------------ data
    def _with_positives(self, examples) -> tuple[list[int], list[PassageRef]]:
        """(indices of the examples that have a positive passage, their first positive)."""
        kept, positives = [], []
        for j, ex in enumerate(examples):
            refs = [r for r in (_ctx_ref(c, self.evidence) for c in ex.positive_ctxs or ()) if r is not None]
            if not refs and ex.gold_passage_ids:
                refs = [pid for pid in ex.gold_passage_ids if self._in_evidence(pid)]
            if refs:
                kept.append(j)
                positives.append(refs[0])  # DPR trains on the first positive
        if not kept:
            raise DataError(self.train_file, None, "no question has a positive passage (DPR training needs "
                                        "positive_ctxs or gold passage ids found in the evidence)")
        if len(kept) < len(examples):
            logger.warning("DPR: %d of %d questions have no positive passage and are skipped",
                           len(examples) - len(kept), len(examples))
        return kept, positives

    def _in_evidence(self, pid: int) -> bool:
        try:
            self.evidence.row_of([pid])
            return True
        except KeyError:
            return False

    def _load_or_mine(self, all_examples) -> list[list[PassageRef]]:
        d = self.dpr
        if d.source == "file" and d.negatives_file:  # mined for the whole QA file, in its order
            lists = neg.load_negatives(d.negatives_file, all_examples)
            return [lists[j] for j in self.kept]
        if d.source == "file":
            return [[r for r in (_ctx_ref(c, self.evidence) for c in ex.hard_negative_ctxs or ()) if r is not None]
                    for ex in self.examples]
        # BM25: rank 0 mines, everyone gets the same lists.
        box = [None]
        if _world()[0] == 0:
            logger.info("mining BM25 hard negatives for %d questions", len(self.examples))
            box = [neg.mine_bm25(self.examples, self.evidence, d.mine_depth, d.search_depth)]
        if _world()[1] > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def num_train_samples(self) -> int:
        return len(self.examples)

    def _passage(self, ref: PassageRef) -> tuple[str, str]:
        if isinstance(ref, tuple):
            return ref
        row = int(self.evidence.row_of([ref])[0])
        return self.evidence.title(row), self.evidence.text(row)

    def _negatives_for(self, i: int, epoch: int) -> list[PassageRef]:
        n, pool = self.dpr.hard_negatives, self.negatives[i]
        rng = np.random.default_rng([self.cfg.seed, epoch, i])
        if self.dpr.sample_negatives and len(pool) > n:
            chosen = [pool[j] for j in sorted(rng.choice(len(pool), n, replace=False))]
        else:
            chosen = list(pool[:n])
        gold = {self.positives[i]} | set(self.examples[i].gold_passage_ids or ())
        while len(chosen) < n:  # too few mined: random passages
            pid = int(self.evidence.ids[rng.integers(len(self.evidence))])
            if pid not in gold:
                chosen.append(pid)
        return chosen

    def build_batch(self, indices: Sequence[int], epoch: int) -> DPRBatch:
        questions, contexts = [], []
        for i in indices:
            i = int(i)
            questions.append(self.examples[i].question)
            contexts.append(self._passage(self.positives[i]))
            contexts.extend(self._passage(r) for r in self._negatives_for(i, epoch))
        q_ids, q_mask = self.encode_queries(questions)
        c_ids, c_mask = self.encode_contexts(contexts)
        group = 1 + self.dpr.hard_negatives
        return DPRBatch(q_ids, q_mask, c_ids, c_mask, torch.arange(len(indices)) * group)

    def _needs_dense(self) -> bool:
        return self.dpr.hard_negatives > 0 and self.dpr.source == "dense"

    def make_batch(self, indices: Sequence[int]) -> DPRBatch:
        if self._needs_dense() and self._mined_epoch < 0:
            # First batch: mine with the initial model, now on its device and in its precision
            # (every rank calls make_batch here, so the collective index build lines up).
            self.mine_dense(self._biencoder, iteration=0)
        batch = self.build_batch(indices, self._epoch())
        self._count(len(indices))
        return batch

    def forward_step(self, models, batch: DPRBatch):
        biencoder = models["biencoder"]
        dev = next(biencoder.parameters()).device
        return self.inbatch_step(biencoder, batch.query_ids.to(dev), batch.query_mask.to(dev),
                                 batch.context_ids.to(dev), batch.context_mask.to(dev), batch.positives)

    # ------------------------------------------------------------------ dense mining
    def build_models(self):
        models = super().build_models()
        self._biencoder = models["biencoder"]  # cast and moved in place by the loop before training
        return models

    @torch.no_grad()
    def mine_dense(self, biencoder, iteration: int) -> None:
        """Re-embed the evidence with the current context tower and mine every question's
        negatives (collective: each rank searches a slice of the questions)."""
        was_training = biencoder.training
        biencoder.eval()
        try:
            index = self.build_eval_index(biencoder, iteration)
            rank, world = _world()
            lo, hi = len(self.examples) * rank // world, len(self.examples) * (rank + 1) // world
            mine = self.examples[lo:hi]
            _, ids = self.search_questions(biencoder, index, [e.question for e in mine], self.dpr.search_depth)
            lists = neg.filter_negatives(mine, ids.cpu().numpy(), self.evidence, self.dpr.mine_depth)
        finally:
            biencoder.train(was_training)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, lists)
            lists = [x for part in parts for x in part]
        self.negatives = lists
        self._mined_epoch = self._epoch()
        found = np.mean([len(x) for x in lists]) if lists else 0.0
        logger.info("mined dense hard negatives at iteration %d: %.1f per question", iteration, found)

    def on_step_end(self, models, iteration: int) -> None:
        k = self.dpr.remine_every_epochs
        if not (k and self._needs_dense()):
            return
        epoch = self._epoch()
        if epoch > self._mined_epoch and epoch % k == 0:
            self.mine_dense(models["biencoder"], iteration)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mined_epoch": self._mined_epoch}
