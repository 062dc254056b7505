"""A copy (pointer-generator) output for the FiD reader.

    p(w) = g · p_vocab(w) + (1 − g) · Σ_i a_i [x_i = w]

where a is one attention distribution of the decoder state over the FiD memory (all K passages'
tokens x_i, padding masked out) and g = sigmoid(gate(h)). Answers in open-domain QA are nearly
always spans of the passages; a T5 trained from scratch (or a fresh decoder on a pretrained
encoder) needs many thousands of steps before it can route a memory token's identity to its
output layer, while the copy attention only has to learn *where* the answer is. With a pretrained
T5 it is not needed (and is off by default).

Tensors are sequence-first like megatron's decoder: hidden [T, N, H]; memory-side tensors are
batch-first: keys [N, M, H], mask and ids [N, M]. Everything is computed in fp32.
Tensor parallelism is not supported (the mixture needs the whole vocabulary on one rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TINY = 1e-30  # copy mass of a token absent from the memory: log(TINY) instead of -inf


class CopyHead(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.query = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = torch.nn.Linear(hidden_size, 1)
        for layer in (self.query, self.key, self.gate):
            torch.nn.init.normal_(layer.weight, std=init_std)
        torch.nn.init.zeros_(self.gate.bias)
        self.scale = 1.0 / math.sqrt(hidden_size)

    def keys(self, states: Tensor) -> Tensor:
        """Memory states [N, M, H] -> copy keys [N, M, H] (computed once per memory)."""
        return self.key(states.float())

    def attention(self, hidden: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Copy distribution over the memory [T, N, M] (0 at padding)."""
        scores = torch.einsum("tnh,nmh->tnm", self.query(hidden.float()), keys) * self.scale
        scores = scores.masked_fill(mask[None] < 0.5, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-padding memories: no copy

    def log_gates(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(log g, log(1 − g)) [T, N]."""
        z = self.gate(hidden.float())[..., 0]
        return F.logsigmoid(z), F.logsigmoid(-z)

    def mix_gold(self, vocab_gold_logprob: Tensor, hidden: Tensor, keys: Tensor, mask: Tensor,
                 ids: Tensor, targets: Tensor) -> Tensor:
        """log p(target) [T, N] from the vocabulary's log p(target) [T, N] and the copy mass."""
        attn = self.attention(hidden, keys, mask)
        copy_mass = (attn * (ids[None] == targets[..., None])).sum(-1)
        log_g, log_copy = self.log_gates(hidden)
        return torch.logaddexp(log_g + vocab_gold_logprob.float(),
                               log_copy + copy_mass.clamp_min(TINY).log())

    def mix_full(self, vocab_logits: Tensor, hidden: Tensor, keys: Tensor, mask: Tensor,
                 ids: Tensor) -> Tensor:
        """log p(w) over the whole vocabulary [T, N, V] (decoding)."""
        attn = self.attention(hidden, keys, mask)
        copy = torch.zeros(vocab_logits.shape, dtype=torch.float32, device=vocab_logits.device)
        copy.scatter_add_(-1, ids[None].expand(attn.size(0), -1, -1), attn)
        log_g, log_copy = self.log_gates(hidden)
        return torch.logaddexp(log_g[..., None] + F.log_softmax(vocab_logits.float(), dim=-1),
                               log_copy[..., None] + copy.clamp_min(TINY).log())
