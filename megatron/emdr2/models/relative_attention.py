"""Dot-product attention with an additive bias on the attention logits (T5 relative positions).

megatron-core's local ``DotProductAttention`` refuses ``attention_bias`` (only TransformerEngine
supports it), but Google-T5 checkpoints need it: T5 adds a learned bias, indexed by the bucketed
query-key distance, to every self-attention logit. This subclass adds the bias and otherwise
follows the parent: the same scale, masked softmax (fp32 when configured) and dropout under
megatron's tensor-parallel RNG tracker.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.relative_pos_embedding import RelativePositionEmbedding
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor


def fold_additive_mask(attention_mask: Optional[Tensor],
                       attention_bias: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A floating-point ``attention_mask`` is an additive bias on the attention logits (0 =
    attend, -10000 = masked, plus any per-key weight: the joint top-k reader's log p(z_k|q) on
    the FiD decoder's cross-attention, see ``FiDReader.memory_attention_mask``). It is folded
    into ``attention_bias``; a boolean mask (True = masked) is returned unchanged."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask, attention_bias
    return None, attention_mask if attention_bias is None else attention_bias + attention_mask


class RelativeBiasAttention(DotProductAttention):
    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_bias [1|b, np, sq, sk]
        (this rank's heads); attention_mask boolean (True = masked) or an additive float bias
        (``fold_additive_mask``). Returns the context [sq, b, np * hn]."""
        attention_mask, attention_bias = fold_additive_mask(attention_mask, attention_bias)
        if attention_bias is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, None,
                                   packed_seq_params)
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported with an attention bias")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 3, 0)  # [b, np, hn, sk]
        v = value.permute(1, 2, 0, 3)  # [b, np, sk, hn]
        scores = torch.matmul(q, k) * self.softmax_scale
        scores = scores + attention_bias.to(scores.dtype)
        probs = self.scale_mask_softmax(scores, attention_mask, self.softmax_offset)
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        else:
            probs = self.attention_dropout(probs)
        context = torch.matmul(probs.to(v.dtype), v)  # [b, np, sq, hn]
        sq, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def local_heads_bias(embedding: RelativePositionEmbedding, query_length: int,
                     key_length: int) -> Tensor:
    """The bias [1, heads/tp, q, k] of this tensor-parallel rank's heads.

    The bucket table is small (buckets x heads), so every rank keeps all of it (as megatron's
    T5Model does) and takes its contiguous slice of heads, matching the head split of QKV.
    The slice goes through megatron's scatter, whose backward all-gathers, so every rank ends
    up with the gradient of the whole table and the replicas stay equal.
    """
    device = embedding.relative_attention_bias.weight.device
    relative = (torch.arange(key_length, dtype=torch.long, device=device)[None, :]
                - torch.arange(query_length, dtype=torch.long, device=device)[:, None])
    buckets = embedding._relative_position_bucket(
        relative, bidirectional=embedding.bidirectional,
        num_buckets=embedding.relative_attention_num_buckets,
        max_distance=embedding.relative_attention_max_distance)
    bias = _BucketLookup.apply(embedding.relative_attention_bias.weight, buckets)  # [q, k, heads]
    bias = tensor_parallel.scatter_to_tensor_model_parallel_region(bias.unsqueeze(0))
    return bias.permute(0, 3, 1, 2)


class _BucketLookup(torch.autograd.Function):
    """``F.embedding(buckets, table)`` (what megatron's RelativePositionEmbedding computes), with
    a backward that needs no saved tensor, so the graph can be back-propagated through more than
    once. Activation recompute needs that: megatron's (reentrant) checkpoint re-runs each
    checkpointed layer in backward and back-propagates from there into the bias, which all the
    layers of a stack share, once per checkpointed chunk. Forward and gradient are nn.Embedding's
    (``embedding_dense_backward``), so results without recompute are unchanged."""

    @staticmethod
    def forward(ctx, table: Tensor, buckets: Tensor) -> Tensor:
        ctx.buckets = buckets  # a constant index, deliberately not a saved (freed) tensor
        ctx.rows = table.size(0)
        return torch.nn.functional.embedding(buckets, table)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.ops.aten.embedding_dense_backward(grad.contiguous(), ctx.buckets, ctx.rows, -1, False), None
