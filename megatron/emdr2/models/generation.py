"""Incremental decoding for ``FiDReader``: key/value cache, greedy and beam search.

megatron-core's own inference cache is keyed by layer number, which a T5 decoder layer's self-
and cross-attention share, so it cannot hold both; and its relative-bias path assumes a full
square. This module runs one decoder step itself, layer by layer, calling the layer's own
megatron submodules (norms, projections, core attention, MLP) in the order megatron's
TransformerLayer does in eval mode:

    x = x + SelfAttn(LN(x)) ; x = x + CrossAttn(LN(x), memory) ; x = x + MLP(LN(x))

Cross-attention keys/values of the encoder memory are computed once per generation; self-
attention keys/values grow by one position per step; beams reorder both by index.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


def _add(residual: Tensor, out_with_bias) -> Tensor:
    out, bias = out_with_bias
    if bias is not None:
        out = out + bias
    return residual + out


class DecoderCache:
    """Per-layer attention keys/values of the N sequences being decoded (sequence-first)."""

    def __init__(self, reader, states: Tensor, mask: Tensor, max_length: int,
                 memory_ids: Optional[Tensor] = None, memory_bias: Optional[Tensor] = None):
        memory = states.transpose(0, 1).contiguous()  # [M, N, H]
        # Boolean, or additive float with a memory_bias (the joint top-k reader's log p(z|q)).
        self.cross_mask = reader.memory_attention_mask(mask, memory_bias)
        # The copy head's keys, mask and token ids of the memory (readers with a copy head).
        self.copy = None
        if reader.copy_head is not None:
            self.copy = (reader.copy_head.keys(states), mask, memory_ids)
        self.cross_k: List[Tensor] = []
        self.cross_v: List[Tensor] = []
        for layer in reader.decoder.layers:
            att = layer.cross_attention
            kv, _ = att.linear_kv(memory)
            kv = kv.view(*kv.shape[:2], att.num_attention_heads_per_partition,
                         2 * att.hidden_size_per_attention_head)
            k, v = tensor_parallel.split_tensor_along_last_dim(kv, 2)
            self.cross_k.append(k.contiguous())
            self.cross_v.append(v.contiguous())
        # The tokens fed so far [N, t] (the copy head's span continuation looks at the last two).
        self.fed = torch.zeros(states.size(0), 0, dtype=torch.long, device=states.device)
        self.self_k: List[Optional[Tensor]] = [None] * len(self.cross_k)
        self.self_v: List[Optional[Tensor]] = [None] * len(self.cross_k)
        # The decoder's relative bias for every (query, key) up to max_length, sliced per step.
        self.bias = reader.relative_bias("decoder", max_length, max_length)

    def append(self, layer: int, k: Tensor, v: Tensor):
        if self.self_k[layer] is not None:
            k = torch.cat([self.self_k[layer], k], dim=0)
            v = torch.cat([self.self_v[layer], v], dim=0)
        self.self_k[layer], self.self_v[layer] = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search: each surviving beam continues its parent's cache)."""
        def pick(ts):
            return [t.index_select(1, index) if t is not None else None for t in ts]

        self.self_k, self.self_v = pick(self.self_k), pick(self.self_v)
        self.cross_k, self.cross_v = pick(self.cross_k), pick(self.cross_v)
        self.cross_mask = self.cross_mask.index_select(0, index)
        self.fed = self.fed.index_select(0, index)
        if self.copy is not None:
            self.copy = tuple(t.index_select(0, index) for t in self.copy)


def decode_step(reader, cache: DecoderCache, tokens: Tensor, position: int) -> Tensor:
    """Feed ``tokens`` [N] at ``position``; return this rank's vocabulary slice of the next-token
    logits [N, V/tp]."""
    return reader.vocab_parallel_logits(decode_hidden(reader, cache, tokens, position))[0]


def decode_hidden(reader, cache: DecoderCache, tokens: Tensor, position: int) -> Tensor:
    """Feed ``tokens`` [N] at ``position``; return the decoder's final state [1, N, H]."""
    cache.fed = torch.cat([cache.fed, tokens[:, None]], dim=1)
    x = reader.embed(tokens[:, None], offset=position)  # [1, N, H]
    bias = None
    if cache.bias is not None:
        bias = cache.bias[:, :, position:position + 1, :position + 1]
    n = tokens.size(0)
    for i, layer in enumerate(reader.decoder.layers):
        sa = layer.self_attention
        q, k, v = sa.get_query_key_value_tensors(layer.input_layernorm(x), None)
        k, v = cache.append(i, k, v)
        ctx = sa.core_attention(q, k, v, None, attn_mask_type=AttnMaskType.no_mask,
                                attention_bias=bias)
        x = _add(x, sa.linear_proj(ctx))

        ca = layer.cross_attention
        q, _ = ca.linear_q(layer.pre_cross_attn_layernorm(x))
        q = q.view(1, n, ca.num_attention_heads_per_partition, ca.hidden_size_per_attention_head)
        ctx = ca.core_attention(q, cache.cross_k[i], cache.cross_v[i], cache.cross_mask,
                                attn_mask_type=AttnMaskType.padding)
        x = _add(x, ca.linear_proj(ctx))

        x = _add(x, layer.mlp(layer.pre_mlp_layernorm(x)))
    return reader.decoder.final_layernorm(x)


def next_token_log_probs(reader, cache: DecoderCache, tokens: Tensor, position: int) -> Tensor:
    """log p(next token) over the whole vocabulary [N, V] (fp32), copy head included."""
    hidden = decode_hidden(reader, cache, tokens, position)
    logits = reader.gather_vocab(reader.vocab_parallel_logits(hidden)).float()
    if cache.copy is None:
        return F.log_softmax(logits[0], dim=-1)
    keys, mask, ids = cache.copy
    return reader.copy_head.mix_full(logits, hidden, keys, mask, ids, cache.fed[:, -2:])[0]


def repeated_ngram_mask(seqs: Tensor, n: int, vocab_size: int) -> Optional[Tensor]:
    """[N, V] True where a token would complete an n-gram that ``seqs`` [N, t] already holds
    (Hugging Face's ``no_repeat_ngram_size``); None when nothing is banned.

    An undertrained decoder falls into loops ("the the the ...") that never reach eos; gold
    answers almost never repeat a bigram (0.2% of nq-mini's training answers), so banning
    repeats costs little and turns a loop into an attempt at the answer."""
    N, t = seqs.shape
    if n < 1 or t < n - 1 or (n > 1 and t < n):
        return None
    banned = torch.zeros(N, vocab_size, dtype=torch.bool, device=seqs.device)
    if n == 1:
        return banned.scatter_(1, seqs, True)
    prefix = seqs[:, t - n + 1:]  # the last n-1 tokens
    windows = seqs.unfold(1, n, 1)  # [N, t-n+1, n]: every n-gram so far
    hit = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # [N, t-n+1]
    rows, cols = hit.nonzero(as_tuple=True)
    banned[rows, windows[rows, cols, -1]] = True
    return banned


def _ban(logp: Tensor, history: Tensor, no_repeat_ngram_size: int) -> Tensor:
    banned = repeated_ngram_mask(history, no_repeat_ngram_size, logp.size(-1)) if no_repeat_ngram_size else None
    return logp if banned is None else logp.masked_fill(banned, float("-inf"))


def greedy(reader, states: Tensor, mask: Tensor, max_length: int, bos_id: int, eos_id: int,
           pad_id: int, memory_ids: Optional[Tensor] = None, no_repeat_ngram_size: int = 0,
           memory_bias: Optional[Tensor] = None) -> Tensor:
    n = states.size(0)
    cache = DecoderCache(reader, states, mask, max_length, memory_ids, memory_bias)
    tokens = start = torch.full((n,), bos_id, dtype=torch.long, device=states.device)
    done = torch.zeros(n, dtype=torch.bool, device=states.device)
    out = []
    for t in range(max_length):
        logp = next_token_log_probs(reader, cache, tokens, t)
        if no_repeat_ngram_size:  # the start token counts as generated, as in Hugging Face
            logp = _ban(logp, torch.stack([start, *out], dim=1), no_repeat_ngram_size)
        nxt = logp.argmax(-1)
        nxt = nxt.masked_fill(done, pad_id)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        tokens = nxt
    return torch.stack(out, dim=1)


def beam_search(reader, states: Tensor, mask: Tensor, max_length: int, num_beams: int,
                bos_id: int, eos_id: int, pad_id: int, length_penalty: float = 1.0,
                memory_ids: Optional[Tensor] = None, no_repeat_ngram_size: int = 0,
                memory_bias: Optional[Tensor] = None) -> Tensor:
    """Beam search with Hugging Face's default semantics (``early_stopping=False``).

    Each step keeps the 2N best continuations of the N beams; among them, those ending in eos
    (or reaching max_length) and ranked in the top N become finished hypotheses, scored
    sum(log p) / length**length_penalty; the best N unfinished ones continue. A question stops
    once its N finished hypotheses all beat the best running beam's current normalised score.
    """
    B, N = states.size(0), num_beams
    dev = states.device
    NEG = -1.0e9
    cache = DecoderCache(reader, states.repeat_interleave(N, 0), mask.repeat_interleave(N, 0),
                         max_length, None if memory_ids is None else memory_ids.repeat_interleave(N, 0),
                         None if memory_bias is None else memory_bias.repeat_interleave(N, 0))
    run_scores = torch.full((B, N), NEG, device=dev)
    run_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    run_seqs = torch.full((B, N, max_length), pad_id, dtype=torch.long, device=dev)
    fin_seqs = run_seqs.clone()
    fin_scores = torch.full((B, N), NEG, device=dev)
    fin_done = torch.zeros(B, N, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(B, N, dtype=torch.long, device=dev)
    improvable = torch.ones(B, dtype=torch.bool, device=dev)
    in_top_n = torch.arange(2 * N, device=dev) < N
    rows = torch.arange(B, device=dev)[:, None]
    tokens = torch.full((B * N,), bos_id, dtype=torch.long, device=dev)
    for t in range(max_length):
        logp = next_token_log_probs(reader, cache, tokens, t)
        if no_repeat_ngram_size:
            history = torch.cat([tokens.new_full((B * N, 1), bos_id), run_seqs[:, :, :t].reshape(B * N, t)], 1)
            logp = _ban(logp, history, no_repeat_ngram_size)
        V = logp.size(-1)
        acc = (logp.view(B, N, V) + run_scores[:, :, None]).view(B, N * V)
        top, idx = acc.topk(2 * N, dim=1)
        parent, tok = idx // V, idx % V
        cand = run_seqs[rows, parent]  # [B, 2N, L]
        cand[:, :, t] = tok
        ends = (tok == eos_id) | (t + 1 >= max_length)

        # continue with the N best candidates that did not end
        live = top + ends.float() * NEG
        keep = live.topk(N, dim=1).indices
        run_seqs, run_scores = cand[rows, keep], live[rows, keep]
        beam_parent = parent[rows, keep]

        # merge newly finished hypotheses (top-N ranked only) into the N best finished
        finishing = ends & in_top_n & improvable[:, None]
        normed = top / float(t + 1) ** length_penalty + (~finishing).float() * NEG
        all_scores = torch.cat([fin_scores, normed], 1)
        best = all_scores.topk(N, dim=1).indices
        fin_seqs = torch.cat([fin_seqs, cand], 1)[rows, best]
        fin_scores = all_scores[rows, best]
        fin_done = torch.cat([fin_done, finishing], 1)[rows, best]
        fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1)[rows, best]

        if bool(ends.all()):
            break
        best_running = run_scores[:, 0] / float(t + 1) ** length_penalty
        worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True).values,
                                     torch.full_like(fin_scores, NEG))
        improvable &= (best_running[:, None] > worst_finished).any(1)
        if not bool(improvable.any()):
            break
        cache.reorder((rows * N + beam_parent).view(-1))
        tokens = run_seqs[:, :, t].reshape(-1)
    length = int(fin_len[:, 0].max())
    return fin_seqs[:, 0, :length]


def generate(reader, states: Tensor, mask: Tensor, max_length: int, num_beams: int,
             bos_id: int, eos_id: int, pad_id: int, length_penalty: float = 1.0,
             memory_ids: Optional[Tensor] = None, no_repeat_ngram_size: int = 0,
             memory_bias: Optional[Tensor] = None) -> Tensor:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if num_beams == 1:
        return greedy(reader, states, mask, max_length, bos_id, eos_id, pad_id, memory_ids,
                      no_repeat_ngram_size, memory_bias)
    return beam_search(reader, states, mask, max_length, num_beams, bos_id, eos_id, pad_id,
                       length_penalty, memory_ids, no_repeat_ngram_size, memory_bias)
