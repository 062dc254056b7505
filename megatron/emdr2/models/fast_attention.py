"""Attention through torch's fused ``scaled_dot_product_attention`` where it computes the same thing.

megatron-core's local ``DotProductAttention`` runs scores, mask fill, softmax and the value
product as separate kernels (its fused versions need TransformerEngine or compiled CUDA
extensions). When attention dropout is inactive (evaluation, evidence embedding, decoding, or
dropout 0) the result is a plain masked softmax attention, which torch's SDPA computes in one
fused call, on CPU and GPU alike. Masked keys get a -10000 additive bias, as megatron's
masked softmax does, so a row with every key masked (an all-padding passage) still yields a
uniform average instead of NaN. Anything else (dropout in training, packed sequences, CPU
half precision outside autocast, where SDPA's accumulation differs) takes the parent's exact path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.emdr2.models.relative_attention import RelativeBiasAttention, fold_additive_mask

_MASKED = -10000.0  # megatron's masked-softmax fill value


class SdpaAttention(RelativeBiasAttention):
    def _fast_path_ok(self, query: Tensor, packed_seq_params) -> bool:
        dropout_active = self.training and self.attention_dropout.p > 0
        # CPU half precision only when the user asked for it (--autocast): SDPA's accumulation
        # differs there from megatron's path.
        precise = query.dtype == torch.float32 or query.is_cuda or torch.is_autocast_enabled("cpu")
        return not dropout_active and packed_seq_params is None and precise

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias: Optional[Tensor] = None, packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn]; attention_mask True = masked (or an
        additive float bias, ``fold_additive_mask``), broadcastable to [b, np, sq, sk]. Returns
        the context [sq, b, np * hn]."""
        if not self._fast_path_ok(query, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        attention_mask, attention_bias = fold_additive_mask(attention_mask, attention_bias)
        bias = None
        if attention_mask is not None:
            bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(attention_mask, _MASKED)
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype) if bias is None else bias + attention_bias.to(q.dtype)
        out_dtype = q.dtype
        if _cpu_half_backward(q):
            # Autocast would cast fp32 inputs back to bf16 for SDPA: it is off for this call.
            q, k, v = q.float(), k.float(), v.float()
            bias = None if bias is None else bias.float()
            with torch.autocast("cpu", enabled=False):
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.softmax_scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.softmax_scale)
        context = context.to(out_dtype)
        sq, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def _cpu_half_backward(q: Tensor) -> bool:
    """True where attention in bf16/fp16 on a CPU will be differentiated. torch's CPU flash
    attention is as fast in bf16 as in fp32 forward, but its bf16 backward is slow: forward +
    backward of the reader encoder's attention (32 x 12 heads x 168 tokens) takes 2.7x as long
    in bf16, the decoder's 7x (bench/bench_cpu_attention.py). Those calls run in fp32 (more
    precise, and cheaper); GPUs keep their half-precision kernels."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and q.requires_grad)
