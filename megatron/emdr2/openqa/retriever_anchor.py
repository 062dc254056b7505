"""A trust region for the query tower while the reader trains it (--retriever-anchor-weight).

EMDR²'s retriever term only sees each question's top-K passages: it reorders them, and nothing
holds the passages just below K in place. With a small K (4 on a CPU; the original's NQ script
reads 50) the query tower sharpens its top few ranks and lets lower ones drift: in the
quickstart, top-1 on held-out NQ questions rose after EMDR² while top-20 fell a little
(README). The anchor adds

    weight · mean over q, j of ( Δ_qj − mean_j Δ_qj )²,   Δ_qj = s(q, z_j) − s_start(q, z_j)

over the passages z_j that the *starting* query tower (a frozen copy of the tower the run was
loaded with) ranks K+1 .. ``depth``, s being the scaled scores of the retriever's softmax. The
first K are left out: ordering what the reader reads is the retriever term's job, and the anchor
only holds the rest, so passages from outside the reader's top K can neither sink nor climb
relative to each other. Centring leaves free what changes no ranking among them (a shift of all
of a question's scores, and so how the top K sit against the rest). A squared difference rather
than a KL between softmaxes: the ranks to hold have small probabilities, so a KL hardly registers
their swaps; the squared difference weighs every rank alike (score distillation, as in
Margin-MSE: Hofstätter et al. 2020). It costs one forward pass of the
frozen copy over the questions and one search per step; the passage embeddings come from the
frozen context tower's cache, or (with a context tower that trains) from that tower without
gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.emdr2.openqa.retrieval import search_excluding


class RetrieverAnchor:
    """The frozen starting query tower and the term that keeps the current one's scores near it."""

    def __init__(self, start_tower: torch.nn.Module, weight: float, depth: int, skip: int):
        """``start_tower``: a tower of the query tower's architecture holding its starting
        weights (built afresh and loaded: megatron-core modules hold process groups, which
        ``copy.deepcopy`` cannot copy)."""
        if weight <= 0:
            raise ValueError(f"anchor weight {weight} must be > 0")
        if depth < skip + 2:
            raise ValueError(f"anchor depth {depth} must be >= top-k {skip} + 2 (two or more passages to hold)")
        self.weight, self.depth, self.skip = float(weight), int(depth), int(skip)
        self.tower = start_tower.eval()
        for p in self.tower.parameters():
            p.requires_grad_(False)

    def _follow(self, reference: torch.nn.Module) -> None:
        """Put the copy where the live tower is (the loop moves and casts the models after they
        are built)."""
        live = next(reference.parameters())
        mine = next(self.tower.parameters())
        if mine.device != live.device or mine.dtype != live.dtype:
            self.tower.to(device=live.device, dtype=live.dtype)

    def loss(self, biencoder, query_ids: torch.Tensor, query_mask: torch.Tensor, q_emb: torch.Tensor,
             index, context_embeddings: Callable[[torch.Tensor], torch.Tensor],
             exclude_ids=None) -> torch.Tensor:
        """weight · the centred squared score change. ``q_emb`` [B, H] are the
        current query embeddings (with gradient); ``context_embeddings(ids [B, N])`` -> [B, N, H]
        without gradient."""
        self._follow(biencoder.query_tower)
        dev = q_emb.device
        with torch.no_grad():
            q_start = self.tower(query_ids.to(dev), query_mask.to(dev))
            _, ids = search_excluding(index, q_start.detach().float(), self.depth, exclude_ids)
            ids = ids[:, self.skip:]  # the reader's top K: the retriever term's to reorder
            contexts = context_embeddings(ids).to(dev)
            start = biencoder.score(q_start, contexts)
        change = biencoder.score(q_emb, contexts) - start
        change = change - change.mean(dim=-1, keepdim=True)
        return self.weight * change.pow(2).mean()
