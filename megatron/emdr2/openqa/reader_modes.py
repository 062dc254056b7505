"""How the reader reads the K retrieved passages (``--reader-mode``), in training and prediction.

  fid              Fusion-in-Decoder over all K passages (the EMDR² paper). Training: the FiD
                   NLL, plus per-passage likelihoods under a stop-gradient for the retriever term
                   (``objectives.joint_loss``). Prediction: decode from the FiD memory.
  individual-topk  Sachan et al. (ACL 2021)'s Individual Top-K: the same reader given ONE passage
                   at a time (single-passage FiD: the decoder over that passage's encoder states
                   only), in training mode and with autograd, so that
                   -log Σ_k p(a|q,z_k) p(z_k|q) trains the reader and the retriever together.
                   Prediction (``individual_topk_answers``): an answer is decoded from each of the
                   K passages alone (greedy, or beam search with --num-beams); each distinct
                   candidate c is scored by log Σ_k p(z_k|q) p(c|q,z_k), every p(c|q,z_k)
                   teacher-forced with the reader; the best is returned (the first decoded on
                   ties). Costs K decodes plus (distinct candidates x K) scoring passes per
                   question, decoder only (the encoder states are reused).
  joint-topk       Sachan et al. (ACL 2021)'s Joint Top-K: the FiD reader with log p(z_k|q) added to
                   the decoder's cross-attention logits over passage k's tokens, in every head and
                   every decoder layer (``FiDReader.passage_memory_bias``), in training and in
                   decoding. The loss is that reader's NLL: the retriever learns only through the
                   reader's attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.emdr2.data.inputs import decoder_inputs
from megatron.emdr2.objectives import ObjectiveConfig, retriever_log_probs
from megatron.emdr2.openqa.repeated_words import punctuation_ids, stop_at_repeated_word
from megatron.emdr2.openqa.word_completion import complete_words


def reader_terms(cfg: ObjectiveConfig, reader, states: torch.Tensor, memory_mask: torch.Tensor,
                 memory_ids: torch.Tensor, batch, scores: torch.Tensor, K: int, step: int = 0
                 ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(reader_nll [B] or None, token_logprobs [B, K, T]) for ``objectives.joint_loss``.

    states, memory_mask, memory_ids: ``FiDReader.encode``'s memory [B, K*S, H], [B, K*S] and its
    token ids; scores [B, K]: the retrieval scores (carrying the retriever's gradient).
    """
    B = memory_mask.size(0)
    T = batch.labels.size(1)
    if cfg.reader_mode == "individual-topk":
        S = memory_mask.size(1) // K
        rep = lambda t: t.repeat_interleave(K, dim=0)  # noqa: E731  question b -> rows b*K .. b*K+K-1
        nll = reader.token_nll(states.reshape(B * K, S, states.size(-1)), memory_mask.reshape(B * K, S),
                               rep(batch.decoder_ids), rep(batch.labels), rep(batch.label_mask),
                               memory_ids=None if memory_ids is None else memory_ids.reshape(B * K, S))
        return None, -nll.view(B, K, T)
    zeros = torch.zeros(B, K, T, device=states.device)
    if cfg.reader_mode == "joint-topk":
        S = memory_mask.size(1) // K
        bias = reader.passage_memory_bias(retriever_log_probs(scores).to(states.device), S)
        nll = reader.token_nll(states, memory_mask, batch.decoder_ids, batch.labels, batch.label_mask,
                               memory_ids=memory_ids, memory_bias=bias)
        return nll.sum(-1), zeros
    nll = reader.token_nll(states, memory_mask, batch.decoder_ids, batch.labels, batch.label_mask,
                           memory_ids=memory_ids)
    if cfg.effective_objective(step) == "none":
        return nll.sum(-1), zeros
    # B sequences at a time: faster and smaller than K separate reader runs (all B*K at once is
    # faster still but holds every passage's cross-attention keys/values).
    _, token_lp = reader.per_passage_log_likelihood(states, memory_mask, K, batch.decoder_ids, batch.labels,
                                                    batch.label_mask, max_sequences=B, memory_ids=memory_ids)
    return nll.sum(-1), token_lp


# ---------------------------------------------------------------------- prediction

def generate_answers(qa, tok, reader, r_ids: torch.Tensor, r_mask: torch.Tensor,
                     log_p_z: torch.Tensor) -> torch.Tensor:
    """Answer ids [B, L] (pad after eos) for reader inputs [B, K, S] under ``qa.objective.reader_mode``;
    log_p_z [B, K]: the retrieval log-probabilities of the K passages."""
    mode = qa.objective.reader_mode
    kwargs = dict(max_length=qa.answer_max_len, num_beams=qa.num_beams, bos_id=tok.bos_id, eos_id=tok.eos_id,
                  pad_id=tok.pad_id, no_repeat_ngram_size=qa.no_repeat_ngram_size)
    if mode == "individual-topk":
        answers = individual_topk_answers(reader, r_ids, r_mask, log_p_z, **kwargs)
    else:
        bias = None
        if mode == "joint-topk":
            bias = reader.passage_memory_bias(log_p_z.float().to(r_ids.device), r_ids.size(2))
        answers = reader.generate(r_ids, r_mask, memory_bias=bias, **kwargs)
    if getattr(qa, "complete_words", False):
        answers = complete_words(answers, r_ids, tok.continuation_ids(), tok.eos_id, tok.pad_id)
    if getattr(qa, "stop_at_repeated_word", False):
        answers = stop_at_repeated_word(answers, tok.continuation_ids(), punctuation_ids(tok), tok.eos_id,
                                        tok.pad_id)
    return answers


def _candidate(row: list[int], eos_id: int) -> tuple[int, ...]:
    """A decoded answer's tokens through its first eos (all of them when there is none)."""
    return tuple(row[:row.index(eos_id) + 1]) if eos_id in row else tuple(row)


@torch.no_grad()
def individual_topk_answers(reader, r_ids: torch.Tensor, r_mask: torch.Tensor, log_p_z: torch.Tensor,
                            max_length: int, num_beams: int, bos_id: int, eos_id: int, pad_id: int,
                            no_repeat_ngram_size: int = 0, return_scores: bool = False):
    """The individual top-k prediction rule (module docstring): decode from each passage alone,
    score each distinct candidate c by log Σ_k p(z_k|q) p(c|q,z_k), return the best [B, L]
    (and, with ``return_scores``, per question the {candidate tokens: score} dict)."""
    from megatron.emdr2.models import generation

    B, K, S = r_ids.shape
    dev = r_ids.device
    log_p_z = log_p_z.float().to(dev)
    was_training = reader.training
    reader.eval()
    try:
        states, mask = reader.encode(r_ids, r_mask)  # [B, K*S, H]: every passage encoded once
        memory_ids = r_ids.reshape(B, K * S) if reader.copy_head is not None else None
        single = generation.generate(
            reader, states.reshape(B * K, S, -1), mask.reshape(B * K, S), max_length, num_beams, bos_id,
            eos_id, pad_id, 1.0, None if memory_ids is None else memory_ids.reshape(B * K, S),
            no_repeat_ngram_size).view(B, K, -1).tolist()
        candidates = [list(dict.fromkeys(_candidate(row, eos_id) for row in single[b])) for b in range(B)]
        scores = torch.full((B, max(len(c) for c in candidates)), float("-inf"), device=dev)
        for c in range(scores.size(1)):
            # The c-th candidate of every question (its first where it has fewer; not used).
            cands = [cs[c] if c < len(cs) else cs[0] for cs in candidates]
            width = max(1, max(len(x) for x in cands))
            labels = torch.full((B, width), pad_id, dtype=torch.long)
            label_mask = torch.zeros(B, width, dtype=torch.bool)
            for b, x in enumerate(cands):
                labels[b, :len(x)] = torch.tensor(x, dtype=torch.long)
                label_mask[b, :len(x)] = True
            labels, label_mask = labels.to(dev), label_mask.to(dev)
            dec = decoder_inputs(labels, label_mask, bos_id, pad_id)
            seq_ll, _ = reader.per_passage_log_likelihood(states, mask, K, dec, labels, label_mask,
                                                          max_sequences=B, memory_ids=memory_ids)
            mixture = torch.logsumexp(log_p_z + seq_ll, dim=-1)  # log Σ_k p(z_k|q) p(c|q,z_k)
            has = torch.tensor([c < len(cs) for cs in candidates], device=dev)
            scores[:, c] = torch.where(has, mixture, scores[:, c])
        best = scores.argmax(-1).tolist()  # the first on ties
    finally:
        reader.train(was_training)
    chosen = [candidates[b][best[b]] for b in range(B)]
    out = torch.full((B, max(1, max(len(x) for x in chosen))), pad_id, dtype=torch.long)
    for b, x in enumerate(chosen):
        out[b, :len(x)] = torch.tensor(x, dtype=torch.long)
    out = out.to(dev)
    if return_scores:
        return out, [{cand: float(scores[b, i]) for i, cand in enumerate(candidates[b])} for b in range(B)]
    return out
