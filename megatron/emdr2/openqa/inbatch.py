"""In-batch softmax over the data-parallel global batch (ICT and DPR).

Every rank embeds its own questions and contexts. The contexts of all data-parallel ranks are
all-gathered, and each local question is scored against every gathered context:

    loss_r = mean_{i in rank r} -log softmax_j( f_q(q_i) . f_d(c_j) / sqrt(d) )[pos_i]

Gradients: the gather's backward sums, over ranks, the gradients that every rank's loss sends
to each context and hands rank r the rows of its own contexts. megatron-core DDP then averages
the parameter gradients over the D ranks, so the update is the gradient of
(1/D) sum_r loss_r, which (equal micro-batches on every rank) is exactly the single-process
loss over the same global batch. Only contexts are gathered: local queries x global contexts
is the same loss as the full [global x global] matrix at 1/D of the compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dp_group():
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized()) or not ps.model_parallel_is_initialized():
        return None
    return ps.get_data_parallel_group()


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's [n_r, H] rows (n_r may differ); backward: sum over ranks, keep mine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int]):
        rank, world = _world(group)
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank, ctx.width = group, sizes, rank, width
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Every rank's loss touches every context: sum those gradients before taking my rows.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(all ranks' rows in rank order, offset of this rank's rows); differentiable.

    One process (or no process group) returns ``x`` itself and offset 0.
    """
    rank, world = _world(group)
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c) for c in counts]
    return _GatherRows.apply(x, group, sizes), sum(sizes[:rank])


def inbatch_loss(query_emb: torch.Tensor, context_emb: torch.Tensor, positives: torch.Tensor,
                 scale: float, group=None, gather: bool = True
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax cross-entropy of each local query over all gathered contexts.

    query_emb [B, H]; context_emb [C, H] (this rank's contexts, e.g. B positives for ICT or
    B x (1 + hard negatives) for DPR); positives [B]: index of query i's positive among the
    *local* contexts; scale: 1/tau (1/sqrt(H) in the paper). ``group`` defaults to megatron's
    data-parallel group. Returns (mean loss over local queries, metrics).
    """
    if positives.shape != (query_emb.shape[0],):
        raise ValueError(f"positives must be [B] = [{query_emb.shape[0]}], got {tuple(positives.shape)}")
    group = _dp_group() if group is None else group
    contexts, offset = gather_rows(context_emb, group) if gather else (context_emb, 0)
    scores = (query_emb.float() @ contexts.float().t()) * scale  # [B, C_global], fp32
    target = positives.to(scores.device) + offset
    loss = F.cross_entropy(scores, target)
    with torch.no_grad():
        pos_score = scores.gather(1, target[:, None])
        rank = (scores > pos_score).sum(1)  # 0 = the positive scores highest
        metrics = {"inbatch_acc": (rank == 0).float().mean(),
                   "inbatch_mean_rank": rank.float().mean() + 1,
                   "inbatch_candidates": torch.tensor(float(contexts.shape[0]))}
    return loss, metrics


def reference_loss(query_emb: torch.Tensor, context_emb: torch.Tensor, positives: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The single-process formula in float64 (for tests): mean_i -log softmax(q_i . C / tau)[pos_i]."""
    scores = query_emb.double() @ context_emb.double().t() * scale
    return F.cross_entropy(scores, positives.long())

