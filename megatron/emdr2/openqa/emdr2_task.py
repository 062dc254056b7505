"""The EMDR² training step: retrieve, re-score, read, and train reader and retriever jointly.

Per micro-batch of B questions:
  1. embed the questions with the query tower (gradient on);
  2. top-K passages from the (possibly stale) sharded index, skipping excluded ids (MSS);
  3. re-score the K passages with the current towers: scores = f_q(q)·f_d(z_k)/τ  [B, K];
  4. FiD reader over the K passages: teacher-forced answer NLL (the reader term);
  5. per-passage answer likelihoods from the same encoder states, decoder only, eval mode,
     no autograd (the stop-gradient of the retriever term);
  6. loss = reader + retriever term (``objectives.py``), averaged over the batch.
Steps 4-5 differ with --reader-mode individual-topk / joint-topk (``reader_modes.py``).
The index is refreshed by ``IndexManager`` after optimizer steps (synchronously, or by
indexer ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megatron.emdr2.config import ModelSize, TrainingConfig
from megatron.emdr2.data.inputs import (ANSWER_MAX_LEN, READER_LAYOUTS, READER_MAX_LEN, RETRIEVER_MAX_LEN,
                                        decoder_inputs, encode_answers, encode_context, encode_query,
                                        encode_reader_inputs)
from megatron.emdr2.data.neighbours import READER_CONTEXTS, neighbour_windows
from megatron.emdr2.objectives import ObjectiveConfig, joint_loss
from megatron.emdr2.openqa import builders, reader_modes
from megatron.emdr2.openqa.index_refresh import IndexManager, RefreshConfig
from megatron.emdr2.openqa.retrieval import build_index, search_excluding
from megatron.emdr2.openqa.retriever_anchor import RetrieverAnchor

logger = logging.getLogger(__name__)

TRAIN_ANSWERS = ("first", "random")


@dataclass
class OpenQAConfig:
    """What the EMDR²-style tasks (fine-tuning and MSS) share."""

    retriever: ModelSize
    reader: ModelSize
    top_k: int = 50
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    shared_towers: bool = False
    freeze_query_tower: bool = False
    freeze_context_tower: bool = False
    freeze_reader_encoder: bool = False
    retriever_lr_mult: float = 1.0
    reader_encoder_lr_mult: float = 1.0
    # --retriever-anchor-weight/-depth: hold the starting query tower's ranking (retriever_anchor.py)
    anchor_weight: float = 0.0
    anchor_depth: int = 100
    retriever_load: Optional[str] = None
    reader_load: Optional[str] = None
    retriever_bert_load: Optional[str] = None  # HF BERT dir or converted tower, into both towers
    reader_bert_load: Optional[str] = None  # the same, into the reader's encoder
    query_max_len: int = 64
    context_max_len: int = RETRIEVER_MAX_LEN
    reader_max_len: int = READER_MAX_LEN
    answer_max_len: int = ANSWER_MAX_LEN
    eval_max_questions: Optional[int] = None
    eval_batch_size: int = 8
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    complete_words: bool = False  # --complete-words (word_completion.py)
    stop_at_repeated_word: bool = False  # --stop-at-repeated-word (repeated_words.py)
    predictions_file: Optional[str] = None
    # Which gold answer a training question is taught: "first" (answers[0], always the same) or
    # "random" (the original's: a gold answer drawn afresh each time the question is drawn).
    train_answer: str = "first"
    # The k of the top-k retrieval accuracies that evaluations report (as "top{k}").
    eval_top_k: tuple = (1, 5, 20)
    # Search an existing index even if another context tower embedded it (logged as a warning).
    allow_index_mismatch: bool = False
    # What the reader reads of a retrieved passage: "passage" (it alone) or "neighbours" (the
    # original's: extended with its article neighbours up to reader_max_len; data/neighbours.py),
    # and the row layout: "prompt" ("question: q title: t context: c") or "original" (the
    # original's [CLS] q [SEP] t [SEP] c [SEP]; data/inputs.py).
    reader_context: str = "passage"
    reader_format: str = "prompt"

    def __post_init__(self):
        if self.train_answer not in TRAIN_ANSWERS:
            raise ValueError(f"train_answer {self.train_answer!r} is not one of {TRAIN_ANSWERS}")
        if self.reader_context not in READER_CONTEXTS:
            raise ValueError(f"reader_context {self.reader_context!r} is not one of {READER_CONTEXTS}")
        if self.reader_format not in READER_LAYOUTS:
            raise ValueError(f"reader_format {self.reader_format!r} is not one of {READER_LAYOUTS}")
        self.eval_top_k = tuple(int(k) for k in self.eval_top_k)
        if not self.eval_top_k or min(self.eval_top_k) < 1:
            raise ValueError(f"eval_top_k {self.eval_top_k}: give one or more k >= 1")


@dataclass
class QABatch:
    questions: list[str]
    answers: list[list[str]]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    decoder_ids: torch.Tensor
    exclude_ids: Optional[torch.Tensor] = None  # [B, E] passage ids never to retrieve (-1 = none)
    include_ids: Optional[torch.Tensor] = None  # [B] a passage each row must read (MSS's source)

    def to(self, device) -> "QABatch":
        """The batch with its tensors on ``device`` (batches are built on the CPU)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if torch.is_tensor(getattr(self, f.name))})


def _tensor_parallel_rank(tp: int) -> int:
    if tp == 1:
        return 0
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def with_required_passages(ids: torch.Tensor, required: torch.Tensor) -> torch.Tensor:
    """[B, k] retrieved ids where each row's ``required`` id replaces the lowest-ranked one unless
    retrieval already found it. The retriever still scores the row afresh, so its objective sees
    the required passage like any other (the index score returned beside it is left stale)."""
    required = required.to(ids.device).view(-1, 1)
    missing = ~(ids == required).any(dim=1)
    ids = ids.clone()
    ids[missing, -1] = required[missing, 0]
    return ids


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class OpenQATask:
    """EMDR² fine-tuning on (question, answers) pairs; MSS subclasses it with other examples."""

    def __init__(self, qa_cfg: OpenQAConfig, cfg: TrainingConfig, train_examples, dev_examples,
                 evidence, retriever_tok, reader_tok, refresh: RefreshConfig,
                 test_sets: Sequence = (), test_out_dir: Optional[str] = None):
        """``test_sets``: (name, path, examples) scored on the final model after training, each
        written to ``test_out_dir``/<name>.json (``on_train_end``)."""
        self.qa, self.cfg = qa_cfg, cfg
        self.train_examples, self.dev_examples = train_examples, dev_examples
        self.evidence = evidence
        if evidence is not None and qa_cfg.top_k > len(evidence):
            from megatron.emdr2.config import ConfigError

            raise ConfigError(f"--top-k {qa_cfg.top_k} is more than the {len(evidence)} passages of the evidence "
                              f"{evidence.path}")
        if evidence is not None and qa_cfg.anchor_weight > 0 and qa_cfg.anchor_depth > len(evidence):
            from megatron.emdr2.config import ConfigError

            raise ConfigError(f"--retriever-anchor-depth {qa_cfg.anchor_depth} is more than the {len(evidence)} "
                              f"passages of the evidence {evidence.path}")
        self.rtok, self.tok = retriever_tok, reader_tok
        self.refresh_cfg = refresh
        self.index_manager: Optional[IndexManager] = None
        self._biencoder = None
        self._frozen_contexts: dict[int, torch.Tensor] = {}  # passage id -> embedding (frozen tower)
        self._anchor: Optional[RetrieverAnchor] = None
        self._iteration = 0  # optimizer steps done (checkpointed): keys the "random" answer draws
        self.test_sets, self.test_out_dir = list(test_sets), test_out_dir
        # This training run, written in the manifests of the index versions it builds: on a resume
        # an index of the same run is accepted although its tower is some steps older.
        self._run_id = uuid.uuid4().hex
        self._accepted_index_fingerprints: list[str] = []  # indexes accepted when the run started
        self._index_todo: Optional[str] = None  # "check" / "build" once resumed weights are in
        self._checkpoint_index_version: Optional[str] = None  # from a resumed checkpoint
        self._build_sync = None

    # ------------------------------------------------------------------ models
    def build_models(self):
        if self.qa.objective.reader_mode != "fid":
            logger.info("reader mode %s (docs/objectives.md)", self.qa.objective.reader_mode)
        p, tp = self.cfg.precision.precision, self.cfg.parallel.tensor_parallel
        biencoder = builders.build_biencoder(
            self.qa.retriever, self.rtok.vocab_size, p, tp, shared=self.qa.shared_towers,
            freeze_query=self.qa.freeze_query_tower, freeze_context=self.qa.freeze_context_tower)
        reader = builders.build_reader(self.qa.reader, self.tok.vocab_size, self.tok.real_vocab_size, p, tp)
        from megatron.emdr2.models.tp_state import shard_for

        # Pretrained weights saved at any tensor-parallel size, as this rank's shard.
        at_tp = dict(tensor_parallel=tp, tp_rank=_tensor_parallel_rank(tp))
        if self.qa.retriever_load:
            state = builders.load_model_state(self.qa.retriever_load, "biencoder", **at_tp)
            if not self.qa.shared_towers and not any(k.startswith("context_tower.") for k in state):
                # a shared-tower retriever (e.g. ICT) starts both of our separate towers
                state = {**state, **{"context_tower." + k[len("query_tower."):]: v
                                     for k, v in state.items() if k.startswith("query_tower.")}}
            builders.load_into(biencoder, state, self.qa.retriever_load)
        elif self.qa.retriever_bert_load:
            tower = builders.load_bert_tower_state(self.qa.retriever_bert_load, self.qa.retriever.num_layers,
                                                   self.qa.retriever.seq_length)
            for module in {id(t): t for t in (biencoder.query_tower, biencoder.context_encoder)}.values():
                builders.load_into(module, shard_for(module, tower), self.qa.retriever_bert_load)
        if self.qa.reader_load:
            builders.load_into(reader, builders.load_model_state(self.qa.reader_load, "reader", **at_tp),
                               self.qa.reader_load)
        elif self.qa.reader_bert_load:
            tower = builders.load_bert_tower_state(self.qa.reader_bert_load, self.qa.reader.num_layers,
                                                   self.qa.reader.seq_length)
            builders.bert_into_reader_encoder(reader, tower, self.qa.reader_bert_load)
        if self.qa.freeze_reader_encoder:
            reader.freeze_encoder()
        if self.qa.anchor_weight > 0:
            # Taken before a resume replaces the weights: the anchor is always the run's start.
            start = builders.build_tower(self.qa.retriever, self.rtok.vocab_size, p, tp)
            start.load_state_dict(biencoder.query_tower.state_dict())
            self._anchor = RetrieverAnchor(start, self.qa.anchor_weight, self.qa.anchor_depth, self.qa.top_k)
        self._biencoder = biencoder
        self._start_index(biencoder)
        return {"biencoder": biencoder, "reader": reader}

    def _start_index(self, biencoder) -> None:
        from megatron.emdr2.index import shard_store

        from megatron.emdr2.training.setup import to_compute_device

        r = self.refresh_cfg
        # Embed the first index on the GPU, not the host; the loop would move it there anyway.
        to_compute_device(biencoder)
        if self.qa.freeze_context_tower and r.interval:
            # A frozen context tower would re-embed the same vectors: never refresh.
            logger.info("context tower frozen: the index is not refreshed (interval %d ignored)", r.interval)
            r = dataclasses.replace(r, interval=0)

        from megatron.emdr2.openqa.index_refresh import _broadcast_object

        self._run_id = _broadcast_object(self._run_id)  # one id for all trainer ranks

        def build_sync(step: int) -> str:
            out = f"{r.index_dir}/{shard_store.version_name(step)}"
            return build_index(biencoder, self.rtok, self.evidence, out, model_step=step,
                               batch_size=r.embed_batch_size, max_len=self.qa.context_max_len,
                               extra={"run_id": self._run_id})

        def context_state() -> dict:
            # The indexer ranks run the tower unsharded: hand them the whole of it (collective
            # over the tensor-parallel group).
            from megatron.emdr2.models.tp_state import full_state_dict

            return full_state_dict(biencoder.context_encoder)

        self._build_sync = build_sync
        # The index shard sits on this rank's GPU where there is one: the search at every step
        # is a matmul against it (N·d·2 bytes / ranks of GPU memory).
        index_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.index_manager = IndexManager(r, build_sync, context_state, device=index_device,
                                          tower_meta=lambda: {"run_id": self._run_id})
        resuming = self._resuming()
        if shard_store.nothing_published(r.index_dir):
            if resuming:  # embed with the resumed weights, once they are loaded (on_train_start)
                self._index_todo = "build"
                return
            logger.info("no index in %s yet: embedding the evidence with the initial context tower", r.index_dir)
            self.index_manager.load(build_sync(0))
            return
        self.index_manager.load(r.index_dir)
        if resuming:  # the weights that will search it are not loaded yet
            self._index_todo = "check"
        else:
            self._check_index(biencoder, resumed=False)

    def _resuming(self) -> bool:
        """Will the training loop replace the weights from --load (resume or fine-tune)?"""
        from megatron.emdr2.training import checkpointing as ckpt

        c = getattr(self.cfg, "checkpoint", None)
        if c is None or not c.load:
            return False
        try:
            return ckpt.resolve_iteration(c.load, c.load_iteration) is not None
        except ckpt.CheckpointError:
            return True  # the loop reports it

    def _tower_source(self, resumed: bool) -> str:
        """Where the context tower's weights came from, for messages."""
        if resumed:
            return f"checkpoint {self.cfg.checkpoint.load}"
        if self.qa.retriever_load:
            return f"checkpoint {self.qa.retriever_load}"
        if self.qa.retriever_bert_load:
            return f"BERT {self.qa.retriever_bert_load}"
        return f"a randomly initialised context tower (seed {self.cfg.seed})"

    def _check_index(self, biencoder, resumed: bool, iteration: int = 0) -> None:
        """Was the loaded index embedded by this model's context tower (``index/fingerprint.py``)?
        A version this run built (its manifest carries the run's id), or on a resume the one the
        run started from, is accepted too: the index legitimately lags the towers during training
        (the lag is logged)."""
        from megatron.emdr2.index import fingerprint as fp
        from megatron.emdr2.index import shard_store

        manifest = shard_store.read_manifest(self.index_manager.version_dir)
        width = biencoder.query_tower.hidden_size
        if manifest.dim != width:  # no flag can make such an index searchable
            raise shard_store.IndexStoreError(f"{manifest.directory}: index dim {manifest.dim} != the query tower's "
                                              f"width {width} (an index of another model)")
        recorded = fp.recorded_fingerprint(manifest)
        if recorded is not None:
            if (manifest.extra or {}).get("run_id") == self._run_id:
                logger.info("%s: built by this run at step %d (%d steps behind iteration %d)",
                            manifest.directory, manifest.model_step, iteration - manifest.model_step, iteration)
                return
            if resumed and recorded in self._accepted_index_fingerprints:
                logger.info("%s: the index this run started from (model step %d, %d steps behind)",
                            manifest.directory, manifest.model_step, iteration - manifest.model_step)
                return
        status = fp.check(manifest, fp.tower_fingerprint(biencoder.context_encoder),
                          self._tower_source(resumed), self.qa.allow_index_mismatch, logger)
        if recorded is not None and status != "unrecorded" and recorded not in self._accepted_index_fingerprints:
            self._accepted_index_fingerprints.append(recorded)

    def on_train_start(self, models, iteration: int) -> None:
        """After a resume / fine-tuning load: check the existing index against the weights now in
        the towers, or embed the evidence with them when there was none."""
        todo, self._index_todo = self._index_todo, None
        if todo == "build":
            logger.info("no index in %s: embedding the evidence with the loaded context tower",
                        self.refresh_cfg.index_dir)
            self.index_manager.load(self._build_sync(iteration))
        elif todo == "check":
            self._reload_checkpoint_index()
            self._check_index(self._biencoder, resumed=True, iteration=iteration)

    # ------------------------------------------------------------------ data
    def num_train_samples(self) -> int:
        return len(self.train_examples)

    def _target_answer(self, example, index: int) -> str:
        """The gold answer to train on. "first": answers[0]. "random": the original's rule (its
        OpenQADataset.__getitem__ shuffles the answers with a seeded RNG on every draw and takes
        the first), drawn here from (seed, iteration, dataset index) alone, so the draw is the
        same whatever the number of ranks and after a resume."""
        if self.qa.train_answer == "first" or len(example.answers) == 1:
            return example.answers[0]
        rng = np.random.default_rng([self.cfg.seed, self._iteration, index])
        return example.answers[int(rng.integers(len(example.answers)))]

    def make_batch(self, indices: Sequence[int]) -> QABatch:
        examples = [self.train_examples[int(i)] for i in indices]
        return self._qa_batch(examples, [self._target_answer(e, int(i)) for e, i in zip(examples, indices)])

    def _qa_batch(self, examples, targets: list[str], exclude=None) -> QABatch:
        q_ids, q_mask = encode_query(self.rtok, [e.question for e in examples], self.qa.query_max_len,
                                     pad_to="longest")
        labels, label_mask = encode_answers(self.tok, targets, self.qa.answer_max_len, pad_to="longest")
        dec = decoder_inputs(labels, label_mask, self.tok.bos_id, self.tok.pad_id)
        return QABatch([e.question for e in examples], [e.answers for e in examples], q_ids, q_mask,
                       labels, label_mask, dec, exclude)

    # ------------------------------------------------------------------ step
    def retrieve(self, biencoder, batch: QABatch, k: int, grad: bool = True):
        """(query embeddings [B, H], retrieved ids [B, k], their index scores [B, k])."""
        dev = module_device(biencoder)
        q_emb = biencoder.embed_queries(batch.query_ids.to(dev), batch.query_mask.to(dev))
        index_scores, ids = search_excluding(self.index_manager.index, q_emb.detach().float(), k,
                                             batch.exclude_ids)
        if batch.include_ids is not None:
            ids = with_required_passages(ids, batch.include_ids)
        return q_emb, ids, index_scores

    def passages(self, ids: torch.Tensor) -> list[list[tuple[str, str]]]:
        rows = self.evidence.row_of(ids.cpu().numpy())
        flat = self.evidence.passages(rows.reshape(-1))
        K = ids.size(1)
        return [flat[b * K:(b + 1) * K] for b in range(ids.size(0))]

    def reader_inputs(self, questions: list[str], passages: list[list[tuple[str, str]]]):
        """[B, K, S] reader rows as --reader-context / --reader-format say; with neighbours the
        passages must be the `Evidence.Passage`s of `passages()` (they carry their rows)."""
        windows = [None] * len(passages)
        if self.qa.reader_context == "neighbours":
            windows = neighbour_windows(self.evidence, self.tok, passages)
        pairs = [encode_reader_inputs(self.tok, q, ps, self.qa.reader_max_len, pad_to="longest",
                                      layout=self.qa.reader_format, windows=w,
                                      question_max_len=self.qa.query_max_len)
                 for q, ps, w in zip(questions, passages, windows)]
        width = max(ids.size(1) for ids, _ in pairs)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.size(1)), value=v)
        ids = torch.stack([pad(i, self.tok.pad_id) for i, _ in pairs])
        mask = torch.stack([pad(m, 0) for _, m in pairs])
        return ids, mask  # [B, K, S]

    FROZEN_CACHE_ENTRIES = 1_000_000

    def _embed_contexts_eval(self, biencoder, passages) -> torch.Tensor:
        """[N, H] embeddings of ``passages`` by the context tower in eval mode (as the index was
        embedded), without gradient."""
        c_ids, c_mask = encode_context(self.rtok, passages, self.qa.context_max_len, pad_to="longest")
        tower = biencoder.context_encoder
        was_training = tower.training
        tower.eval()
        dev = module_device(tower)
        with torch.no_grad():
            emb = tower(c_ids.to(dev), c_mask.to(dev))
        tower.train(was_training)
        return emb

    def _frozen_context_embeddings(self, biencoder, ids: torch.Tensor, passages) -> torch.Tensor:
        """[B, K, H] embeddings of a frozen context tower: each passage embedded once (in eval
        mode, as the index was), then reused; a frozen tower would recompute the same vectors."""
        flat_ids = ids.reshape(-1).tolist()
        flat = [p for ps in passages for p in ps]
        todo = sorted({i for i in flat_ids if i not in self._frozen_contexts})
        if todo:
            first = {i: flat[flat_ids.index(i)] for i in todo}
            emb = self._embed_contexts_eval(biencoder, [first[i] for i in todo])
            if len(self._frozen_contexts) + len(todo) > self.FROZEN_CACHE_ENTRIES:
                self._frozen_contexts.clear()  # bounded memory at full scale
            # Kept in host memory: a million cached vectors would not fit beside the model on a GPU.
            self._frozen_contexts.update(zip(todo, emb.cpu()))
        out = torch.stack([self._frozen_contexts[i] for i in flat_ids]).view(*ids.shape, -1)
        return out.to(module_device(biencoder))

    def _context_embeddings_no_grad(self, biencoder, ids: torch.Tensor) -> torch.Tensor:
        """[B, N, H] passage embeddings without gradient (the anchor's ``depth`` passages per
        question): a frozen tower's are the index's own vectors (its fingerprint was checked
        against this tower), so none is embedded again; else the current tower in eval mode."""
        if biencoder.freeze_context:
            return self.index_manager.index.vectors_of(ids).to(module_device(biencoder))
        passages = self.passages(ids)
        return self._embed_contexts_eval(biencoder, [p for ps in passages for p in ps]).view(*ids.shape, -1)

    def forward_step(self, models, batch: QABatch):
        biencoder, reader = models["biencoder"], models["reader"]
        batch = batch.to(module_device(reader))  # built on the CPU by make_batch
        K = self.qa.top_k
        q_emb, ids, _ = self.retrieve(biencoder, batch, K)
        passages = self.passages(ids)

        # Re-score the retrieved passages with the current towers (gradient into both).
        if biencoder.freeze_context:
            c_emb = self._frozen_context_embeddings(biencoder, ids, passages)
        else:
            c_ids, c_mask = encode_context(self.rtok, [p for ps in passages for p in ps],
                                           self.qa.context_max_len, pad_to="longest")
            dev = module_device(biencoder)
            c_emb = biencoder.embed_contexts(c_ids.to(dev), c_mask.to(dev)).view(len(passages), K, -1)
        scores = biencoder.score(q_emb, c_emb)

        r_ids, r_mask = (t.to(module_device(reader)) for t in self.reader_inputs(batch.questions, passages))
        states, memory_mask = reader.encode(r_ids, r_mask)
        memory_ids = r_ids.view(memory_mask.shape)
        # The reader's terms as --reader-mode reads the passages (reader_modes.py): the FiD NLL
        # -log p(a | q, Z) summed over answer tokens, and the per-passage log-likelihoods.
        reader_nll, token_lp = reader_modes.reader_terms(self.qa.objective, reader, states, memory_mask,
                                                         memory_ids, batch, scores, K, step=self._iteration)
        dev = scores.device  # the objective runs beside the scores (the retriever's device)
        out = joint_loss(self.qa.objective, scores, token_lp.to(dev), batch.label_mask.float().to(dev),
                         None if reader_nll is None else reader_nll.to(dev), step=self._iteration)
        p_top1 = out.log_p_z.exp()[:, 0].mean()
        metrics = {"reader_loss": out.reader_loss, "retriever_loss": out.retriever_loss, "p_top1": p_top1}
        loss = out.loss
        if self._anchor is not None:
            anchor = self._anchor.loss(biencoder, batch.query_ids, batch.query_mask, q_emb, self.index_manager.index,
                                       lambda top: self._context_embeddings_no_grad(biencoder, top),
                                       batch.exclude_ids)
            loss = loss + anchor.to(loss.device)
            metrics["anchor_drift"] = anchor.detach() / self._anchor.weight
        if self.qa.objective.retriever_objective == "hard-em":  # 0 during --hard-em-after-steps' MML phase
            metrics["hard_em"] = float(self.qa.objective.effective_objective(self._iteration) == "hard-em")
        return loss, metrics

    # ------------------------------------------------------------------ hooks
    def lr_multipliers(self) -> dict:
        return {"biencoder": self.qa.retriever_lr_mult,
                "reader:encoder.,embedding.": self.qa.reader_encoder_lr_mult}

    def on_step_end(self, models, iteration: int) -> None:
        self._iteration = iteration
        self.index_manager.after_step(iteration)

    def extra_metrics(self, iteration: int) -> dict:
        index = self.index_manager.index
        return {"index_staleness": float(self.index_manager.staleness(iteration)),
                "index_step": float(index.model_step if index is not None else 0)}

    def evaluate(self, models, iteration: int) -> dict:
        from megatron.emdr2.openqa.evaluation import evaluate_open_qa

        examples = self.dev_examples
        if self.qa.eval_max_questions:
            examples = examples[: self.qa.eval_max_questions]
        metrics = evaluate_open_qa(self, models, examples, iteration=iteration,
                                   predictions_file=self.qa.predictions_file)
        metrics["score"] = metrics["em"]
        return metrics

    def on_train_end(self, models, iteration: int) -> Optional[dict]:
        """Score every --test-data file on the final model; {name: metrics} for the log."""
        if not self.test_sets:
            return None
        from megatron.emdr2.openqa.evaluation import score_files

        return score_files(self, models, self.test_sets, self.test_out_dir, iteration)

    def checkpoint_meta(self) -> dict:
        from dataclasses import asdict

        return {"retriever": asdict(self.qa.retriever), "reader": asdict(self.qa.reader),
                "shared_towers": self.qa.shared_towers, "vocab_file": self.rtok.vocab_file,
                "top_k": self.qa.top_k, "query_max_len": self.qa.query_max_len,
                "context_max_len": self.qa.context_max_len, "reader_max_len": self.qa.reader_max_len,
                "answer_max_len": self.qa.answer_max_len,
                # how the reader reads the passages: evaluate/answer read them the same way
                "reader_mode": self.qa.objective.reader_mode,
                "reader_context": self.qa.reader_context, "reader_format": self.qa.reader_format,
                # how this run decoded its dev answers: evaluate/answer default to the same
                "no_repeat_ngram_size": self.qa.no_repeat_ngram_size, "num_beams": self.qa.num_beams,
                "complete_words": self.qa.complete_words,
                "stop_at_repeated_word": self.qa.stop_at_repeated_word}

    def state_dict(self) -> dict:
        return {"index_version": self.index_manager.version if self.index_manager else None,
                "iteration": self._iteration, "run_id": self._run_id,
                "accepted_index_fingerprints": list(self._accepted_index_fingerprints)}

    def _reload_checkpoint_index(self) -> None:
        """Resume with the index version the checkpoint was searching, when it is still on
        disk, so the resumed steps retrieve exactly what the uninterrupted run did; a newer
        version (refreshed after the checkpoint) is picked up at the next refresh."""
        wanted = self._checkpoint_index_version
        if not wanted or wanted == self.index_manager.version or not re.fullmatch(r"step-\d+", wanted):
            return  # (a name from a checkpoint never leads outside the index directory)
        path = os.path.join(self.refresh_cfg.index_dir, wanted)
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            logger.info("the checkpoint's index %s is gone: resuming with %s", wanted, self.index_manager.version)
            return
        logger.info("resuming with the checkpoint's index %s (newest: %s)", wanted, self.index_manager.version)
        self.index_manager.load(path)

    def load_state_dict(self, state: dict) -> None:
        # The checkpoint's index version is reloaded at start when it still exists (else the
        # newest is used); the iteration keys answer draws.
        self._checkpoint_index_version = state.get("index_version")
        self._iteration = int(state.get("iteration", 0))
        # The run continues: its index versions (and the index it started from) stay valid.
        self._run_id = state.get("run_id", self._run_id)
        self._accepted_index_fingerprints = list(state.get("accepted_index_fingerprints", []))

    def close(self) -> None:
        if self.index_manager is not None:
            self.index_manager.close()
