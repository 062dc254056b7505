"""Retrieval glue shared by the tasks: evidence -> tower inputs, index builds, top-k with exclusions."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron.emdr2.data.answers import has_answer
from megatron.emdr2.data.inputs import RETRIEVER_MAX_LEN, encode_context, encode_query


def context_tokenizer(tok, evidence, max_len: int = RETRIEVER_MAX_LEN) -> Callable:
    """rows -> (ids, mask) for the context tower: ``[CLS] title [SEP] text [SEP]``."""

    def tokenize(rows):
        return encode_context(tok, evidence.passages(np.fromiter(rows, dtype=np.int64)), max_len, pad_to="longest")

    return tokenize


def embed_queries(biencoder, tok, questions: Sequence[str], max_len: int = RETRIEVER_MAX_LEN,
                  device=None) -> torch.Tensor:
    ids, mask = encode_query(tok, questions, max_len, pad_to="longest")
    device = device or next(biencoder.parameters()).device
    return biencoder.embed_queries(ids.to(device), mask.to(device))


def build_index(biencoder, tok, evidence, out_dir: str, model_step: int = 0, batch_size: int = 128,
                max_len: int = RETRIEVER_MAX_LEN, group=None, progress: bool = True,
                extra: Optional[dict] = None) -> str:
    """Embed every passage with the context tower and publish an index version at ``out_dir``
    (collective over ``group``), its manifest recording the tower's fingerprint and ``extra``.
    A tensor-parallel tower's group embeds each slice of the evidence together (``embed_evidence``).
    Returns ``out_dir``."""
    from megatron.emdr2.index.embed import embed_evidence
    from megatron.emdr2.index.fingerprint import tower_fingerprint
    from megatron.emdr2.models.tp_state import tensor_parallel_group

    tower = biencoder.context_encoder
    was_training = tower.training
    param = next(tower.parameters())
    dtype = param.dtype
    if torch.is_autocast_enabled(param.device.type):  # --autocast: embed in its dtype too
        dtype = torch.get_autocast_dtype(param.device.type)
    tower.eval()  # no dropout in the index (embed_evidence cannot see the module behind the lambda)
    try:
        embed_evidence(lambda ids, mask: tower(ids, mask), context_tokenizer(tok, evidence, max_len),
                       evidence.ids, out_dir, batch_size=batch_size, model_step=model_step, group=group,
                       compute_dtype=None if dtype == torch.float32 else dtype, progress=progress,
                       device=param.device,  # where the tower is (still the CPU while models are built)
                       overwrite=True, extra=extra, fingerprint=tower_fingerprint(tower),
                       tensor_group=tensor_parallel_group(tower))
    finally:
        tower.train(was_training)
    return os.fspath(out_dir)


def search_excluding(index, queries: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None):
    """Top-k (scores, ids) skipping, per query, the ids in ``exclude`` [Q, E] (-1 = none).

    Used by MSS, where a masked sentence must not retrieve the passage it was taken from.
    """
    if exclude is None or exclude.numel() == 0:
        return index.search(queries, k)
    extra = exclude.size(1)
    scores, ids = index.search(queries, k + extra)
    excluded = (ids.unsqueeze(-1) == exclude.to(ids.device).unsqueeze(1)).any(-1)  # [Q, k+E]
    # Stable sort puts the kept candidates first, still in score order.
    order = torch.sort(excluded.to(torch.int8), dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def first_hit_ranks(answers: Sequence[Sequence[str]], passages: Sequence[Sequence[tuple[str, str]]],
                    mode: str = "string") -> np.ndarray:
    """For each question, the 1-based rank of the first passage containing an answer (0: none)."""
    out = np.zeros(len(answers), dtype=np.int64)
    for i, (golds, ps) in enumerate(zip(answers, passages)):
        for r, (_title, text) in enumerate(ps, start=1):
            if has_answer(golds, text, mode):
                out[i] = r
                break
    return out


def top_k_accuracy(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Fraction of questions with a hit within the first k, for each k (as 'top{k}')."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {f"top{k}": 0.0 for k in ks}
    return {f"top{k}": float(np.mean((ranks > 0) & (ranks <= k))) for k in ks}
