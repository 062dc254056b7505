"""Linear layers that fuse the bias into the matrix multiply when nothing needs megatron's path.

megatron-core's tensor-parallel linears multiply, then add the bias in a separate pass (or hand
it to ``bias_dropout_add``), because their autograd function and tensor-parallel collectives
need it that way. With one tensor-parallel rank and no autograd (evidence embedding, evaluation,
decoding) a single ``F.linear`` (addmm) computes the same output with one pass fewer over the
activations. Returning the bias already added and ``None`` as the separate bias is something
megatron's callers accept for every layer (``bias_dropout_add`` skips a ``None`` bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.random import is_checkpointing


def _fusable(layer, input_) -> bool:
    # Not in the no-autograd forward of an activation-recompute chunk: its backward recomputes
    # the chunk with autograd (megatron's path), which must reproduce the forward bit for bit.
    return (not torch.is_grad_enabled() and not is_checkpointing() and layer.weight is not None
            and layer.config.tensor_model_parallel_size == 1 and not layer.config.sequence_parallel
            and input_.dtype == layer.weight.dtype)


class FusedColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None and _fusable(self, input_):
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


class FusedRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        if _fusable(self, input_):
            return F.linear(input_, self.weight, self.bias), None
        output, bias = super().forward(input_)
        if bias is not None and is_checkpointing():
            # Inside an activation-recompute chunk the bias is added here, not returned: a
            # Parameter returned out of megatron's checkpoint Function (the MLP's output bias
            # under selective "mlp" recompute) gets the checkpoint as its grad_fn, stops being a
            # leaf and sends backward into endless recursion (megatron-core 0.16). The caller's
            # bias_dropout_add would compute the same ``x + bias``.
            return output + bias, None
        return output, bias
