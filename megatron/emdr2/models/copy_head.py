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

Tensor parallelism: the head is small and replicated on every tensor-parallel rank; its inputs
(the decoder's and encoder's final states) are replicated too, so every rank computes the same
copy distribution and gate. The vocabulary side is what is split: training and per-passage
likelihoods need only log p_vocab(target), which megatron's vocab-parallel cross-entropy gives
every rank whole (``mix_gold``); decoding gathers one step's [N, V] logits first, so the copy
mass is scattered into the whole vocabulary (``mix_full``). Each rank's gradient is then the
whole gradient of the replicated head, as for megatron's layer norms.

Span continuation (``continuation=True``): an answer of several tokens is a run of consecutive
memory tokens, and a fresh decoder has no cheap way to find "the token after the one I just
copied" (the previous output's position is not in its state). Two learned scalars bias the copy
scores towards memory positions j whose predecessor x_{j-1} equals the previous output token
(and, for the second, whose x_{j-2} also equals the one before it), so after the first token the
attention only has to keep going or stop. The features depend only on the decoder's input tokens,
so teacher forcing, per-passage likelihoods and cached decoding compute the same thing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

TINY = 1e-30  # copy mass of a token absent from the memory: log(TINY) instead of -inf
# Initial continuation biases (unigram, bigram match), in units of the copy scores. They are
# scalars that Adam moves by about one learning rate per step, so they start where a span is
# clearly favoured (e^3 per matching feature) rather than at 0.
CONTINUATION_INIT = (3.0, 3.0)
NO_TOKEN = -1  # stands for "no previous token" (never a vocabulary id)


def shifted(ids: Tensor, by: int) -> Tensor:
    """ids [N, L] -> [N, L] with ids[:, j - by] at j (NO_TOKEN where j < by)."""
    if by >= ids.size(1):
        return torch.full_like(ids, NO_TOKEN)
    return torch.nn.functional.pad(ids[:, :ids.size(1) - by], (by, 0), value=NO_TOKEN)


def _fp32_linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    """The head scores in fp32 whatever the model's dtype: under --bf16/--fp16 its weights are
    half precision too (autocast may still lower the matmul itself)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class CopyHead(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.02, continuation: bool = False):
        super().__init__()
        self.continuation = (torch.nn.Parameter(torch.tensor(CONTINUATION_INIT)) if continuation
                             else None)
        self.query = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = torch.nn.Linear(hidden_size, 1)
        for layer in (self.query, self.key, self.gate):
            torch.nn.init.normal_(layer.weight, std=init_std)
        torch.nn.init.zeros_(self.gate.bias)
        self.scale = 1.0 / math.sqrt(hidden_size)

    def keys(self, states: Tensor) -> Tensor:
        """Memory states [N, M, H] -> copy keys [N, M, H] (computed once per memory)."""
        return _fp32_linear(self.key, states)

    def continuation_bias(self, ids: Tensor, inputs: Tensor) -> Tensor:
        """Span-continuation scores [T, N, M] for decoder inputs [N, T] over memory ids [N, M]:
        w1·[x_{j-1} = y_t] + w2·[x_{j-1} = y_t and x_{j-2} = y_{t-1}], where y_t is the token fed
        at step t (the previous output)."""
        after_same = shifted(ids, 1)[None] == inputs.t()[..., None]
        also_before = shifted(ids, 2)[None] == shifted(inputs, 1).t()[..., None]
        w = self.continuation.float()
        return w[0] * after_same + w[1] * (after_same & also_before)

    def attention(self, hidden: Tensor, keys: Tensor, mask: Tensor, ids: Optional[Tensor] = None,
                  inputs: Optional[Tensor] = None) -> Tensor:
        """Copy distribution over the memory [T, N, M] (0 at padding). With span continuation,
        ``ids`` (memory token ids [N, M]) and ``inputs`` (the decoder's input tokens [N, T'],
        T' >= T; the last T are this call's steps) are needed."""
        scores = torch.einsum("tnh,nmh->tnm", _fp32_linear(self.query, hidden), keys) * self.scale
        if self.continuation is not None:
            if ids is None or inputs is None:
                raise ValueError("a copy head with span continuation needs the memory ids and the "
                                 "decoder's input tokens")
            scores = scores + self.continuation_bias(ids, inputs)[-hidden.size(0):]
        scores = scores.masked_fill(mask[None] < 0.5, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-padding memories: no copy

    def log_gates(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(log g, log(1 − g)) [T, N]."""
        z = _fp32_linear(self.gate, hidden)[..., 0]
        return F.logsigmoid(z), F.logsigmoid(-z)

    def mix_gold(self, vocab_gold_logprob: Tensor, hidden: Tensor, keys: Tensor, mask: Tensor,
                 ids: Tensor, targets: Tensor, inputs: Optional[Tensor] = None) -> Tensor:
        """log p(target) [T, N] from the vocabulary's log p(target) [T, N] and the copy mass
        (``inputs``: the decoder's input tokens [N, T], for span continuation)."""
        attn = self.attention(hidden, keys, mask, ids, inputs)
        copy_mass = (attn * (ids[None] == targets[..., None])).sum(-1)
        log_g, log_copy = self.log_gates(hidden)
        return torch.logaddexp(log_g + vocab_gold_logprob.float(),
                               log_copy + copy_mass.clamp_min(TINY).log())

    def mix_full(self, vocab_logits: Tensor, hidden: Tensor, keys: Tensor, mask: Tensor,
                 ids: Tensor, inputs: Optional[Tensor] = None) -> Tensor:
        """log p(w) over the whole vocabulary [T, N, V] (decoding; ``inputs``: the tokens fed
        so far [N, t], for span continuation)."""
        attn = self.attention(hidden, keys, mask, ids, inputs)
        copy = torch.zeros(vocab_logits.shape, dtype=torch.float32, device=vocab_logits.device)
        # fp32 sums (under --autocast the attention comes out in bf16)
        copy.scatter_add_(-1, ids[None].expand(attn.size(0), -1, -1), attn.float())
        log_g, log_copy = self.log_gates(hidden)
        return torch.logaddexp(log_g[..., None] + F.log_softmax(vocab_logits.float(), dim=-1),
                               log_copy[..., None] + copy.clamp_min(TINY).log())
