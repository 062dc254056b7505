"""Whole state dicts of tensor-parallel models, and this rank's shard of a whole one.

What must not depend on the tensor-parallel size works on the whole (size 1) state: the
context tower's fingerprint in an index manifest, the tower handed to indexer ranks (which
run it unsharded), and pretrained weights saved at another size. Both directions are no-ops
for a module that is not sharded. Our models are never gated (builders.py), so the plain
column/row split of ``convert.partition_dim`` applies.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.emdr2.models.convert import partition_dim, tp_split


def tensor_parallel_size(module: torch.nn.Module) -> int:
    return getattr(getattr(module, "config", None), "tensor_model_parallel_size", 1) or 1


def tensor_parallel_group(module: torch.nn.Module):
    """The process group ``module`` is sharded over (None when it is not sharded)."""
    if tensor_parallel_size(module) == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def full_state_dict(module: torch.nn.Module) -> dict:
    """The module's tensors (on the CPU) as a tensor-parallel size 1 module would hold them.

    Collective over the module's tensor-parallel group when it is sharded (every rank of the
    group gets the whole state). Replicated tensors are taken from the group's first rank."""
    own = _tensors(module)
    group = tensor_parallel_group(module)
    if group is None or dist.get_world_size(group) == 1:
        return own
    shards: list[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(shards, own, group=group)
    out = {}
    for name, first in shards[0].items():
        dim = partition_dim(name)
        out[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def shard_for(module: torch.nn.Module, full_state: dict) -> dict:
    """This rank's shard of a whole (tensor-parallel size 1) state dict for ``module``."""
    tp = tensor_parallel_size(module)
    if tp == 1:
        return full_state
    from megatron.core import parallel_state

    return tp_split(full_state, tp, parallel_state.get_tensor_model_parallel_rank())
