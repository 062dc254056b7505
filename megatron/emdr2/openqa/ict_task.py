"""ICT (inverse cloze task) retriever pre-training, and the base shared with DPR training.

ICT (Lee et al. 2019, as in the EMDR² paper): a random sentence of an evidence block is the
pseudo-query for that block; the block keeps the sentence with probability 0.1 (so the
retriever learns more than lexical overlap, yet still rewards it a little). Blocks are
``[CLS] title [SEP] block [SEP]`` cut to 256 tokens; queries ``[CLS] sentence [SEP]``. The loss
is the in-batch softmax over the all-gathered data-parallel batch (``inbatch.py``).

Sentence splitting: a regex splitter (``split_sentences``) instead of spaCy/NLTK: it has no
model to download, is deterministic, and is fast enough to split blocks as they are sampled
(no pre-pass over 21M passages). Blocks with a single sentence fall back to word windows.

Randomness (which sentence, whether it stays) is a function of (seed, epoch, block) only, so a
run on D ranks sees exactly the samples of a run on one process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.config import ModelSize, TrainingConfig
from megatron.emdr2.data.inputs import RETRIEVER_MAX_LEN, encode_context, encode_query
from megatron.emdr2.openqa import builders
from megatron.emdr2.openqa.inbatch import inbatch_loss

logger = logging.getLogger(__name__)

EVAL_KS = (1, 5, 20, 100)
CONFIG_FILE = "retriever_config.json"  # architecture for tools/build_index.py --config

# ----------------------------------------------------------------------------- sentences

_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
# Words ending in '.' that rarely end a sentence (a boundary after them is not split).
_ABBREVIATIONS = frozenset("""mr mrs ms dr prof st sr jr vs etc no fig inc ltd co corp gen col lt sgt
capt jan feb mar apr jun jul aug sep sept oct nov dec mt ft approx est u.s u.k e.g i.e""".split())


def split_sentences(text: str) -> list[str]:
    """Split at '.', '!' or '?' (plus closing quotes/brackets) followed by whitespace and an
    upper-case letter or digit, except after known abbreviations and single initials."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        before = text[start:m.start() + 1].split()
        word = before[-1].rstrip(".").lower() if before else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def pseudo_sentences(text: str, window: int = 20) -> list[str]:
    """Sentences, or windows of ``window`` words when the block has fewer than two sentences."""
    sentences = split_sentences(text)
    if len(sentences) >= 2:
        return sentences
    words = text.split()
    return [" ".join(words[i:i + window]) for i in range(0, len(words), window)] or [text]


def ict_pair(text: str, rng: np.random.Generator, keep_prob: float = 0.1) -> tuple[str, str, bool]:
    """(pseudo-query sentence, block text, whether the sentence was kept in the block)."""
    sentences = pseudo_sentences(text)
    j = int(rng.integers(len(sentences)))
    keep = bool(rng.random() < keep_prob) or len(sentences) == 1
    block = sentences if keep else sentences[:j] + sentences[j + 1:]
    return sentences[j], " ".join(block), keep


# ----------------------------------------------------------------------------- shared base


@dataclass
class RetrieverTaskConfig:
    """What ICT and DPR training share: the towers, their inputs, and dev evaluation."""

    size: ModelSize
    query_max_len: int = 64
    context_max_len: int = RETRIEVER_MAX_LEN
    shared_towers: bool = False
    post_layernorm: bool = False  # True for towers initialised from Hugging Face BERT
    retriever_load: Optional[str] = None  # a biencoder (our checkpoint or .pt)
    bert_load: Optional[str] = None  # one BERT tower copied into both (e.g. tools/convert_hf_bert.py)
    index_dir: Optional[str] = None  # where evaluation indexes go (default <save>/eval-index)
    eval_ks: Sequence[int] = EVAL_KS
    score_k: int = 20  # 'score' (best checkpoint) = dev top-score_k accuracy
    eval_max_questions: Optional[int] = None
    embed_batch_size: int = 128
    vocab_file: Optional[str] = None
    score_scale: Optional[float] = None  # default 1/sqrt(hidden)


def _world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _load_tower_state(path: str, size: ModelSize) -> dict:
    """A BERT tower state dict (its first ``size.num_layers`` layers) from a Hugging Face BERT
    directory, a converter directory (mp_rank_00.pt) or a .pt file."""
    return builders.load_bert_tower_state(path, size.num_layers, size.seq_length)


def _vocab_rows(state: dict, where: str) -> int:
    for key, value in state.items():
        if key.endswith("embedding.word_embeddings.weight"):
            return int(value.shape[0])
    raise builders.PretrainedError(f"{where}: no embedding.word_embeddings.weight in the state dict")


class RetrieverTrainingTask:
    """Builds the biencoder (random, BERT or retriever initialisation), evaluates dev top-k
    retrieval accuracy with a freshly embedded evidence index, and records the architecture."""

    def __init__(self, rcfg: RetrieverTaskConfig, cfg: TrainingConfig, tokenizer, evidence, dev_examples):
        self.r, self.cfg = rcfg, cfg
        self.tok, self.evidence, self.dev = tokenizer, evidence, dev_examples
        self.vocab_size = tokenizer.vocab_size
        self._eval_version: Optional[str] = None
        self.consumed_samples = 0  # global samples handed out: gives the epoch of a micro-batch

    # ------------------------------------------------------------------ data position
    def _epoch(self) -> int:
        gbs = self.cfg.batch.global_batch_size
        per_epoch = max(self.num_train_samples() // gbs * gbs, 1)
        return self.consumed_samples // per_epoch

    def _count(self, micro_batch: int) -> None:
        from megatron.core import parallel_state as ps

        # Each make_batch call is one micro-step of micro_batch x DP samples over all ranks.
        self.consumed_samples += micro_batch * ps.get_data_parallel_world_size()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state.get("consumed_samples", 0))

    # ------------------------------------------------------------------ models
    def build_models(self):
        r = self.r
        init_state, init_path, tower_state = None, None, None
        if r.retriever_load:
            init_state, init_path = builders.load_model_state(r.retriever_load, "biencoder"), r.retriever_load
            self.vocab_size = _vocab_rows(init_state, r.retriever_load)
        elif r.bert_load:
            tower_state = _load_tower_state(r.bert_load, r.size)
            self.vocab_size = _vocab_rows(tower_state, r.bert_load)
        biencoder = builders.build_biencoder(r.size, self.vocab_size, self.cfg.precision.precision,
                                             self.cfg.parallel.tensor_parallel, shared=r.shared_towers,
                                             score_scale=r.score_scale, post_layernorm=r.post_layernorm)
        if init_state is not None:
            builders.load_into(biencoder, init_state, init_path)
        if tower_state is not None:
            for tower in {id(t): t for t in (biencoder.query_tower, biencoder.context_encoder)}.values():
                builders.load_into(tower, tower_state, r.bert_load)
        self._write_config()
        return {"biencoder": biencoder}

    def retriever_config(self) -> dict:
        """The architecture in tools/build_index.py's RetrieverConfig keys."""
        s = self.r.size
        return {"num_layers": s.num_layers, "hidden_size": s.hidden_size,
                "num_attention_heads": s.num_attention_heads, "ffn_hidden_size": s.ffn_hidden_size,
                "vocab_size": self.vocab_size, "max_sequence_length": s.seq_length, "num_tokentypes": 2,
                "post_layernorm": self.r.post_layernorm, "layernorm_epsilon": 1e-12,
                "shared": self.r.shared_towers, "pooling": s.pooling, "vocab_file": self.r.vocab_file,
                "lower_case": getattr(self.tok, "lower_case", True)}

    def _write_config(self) -> None:
        save = self.cfg.checkpoint.save
        if not save or _world()[0] != 0:
            return
        os.makedirs(save, exist_ok=True)
        tmp = os.path.join(save, f".{CONFIG_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.retriever_config(), f, indent=1)
        os.replace(tmp, os.path.join(save, CONFIG_FILE))

    # ------------------------------------------------------------------ inputs
    def encode_queries(self, questions: Sequence[str]):
        return encode_query(self.tok, questions, self.r.query_max_len, pad_to="longest")

    def encode_contexts(self, passages: Sequence[tuple[str, str]]):
        return encode_context(self.tok, passages, self.r.context_max_len, pad_to="longest")

    def inbatch_step(self, biencoder, q_ids, q_mask, c_ids, c_mask, positives):
        q = biencoder.embed_queries(q_ids, q_mask)
        c = biencoder.embed_contexts(c_ids, c_mask)
        return inbatch_loss(q, c, positives, biencoder.score_scale)

    # ------------------------------------------------------------------ evaluation
    def _index_root(self) -> str:
        root = self.r.index_dir or (os.path.join(self.cfg.checkpoint.save, "eval-index")
                                    if self.cfg.checkpoint.save else None)
        if root is None:  # one temporary directory, chosen by rank 0
            box = [tempfile.mkdtemp(prefix="retriever-eval-") if _world()[0] == 0 else None]
            if _world()[1] > 1:
                dist.broadcast_object_list(box, src=0)
            self.r.index_dir = root = box[0]
        return root

    def build_eval_index(self, biencoder, iteration: int):
        """Embed the evidence with the current context tower; returns the loaded ShardedIndex."""
        from megatron.emdr2.index import ShardedIndex, shard_store
        from megatron.emdr2.openqa.retrieval import build_index

        out = os.path.join(self._index_root(), shard_store.version_name(iteration))
        build_index(biencoder, self.tok, self.evidence, out, model_step=iteration,
                    batch_size=self.r.embed_batch_size, max_len=self.r.context_max_len, progress=False)
        index = ShardedIndex.load(out, device=next(biencoder.parameters()).device, verify=False)
        rank, world = _world()
        if world > 1:
            dist.barrier()  # every rank holds its slice in memory before the old version goes
        if rank == 0 and self._eval_version and self._eval_version != out:
            shutil.rmtree(self._eval_version, ignore_errors=True)  # only the version we wrote
        self._eval_version = out
        return index

    def search_questions(self, biencoder, index, questions: Sequence[str], k: int, batch_size: int = 64):
        """(scores, ids) [len(questions), k] for this rank's questions; collective over ranks."""
        device = next(biencoder.parameters()).device
        embs = []
        for a in range(0, len(questions), batch_size):
            ids, mask = self.encode_queries(questions[a:a + batch_size])
            embs.append(biencoder.embed_queries(ids.to(device), mask.to(device)).float())
        q = torch.cat(embs) if embs else torch.zeros(0, biencoder.query_tower.hidden_size, device=device)
        return index.search(q, k)

    def evaluate(self, models, iteration: int) -> dict:
        from megatron.emdr2.openqa.retrieval import first_hit_ranks, top_k_accuracy

        biencoder = models["biencoder"]
        examples = self.dev[: self.r.eval_max_questions] if self.r.eval_max_questions else self.dev
        if not examples:
            return {}
        index = self.build_eval_index(biencoder, iteration)
        rank, world = _world()
        lo, hi = len(examples) * rank // world, len(examples) * (rank + 1) // world
        mine = examples[lo:hi]
        _, ids = self.search_questions(biencoder, index, [e.question for e in mine], max(self.r.eval_ks))
        passages = [self.evidence.passages(self.evidence.row_of(line)) for line in ids.cpu().numpy()]
        ranks = first_hit_ranks([e.answers for e in mine], passages)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, ranks)
            ranks = np.concatenate(parts)
        metrics = top_k_accuracy(ranks, self.r.eval_ks)
        metrics["questions"] = int(len(ranks))
        metrics["score"] = metrics[f"top{self.r.score_k}"]
        return metrics


# ----------------------------------------------------------------------------- ICT


@dataclass
class ICTBatch:
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    context_ids: torch.Tensor
    context_mask: torch.Tensor
    positives: torch.Tensor  # [B]: query i's block is context i
    kept: torch.Tensor  # [B] bool: the sentence stayed in its block


class ICTTask(RetrieverTrainingTask):
    """Inverse cloze task over the evidence blocks (one training sample per passage)."""

    def __init__(self, rcfg: RetrieverTaskConfig, cfg: TrainingConfig, tokenizer, evidence, dev_examples,
                 keep_prob: float = 0.1):
        super().__init__(rcfg, cfg, tokenizer, evidence, dev_examples)
        self.keep_prob = keep_prob

    def num_train_samples(self) -> int:
        return len(self.evidence)

    def build_batch(self, rows: Sequence[int], epoch: int) -> ICTBatch:
        queries, blocks, kept = [], [], []
        for row in rows:
            rng = np.random.default_rng([self.cfg.seed, epoch, int(row)])
            sentence, block, keep = ict_pair(self.evidence.text(int(row)), rng, self.keep_prob)
            queries.append(sentence)
            blocks.append((self.evidence.title(int(row)), block))
            kept.append(keep)
        q_ids, q_mask = self.encode_queries(queries)
        c_ids, c_mask = self.encode_contexts(blocks)
        return ICTBatch(q_ids, q_mask, c_ids, c_mask, torch.arange(len(rows)), torch.tensor(kept))

    def make_batch(self, indices: Sequence[int]) -> ICTBatch:
        batch = self.build_batch(indices, self._epoch())
        self._count(len(indices))
        return batch

    def forward_step(self, models, batch: ICTBatch):
        biencoder = models["biencoder"]
        dev = next(biencoder.parameters()).device
        loss, metrics = self.inbatch_step(biencoder, batch.query_ids.to(dev), batch.query_mask.to(dev),
                                          batch.context_ids.to(dev), batch.context_mask.to(dev), batch.positives)
        return loss, metrics

