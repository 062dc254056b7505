"""Activation recompute (megatron-core's ``recompute_granularity``) around our own models.

megatron-core's full recompute is *reentrant* (``tensor_parallel.checkpoint``): a checkpointed
chunk of layers runs without autograd in forward and again, with autograd, in backward. Its
output needs a gradient only if one of its tensor inputs does, so a stack whose input
embeddings are frozen (the FiD decoder reads the shared word embeddings, which
``FiDReader.freeze_encoder`` freezes) would silently give its own layers no gradient at all.
``checkpointable_input`` makes such an input a leaf that asks for a gradient (a few [S, B, H]
elements of extra work), which is what megatron's pipeline stages do with their inputs.

Tensors the layers capture rather than take as inputs (T5's relative position bias, shared by
all the layers of a stack) are back-propagated into once per checkpointed chunk:
``relative_attention._BucketLookup`` keeps that graph re-traversable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def checkpointable_input(hidden: Tensor, block: torch.nn.Module) -> Tensor:
    """``hidden``, or a detached copy that requires grad when ``block`` (a TransformerBlock)
    recomputes full layers in this training pass and would otherwise lose its gradients."""
    if (block.config.recompute_granularity == "full" and block.training and torch.is_grad_enabled()
            and not hidden.requires_grad and any(p.requires_grad for p in block.parameters())):
        return hidden.detach().requires_grad_()
    return hidden
