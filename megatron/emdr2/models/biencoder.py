"""Dual encoder: a query tower and a context tower (or one shared tower), scaled inner products."""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron.emdr2.models.bert_tower import BertTower


class BiEncoder(MegatronModule):
    """f_q(q) . f_d(z) * score_scale.

    Args:
        query_tower: the question encoder.
        context_tower: the passage encoder; None shares ``query_tower`` (one set of weights).
        score_scale: multiplier of the inner products, 1/tau; default 1/sqrt(hidden size)
            (tau = 27.7 at 768, as in the paper).
        freeze_query, freeze_context: stop training that tower (its parameters get
            ``requires_grad=False`` and its forward runs without autograd). A shared tower
            can only be frozen as a whole.
    """

    def __init__(self, query_tower: BertTower, context_tower: Optional[BertTower] = None,
                 score_scale: Optional[float] = None, freeze_query: bool = False,
                 freeze_context: bool = False):
        super().__init__(config=query_tower.config)
        self.shared = context_tower is None
        if self.shared and freeze_query != freeze_context:
            raise ValueError("the towers are shared: freeze both or neither")
        self.query_tower = query_tower
        if not self.shared:  # registered only when separate: a shared tower is saved once
            self.context_tower = context_tower
            if context_tower.hidden_size != query_tower.hidden_size:
                raise ValueError(f"tower widths differ: {query_tower.hidden_size} vs "
                                 f"{context_tower.hidden_size}")
        self.score_scale = (1.0 / math.sqrt(query_tower.hidden_size) if score_scale is None
                            else float(score_scale))
        self.freeze_query = freeze_query
        self.freeze_context = freeze_context
        for tower, frozen in ((self.query_tower, freeze_query),
                              (self.context_encoder, freeze_context)):
            if frozen:
                for p in tower.parameters():
                    p.requires_grad_(False)

    @property
    def context_encoder(self) -> BertTower:
        """The tower that embeds passages (the query tower when shared)."""
        return self.query_tower if self.shared else self.context_tower

    @staticmethod
    def _embed(tower, frozen, ids, mask, tokentype_ids):
        if frozen:
            with torch.no_grad():
                return tower(ids, mask, tokentype_ids)
        return tower(ids, mask, tokentype_ids)

    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor,
                      tokentype_ids: Optional[Tensor] = None) -> Tensor:
        """[B, S] -> [B, H]."""
        return self._embed(self.query_tower, self.freeze_query, input_ids, attention_mask,
                           tokentype_ids)

    def embed_contexts(self, input_ids: Tensor, attention_mask: Tensor,
                       tokentype_ids: Optional[Tensor] = None) -> Tensor:
        """[N, S] -> [N, H]."""
        return self._embed(self.context_encoder, self.freeze_context, input_ids, attention_mask,
                           tokentype_ids)

    def score(self, query_emb: Tensor, context_emb: Tensor) -> Tensor:
        """Scaled inner products in fp32 (fp16 scores lose the ranking of near-ties).

        [B, H] x [N, H] -> [B, N] (e.g. in-batch negatives), or
        [B, H] x [B, K, H] -> [B, K] (each question's own retrieved passages).
        """
        q = query_emb.float()
        c = context_emb.float()
        if c.dim() == 2:
            scores = q @ c.t()
        elif c.dim() == 3:
            if c.size(0) != q.size(0):
                raise ValueError(f"batch sizes differ: queries {q.size(0)}, contexts {c.size(0)}")
            scores = torch.einsum("bh,bkh->bk", q, c)
        else:
            raise ValueError(f"context embeddings must be [N, H] or [B, K, H], got {tuple(c.shape)}")
        return scores * self.score_scale

    def forward(self, query_ids, query_mask, context_ids, context_mask):
        """Convenience: embed both sides and score them ([B, N] or [B, K])."""
        q = self.embed_queries(query_ids, query_mask)
        shape = context_ids.shape
        c = self.embed_contexts(context_ids.reshape(-1, shape[-1]),
                                context_mask.reshape(-1, shape[-1]))
        return self.score(q, c.view(*shape[:-1], -1))
